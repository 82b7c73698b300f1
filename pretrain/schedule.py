"""Learning-rate schedules with linear warmup: cosine, warmup-stable-decay (WSD), constant."""
from __future__ import annotations

import math


def lr_factor(step: int, cfg) -> float:
    """Multiplier of train.lr at optimizer step `step` (0-based) for TrainConfig `cfg`."""
    warmup, total, floor = cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio
    if warmup and step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = total - int(cfg.wsd_decay_fraction * total)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
    return 1.0 - (1 - floor) * progress
