"""The trainer's own overhead: the real `Trainer.train_step` (DeepSpeed engine, packed loader with its
workers, token-count all-reduce, EMA, the stop-flag all-reduce, the step's log call and a metrics
record every `train.log_interval` steps) against a bare
PyTorch loop over the same model and the same batches (loss, backward, clip, torch AdamW), in
interleaved rounds in one process.

    python bench/overhead.py                       # the presets: tiny-cpu and a model whose bare step is >= 200 ms
    torchrun --nproc-per-node 2 bench/overhead.py  # the same on 2 ranks (the all-reduces then cost something)

Prints, per preset and row kind, the median ms per step of each loop and their ratio (bare / real:
1.00 = no overhead); the gap split in three: "own", the trainer's parts outside the engine; "ds
excess", DeepSpeed's gradient reduction and its optimizer step beyond the bare clip + AdamW;
"fwd+bwd excess", the engine's forward + backward beyond the bare loop's, the reduction aside (the
three are means: they add up to "mean gap"; train.grad_accum is 1). Then
the real step's parts (loader wait, token counts, forward + backward through the engine, the engine's
optimizer step, EMA, the stop flag, logging, the rest), DeepSpeed's calls inside the engine (gradient
reduction, gradient norm, AdamW) and the bare loop's (forward + backward, clip, AdamW). Data:
synthetic shards written first (bench/train_step.py), rows filled.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pretrain.train as train_module  # noqa: E402
from data_pipelines.config import DataConfig, DatasetConfig  # noqa: E402
from model.model_config import ModelConfig  # noqa: E402
from model.transformer import UnifiedTransformer  # noqa: E402
from pretrain.config import ExperimentConfig, RunConfig, TrainConfig, WandbConfig  # noqa: E402
from pretrain.distributed import any_rank, init_distributed  # noqa: E402
from pretrain.engine import param_groups, precision  # noqa: E402
from pretrain.metrics import RunLogger  # noqa: E402
from pretrain.process import run_and_exit  # noqa: E402
from train_step import write_synthetic_shards  # noqa: E402

PRESETS = {  # model, rows per micro-batch, tokens per row
    "tiny-cpu": (dict(dim=128, n_layers=4, n_heads=4, vocab_size=2000), 4, 256),
    "200ms": (dict(dim=384, n_layers=6, n_heads=6, vocab_size=2000), 4, 256),
    "200ms-2k": (dict(dim=384, n_layers=6, n_heads=6, vocab_size=2000), 4, 512),  # 2,048 tokens per micro-batch
    "200ms-4k": (dict(dim=384, n_layers=6, n_heads=6, vocab_size=2000), 4, 1024),  # 4,096
    # GPU (bench/gpu_run.sh overhead): the shapes of shared/bench/reference_step.py, at 2,048 and 8,192 tokens
    "0.9b-2k": (dict(dim=2048, n_layers=16, n_heads=16, ffn_dim=5632, vocab_size=32000), 1, 2048),
    "0.9b": (dict(dim=2048, n_layers=16, n_heads=16, ffn_dim=5632, vocab_size=32000), 2, 4096),
}
PARTS = ("loader wait", "token counts", "fwd+bwd", "engine step", "ema", "stop flag", "logging")
DEEPSPEED = ("ds grad reduce", "ds grad norm", "ds adamw")  # inside fwd+bwd and engine step
BARE = ("bare fwd+bwd", "bare clip", "bare adamw")


class Timers:
    def __init__(self):
        self.total = defaultdict(float)
        self.depth = defaultdict(int)

    def wrap(self, name, fn):
        """`fn` timed into `name`; a call made inside another call timed into the same name counts once."""
        def timed(*args, **kwargs):
            self.depth[name] += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth[name] -= 1
                if not self.depth[name]:
                    self.total[name] += time.perf_counter() - start
        return timed

    def wrap_deepspeed(self, engine):
        """DeepSpeed's own calls inside the engine's backward and step: the gradient reduction (the
        per-parameter hooks at ZeRO-2, the backward epilogue), and in its ZeRO-1/2 optimizer the gradient
        norm and the torch AdamW it steps over its flat fp32 partition (the bf16 ZeRO-1 optimizer has
        neither method: those columns stay empty)."""
        engine.allreduce_gradients = self.wrap("ds grad reduce", engine.allreduce_gradients)
        for method, name in (("reduce_ready_partitions_and_remove_grads", "ds grad reduce"),
                             ("scaled_global_norm", "ds grad norm"), ("_optimizer_step", "ds adamw")):
            if hasattr(engine.optimizer, method):
                setattr(engine.optimizer, method, self.wrap(name, getattr(engine.optimizer, method)))


def synced_time(device: torch.device) -> float:
    """perf_counter once the GPU's queued work is done (rounds are timed whole; on a GPU the parts
    inside a step are the host's time: they do not wait for the GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def build(preset: str, kind: str, tmp: Path, dist, zero_stage: int = 2, dtype: str = "auto"):
    model_kw, rows, seq = PRESETS[preset]
    mc = ModelConfig(**model_kw, latent_channels=4, patch_size=2, mode="monoformer")
    write_synthetic_shards(tmp / "shards", kind, seq, 4, 2, mc.vocab_size)
    cfg = ExperimentConfig(
        run=RunConfig(dir=str(tmp / "run")), model=mc,
        data=DataConfig(datasets=[DatasetConfig(path=str(tmp / "shards"))], seq_len=seq, caption_dropout=0.0,
                        add_bos_eos=True),
        train=TrainConfig(zero_stage=zero_stage, precision=dtype, micro_batch_size=rows, warmup_steps=0, max_steps=10 ** 6, ema_decay=0.999),
        wandb=WandbConfig(mode="disabled"))
    return cfg, train_module.Trainer(cfg, dist, resume="none")


def measure(preset: str, kind: str, rounds: int, steps: int, dist, zero_stage: int = 2, dtype: str = "auto") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg, trainer = build(preset, kind, Path(tmp), dist, zero_stage, dtype)
        t = cfg.train
        timers = Timers()
        train_module.next_batch = timers.wrap("loader wait", train_module.next_batch)
        trainer.step_token_counts = timers.wrap("token counts", trainer.step_token_counts)
        trainer.accumulate = timers.wrap("fwd+bwd", trainer.accumulate)
        trainer.engine.step = timers.wrap("engine step", trainer.engine.step)
        timers.wrap_deepspeed(trainer.engine)
        trainer.ema.update = timers.wrap("ema", trainer.ema.update)
        record = timers.wrap("logging", trainer.window_record)
        log = RunLogger(cfg, dist.is_main, 0)
        log_step = timers.wrap("logging", log.log)
        stop_flag = timers.wrap("stop flag", any_rank)

        device = dist.device
        bare = UnifiedTransformer(cfg.model).to(device)  # fp32 weights; bf16 compute under autocast on a GPU
        bare.load_state_dict(trainer.engine.module.state_dict())
        bare.train()
        autocast = torch.autocast(device.type, torch.bfloat16, enabled=precision(cfg, device) == "bf16")
        opt = torch.optim.AdamW(param_groups(bare, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                                fused=True)  # as the trainer builds it (pretrain.engine)
        batches = iter(trainer.loader)
        seen = []

        def real_step():  # what Trainer.run does each step, checkpoints and evaluation aside
            sums, counts = trainer.train_step(batches)
            seen.append(trainer.last_batch)
            metrics = {}
            if trainer.step % t.log_interval == 0:
                metrics = record([sums["lm_sum"], sums["diffusion_sum"]], counts, t.log_interval, 1.0, 1, None)
            stop_flag(False, dist.control_group)
            log_step(trainer.step, metrics, advance=1)

        def bare_step(i):
            batch = seen[i % len(seen)].to(device, non_blocking=True)  # as the trainer moves each batch
            start = time.perf_counter()
            with autocast:
                loss = bare.loss(batch)["loss"]
            loss.backward()
            mid = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(bare.parameters(), t.grad_clip)
            clipped = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            timers.total["bare fwd+bwd"] += mid - start
            timers.total["bare clip"] += clipped - mid
            timers.total["bare adamw"] += time.perf_counter() - clipped

        for i in range(3):  # warm up both (first allocations, the loader's workers)
            real_step()
            bare_step(i)
        timers.total.clear()
        real, plain = [], []
        for r in range(rounds):
            start = synced_time(device)
            for _ in range(steps):
                real_step()
            real.append((synced_time(device) - start) / steps)
            start = synced_time(device)
            for i in range(steps):
                bare_step(r * steps + i)
            plain.append((synced_time(device) - start) / steps)
        n = rounds * steps
        parts = {k: v / n for k, v in timers.total.items()}
        out = {"real": statistics.median(real), "bare": statistics.median(plain), **parts}
        out["rest"] = sum(real) / rounds - sum(parts.get(k, 0.0) for k in PARTS)
        # the gap, split: the trainer's own parts; DeepSpeed's gradient reduction and its step beyond the bare
        # clip + AdamW; the engine's forward + backward beyond the bare loop's (its hooks; the noise of 2 cores)
        g = out.get
        out["own"] = g("rest") + sum(g(k, 0.0) for k in PARTS if k not in ("fwd+bwd", "engine step"))
        out["ds excess"] = g("ds grad reduce", 0.0) + g("engine step", 0.0) - g("bare clip", 0.0) - g("bare adamw", 0.0)
        out["fwd+bwd excess"] = g("fwd+bwd", 0.0) - g("ds grad reduce", 0.0) - g("bare fwd+bwd", 0.0)
        out["mean gap"] = (sum(real) - sum(plain)) / rounds  # what those three add up to (the ratio is of medians)
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny-cpu,200ms,200ms-2k,200ms-4k")
    p.add_argument("--zero-stage", type=int, default=2, choices=(1, 2),
                   help="train.zero_stage of the real step (the shipped configs use 2)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="train.precision (auto: bf16 on a GPU, fp32 on the CPU; the bare loop autocasts to bf16)")
    p.add_argument("--kinds", default="monoformer,text")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="steps per round of each loop")
    args = p.parse_args()
    dist = init_distributed()
    head = ["real", "bare", "ratio", "mean gap", "own", "ds excess", "fwd+bwd excess", *PARTS, "rest", *DEEPSPEED,
            *BARE]
    if dist.is_main:
        print(f"{dist.world_size} rank(s), {torch.get_num_threads()} threads each, ZeRO-{args.zero_stage}, "
              f"precision {args.precision}, ms per "
              f"step (medians of {args.rounds} rounds of {args.steps})")
        print(f"{'preset':9s} {'rows':11s} " + " ".join(f"{h:>12s}" for h in head))
    for preset in args.presets.split(","):
        for kind in args.kinds.split(","):
            r = measure(preset, kind, args.rounds, args.steps, dist, args.zero_stage, args.precision)
            r["ratio"] = r["bare"] / r["real"]
            if dist.is_main:
                cells = [f"{r['ratio']:12.2f}" if h == "ratio" else f"{r.get(h, 0.0) * 1e3:12.1f}" for h in head]
                print(f"{preset:9s} {kind:11s} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    run_and_exit(main)
