"""A DeepSpeed engine from an ExperimentConfig: ZeRO 1/2/3, bf16 or fp32, AdamW, LR schedule."""
from __future__ import annotations

import torch
from torch import nn

from pretrain.schedule import lr_factor


def precision(cfg, device: torch.device) -> str:
    p = cfg.train.precision
    return ("bf16" if device.type == "cuda" else "fp32") if p == "auto" else p


def deepspeed_config(cfg, device: torch.device, load_universal: bool = False) -> dict:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": precision(cfg, device) == "bf16"},
        # bf16 weights, but gradients accumulated over micro-steps and reduced over ranks in fp32
        # (DeepSpeed's default for both is the model's dtype)
        "data_types": {"grad_accum_dtype": "fp32"},
        "communication_data_type": "fp32",
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 2 ** 31,
        "wall_clock_breakdown": False,
    }


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the weights of linear layers only (not on embeddings, norms, biases or
    the per-layer adaLN tables)."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]


# train.* settings a resume takes from this run's config, on every path (pretrain.train logs each change)
RESUME_SETTINGS = ("lr", "min_lr_ratio", "warmup_steps", "schedule", "wsd_decay_fraction", "max_steps",
                   "weight_decay", "beta1", "beta2", "eps", "grad_clip")


def torch_optimizer(engine):
    """The torch AdamW inside DeepSpeed's ZeRO (or bf16) optimizer."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def optimizer_settings(engine) -> list[dict]:
    """Each parameter group's hyperparameters as this run built them (all but its params and the
    scheduled lr): taken before a checkpoint is loaded, which replaces them with its own."""
    return [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
            for g in torch_optimizer(engine).param_groups]


def restore_settings(engine, settings: list[dict], peak_lr: float, grad_clip: float) -> None:
    """After a checkpoint was loaded (directly or universal, any ZeRO stage): this run's weight decay,
    betas and eps in every group, its gradient clipping (DeepSpeed's ZeRO-1/2 and bf16 optimizers
    load the checkpoint's), and its peak lr at the loaded schedule position (the schedule's shape is
    this run's already: its lambda reads this run's config)."""
    for group, own in zip(torch_optimizer(engine).param_groups, settings):
        group.update(own)
    if hasattr(engine.optimizer, "clip_grad"):
        engine.optimizer.clip_grad = grad_clip
    sched = engine.lr_scheduler
    sched.base_lrs = [peak_lr] * len(sched.base_lrs)
    for group, base, factor in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["initial_lr"], group["lr"] = base, base * factor(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]


def describe_optimizer(engine) -> str:
    """The optimizer's live settings, group by group (logged after a resume that changed any)."""
    groups = torch_optimizer(engine).param_groups
    decay = "/".join(f"{g['weight_decay']:g}" for g in groups)
    clip = f" grad_clip={engine.optimizer.clip_grad:g}" if hasattr(engine.optimizer, "clip_grad") else ""
    return (f"lr={groups[0]['lr']:.6g} weight_decay={decay} betas={tuple(groups[0]['betas'])} "
            f"eps={groups[0]['eps']:g}{clip}")


def changed_settings(saved: dict, train_cfg, engine, step: int) -> list[str]:
    """A log line naming each RESUME_SETTINGS value that differs from the checkpoint's run's `saved`
    train config (they take this run's value: restore_settings), and the optimizer as it now is."""
    now = train_cfg.to_dict()
    changes = [f"train.{k} {saved[k]!r} -> {now[k]!r}" for k in RESUME_SETTINGS if k in saved and saved[k] != now[k]]
    if not changes:
        return []
    return [f"resume: {', '.join(changes)}: this run's values apply from step {step + 1} "
            f"(optimizer: {describe_optimizer(engine)})"]


def build_engine(model: nn.Module, cfg, device: torch.device, load_universal: bool = False):
    """deepspeed.initialize with torch AdamW (fused: on the CPU 6x faster than the per-tensor loop over a
    flat partition, bench/RESULTS.md "overhead") and the config's LR schedule."""
    import deepspeed
    t = cfg.train
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                                  eps=t.eps, fused=True)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, device, load_universal),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, t)))
    # the trainer scales each loss by the world size because DeepSpeed averages gradients over ranks
    assert engine.gradient_average, "DeepSpeed must average gradients over ranks (gradient_allreduce_op mean)"
    return engine
