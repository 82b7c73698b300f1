"""ExperimentConfig: everything one training run needs, loaded from configs/*.yaml.

Keys that scripts and users rely on (stable): run.dir, train.max_steps, train.zero_stage,
train.micro_batch_size, train.grad_accum, checkpoint.interval, checkpoint.keep, wandb.mode,
data.seq_len, model.*.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from data_pipelines.config import DataConfig
from model.config_system import Config, ConfigError, knob
from model.model_config import ModelConfig


@dataclasses.dataclass
class RunConfig(Config):
    dir: str = knob("runs/default", "run directory: checkpoints, metrics.jsonl, wandb, samples")
    seed: int = knob(0, "seed of the weight init and the diffusion noise")


@dataclasses.dataclass
class TrainConfig(Config):
    max_steps: int = knob(1000, "optimizer steps to train for (the schedule's length)")
    stop_at: int = knob(0, "end this invocation at this step, checkpointed, the schedule unchanged (as a "
                           "preemption would; --resume auto goes on); 0 = max_steps")
    init_from: str = knob("", "release folder (to-release, import-llama) whose weights the run starts from, "
                              "at step 0; ignored when resuming from a checkpoint")
    zero_stage: int = knob(2, "DeepSpeed ZeRO stage: 1, 2 or 3")
    micro_batch_size: int = knob(4, "packed rows per rank per micro-step")
    grad_accum: int = knob(1, "micro-steps per optimizer step")
    lr: float = knob(3e-4, "peak learning rate")
    min_lr_ratio: float = knob(0.1, "final learning rate as a fraction of lr")
    warmup_steps: int = knob(100, "linear warmup steps")
    schedule: Literal["cosine", "wsd", "constant"] = knob(
        "cosine", "after warmup: cosine decay, warmup-stable-decay, or constant")
    wsd_decay_fraction: float = knob(0.2, "wsd: fraction of max_steps spent in the final linear decay")
    weight_decay: float = knob(0.1, "AdamW weight decay (matrices only; not norms, biases, embeddings)")
    beta1: float = knob(0.9, "AdamW beta1")
    beta2: float = knob(0.95, "AdamW beta2")
    eps: float = knob(1e-8, "AdamW epsilon")
    grad_clip: float = knob(1.0, "clip the global gradient norm (0 = off)")
    precision: Literal["auto", "fp32", "bf16"] = knob("auto", "auto = bf16 on GPU, fp32 on CPU")
    activation_checkpointing: bool = knob(False, "recompute each block in the backward pass")
    compile: bool = knob(False, "torch.compile each transformer block")
    ema_decay: float = knob(0.0, "EMA of the weights (e.g. 0.9999); 0 = no EMA")
    ema_warmup: bool = knob(True, "decay min(ema_decay, (1+n)/(10+n)) at step n, as diffusers' EMAModel")
    log_interval: int = knob(10, "log metrics every N steps")
    eval_interval: int = knob(0, "evaluate on data.eval_datasets every N steps and at max_steps (0 = never)")
    eval_batches: int = knob(4, "micro-batches per rank per evaluation (0 = the whole held-out data)")
    sample_prompts: list[str] = knob([], "captions sampled (from the EMA) at each evaluation -> "
                                         "RUN_DIR/samples/step_N.png (a row per caption), wandb")
    samples_per_prompt: int = knob(1, "images sampled per caption at each evaluation")
    sample_steps: int = knob(20, "denoising steps of those samples")
    sample_cfg: float = knob(3.0, "classifier-free guidance scale of those samples")
    sample_kind: Literal["image", "video"] = knob("image", "what those samples are: image (PNG grid) or video "
                                                           "(GIF of grids), at the data's latent shape")
    sample_quality: str = knob("", "scorer of those samples, logged as sample/...: digits (classifier "
                                   "accuracy), video_digits (frames read as the digit, jumps; "
                                   "pretrain.quality); empty = none")
    caption_quality: str = knob("", "judge of the captions generated (greedy, from the EMA) at each evaluation for "
                                    "the first caption_samples (caption, image) samples of data.eval_datasets, "
                                    "logged as sample/caption_accuracy: digits (names the reference's digit), "
                                    "exact (the reference's text); empty = none")
    caption_samples: int = knob(300, "images captioned at each evaluation (the first of data.eval_datasets)")
    caption_max_tokens: int = knob(16, "longest caption generated at evaluation, tokens")
    log_samples: bool = knob(False, "write the documents of every micro-batch to RUN_DIR/samples_rankR.jsonl")
    peak_tflops: float = knob(0.0, "per-device peak TFLOP/s for MFU (0 = auto on known GPUs, none on CPU)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.zero_stage not in (1, 2, 3):
            raise ConfigError(f"zero_stage: must be 1, 2 or 3, got {self.zero_stage}")
        for name in ("max_steps", "micro_batch_size", "grad_accum", "log_interval"):  # checked before anything starts
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("eval_interval", "eval_batches", "sample_cfg"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.stop_at <= self.max_steps:
            raise ConfigError(f"stop_at: must be in [0, max_steps={self.max_steps}], got {self.stop_at}")
        for name in ("samples_per_prompt", "sample_steps", "caption_samples", "caption_max_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.sample_quality:
            from pretrain.quality import SCORERS
            if self.sample_quality not in SCORERS:
                raise ConfigError(f"sample_quality: {self.sample_quality!r} is not one of {'|'.join(SCORERS)}")
        if self.caption_quality:
            from pretrain.evaluation.captioning import CAPTION_JUDGES
            if self.caption_quality not in CAPTION_JUDGES:
                raise ConfigError(f"caption_quality: {self.caption_quality!r} is not one of "
                                  f"{'|'.join(CAPTION_JUDGES)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay: must be in [0, 1), got {self.ema_decay}")


@dataclasses.dataclass
class CheckpointConfig(Config):
    interval: int = knob(500, "save every N steps (and at the end, and on SIGTERM/SIGUSR1)")
    keep: int = knob(3, "keep the last K checkpoints of this run's lineage (the runs resumed from each other)")
    async_save: bool = knob(True, "write checkpoint files in a background thread from a host-memory snapshot: "
                                  "training goes on meanwhile; `latest` moves once every rank's files are on disk",
                            key="async")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("interval", "keep"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")


@dataclasses.dataclass
class WandbConfig(Config):
    mode: Literal["offline", "online", "disabled"] = knob("offline", "offline runs sync later with `wandb sync`")
    project: str = knob("monofusion", "wandb project")
    entity: str = knob("", "wandb entity (team); empty = default")
    name: str = knob("", "run name; empty = the run directory's name")


@dataclasses.dataclass
class ExperimentConfig(Config):
    run: RunConfig = knob(RunConfig(), "where and with which seed")
    model: ModelConfig = knob(ModelConfig(), "the network")
    data: DataConfig = knob(DataConfig(), "the data")
    train: TrainConfig = knob(TrainConfig(), "optimisation")
    checkpoint: CheckpointConfig = knob(CheckpointConfig(), "checkpointing")
    wandb: WandbConfig = knob(WandbConfig(), "Weights & Biases logging")

    def __post_init__(self) -> None:
        super().__post_init__()
        from pretrain.distributed import PROCESS_GROUP_TIMEOUT
        d, limit = self.data, PROCESS_GROUP_TIMEOUT.total_seconds() / 2
        if d.retry_budget + d.read_timeout + d.retry_backoff_max > limit:
            raise ConfigError(f"data.retry_budget + data.read_timeout + data.retry_backoff_max = "
                              f"{d.retry_budget + d.read_timeout + d.retry_backoff_max:g} s: must stay within {limit:g} s, "
                              "half the process-group timeout (the other ranks wait for a rank that retries)")
