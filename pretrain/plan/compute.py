"""FLOPs of a training step and the time they take at a stated MFU."""
from __future__ import annotations

import time
from typing import Optional

import torch

from pretrain.metrics import batch_flops

CPU_MFU = 0.63  # bench/RESULTS.md model_step, monoformer row (2 cores, fp32, of the measured matmul rate)
GPU_MFU = 0.40  # assumed: no GPU has been lent to measure one (bench/RESULTS.md "GPU")


def sampled_batches(cfg, count: int = 4) -> tuple[Optional[list], str, int]:
    """`count` packed batches (train.micro_batch_size rows) of the config's shards, in this process, what
    they are, and how many documents were skipped as longer than data.seq_len; (None, why, 0) when the
    shards cannot be read."""
    from data_pipelines.loader import PackedLoader
    from data_pipelines.slot import DataError
    try:
        loader = PackedLoader(cfg.data.replace(num_workers=0), cfg.model, cfg.train.micro_batch_size)
        batches = [b for _, b in zip(range(count), loader)]
    except (DataError, OSError, ValueError) as e:
        return None, str(e).splitlines()[0][:200], 0
    return (batches or None), f"{len(batches)} packed batches of the config's shards", loader.counters()["oversize"]


def micro_batch_flops(cfg, params_by_use: dict, batches: Optional[list], latent_share: float) -> float:
    """Training FLOPs of one micro-batch: the mean over `batches` (mask-aware: the pairs each batch's
    attention allows), else a stated one: full rows, `latent_share` of their tokens latent, the rest text
    targets, one causal document per row."""
    if batches:
        return sum(batch_flops(cfg.model, params_by_use, b) for b in batches) / len(batches)
    rows, s = cfg.train.micro_batch_size, cfg.data.seq_len
    tokens = rows * s
    matmuls = (params_by_use["every"] * tokens + params_by_use["text"] * (1 - latent_share) * tokens
               + params_by_use["latent"] * latent_share * tokens)
    return 6.0 * matmuls + 12.0 * cfg.model.n_layers * cfg.model.dim * rows * s * (s + 1) / 2


def cpu_flops(per_node: int) -> float:
    """FLOP/s of one of `per_node` ranks sharing this machine: an fp32 matmul measured over all its threads."""
    a = torch.randn(1024, 1024)
    a @ a
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 0.5:
        a @ a
        n += 1
    return 2 * 1024 ** 3 * n / (time.perf_counter() - start) / per_node


def timing(cfg, flops_per_micro: float, devices: int, peak: float, mfu: float, batches: Optional[list]) -> dict:
    """Step time, tokens per day (not padding: as `batches` hold, else full rows) and time to
    train.max_steps at `mfu` of `peak` FLOP/s per device."""
    step_flops = flops_per_micro * cfg.train.grad_accum * devices
    step_s = step_flops / (devices * peak * mfu)
    per_micro = (sum(int((b.doc != -1).sum()) for b in batches) / len(batches) if batches
                 else cfg.train.micro_batch_size * cfg.data.seq_len)
    tokens = per_micro * cfg.train.grad_accum * devices
    return {"step_flops": step_flops, "step_s": step_s, "tokens_per_step": tokens,
            "tokens_per_day": tokens / step_s * 86400, "hours_to_max_steps": cfg.train.max_steps * step_s / 3600}
