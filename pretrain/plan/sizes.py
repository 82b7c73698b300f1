"""What a config's model and its training state weigh: parameters, model-state memory per device,
checkpoint bytes on disk. Counted from the model built on the meta device (exact, no memory)."""
from __future__ import annotations

import dataclasses

import torch

MiB = 2 ** 20
GiB = 2 ** 30


def word_bytes(precision: str) -> int:
    """Bytes of a working weight, gradient or activation."""
    return 2 if precision == "bf16" else 4


@dataclasses.dataclass
class ParamCounts:
    total: int  # every parameter (the embedding included)
    embedding: int
    by_use: dict  # UnifiedTransformer.params_by_use: every token / text targets / latent tokens
    largest_layer: int  # the most parameters one module holds itself (what ZeRO-3 gathers at once)


def count_parameters(model_cfg) -> ParamCounts:
    from model.transformer import UnifiedTransformer
    with torch.device("meta"):
        model = UnifiedTransformer(model_cfg)
    return ParamCounts(total=sum(p.numel() for p in model.parameters()), embedding=model.tok_emb.weight.numel(),
                       by_use=model.params_by_use(),
                       largest_layer=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()))


def model_states(p: ParamCounts, stage: int, devices: int, precision: str) -> dict[str, float]:
    """Bytes per device of the model states under ZeRO-`stage` on `devices` devices: the working
    weights, their gradients, the optimizer's fp32 master weights, Adam moments and fp32 gradient
    partition, the EMA (fp32, on each rank's partition), and under ZeRO-3 the largest layer gathered.
    In bf16 at stages 2 and 3 the sum without the EMA is DeepSpeed's own estimate
    (estimate_zero{2,3}_model_states_mem_needs, no offload): 2P + 18P/N and 4L + 18P/N."""
    n, total = devices, p.total
    word = word_bytes(precision)
    weights = word * total / (n if stage == 3 else 1)
    if word == 4:  # fp32: the gradients are the fp32 gradients (whole at ZeRO-1, partitioned above)
        grads = 4 * total / (1 if stage == 1 else n)
    elif stage == 1:  # bf16 at ZeRO-1 (DeepSpeed's BF16_Optimizer, fp32 accumulation): 16-bit + whole fp32
        grads = (2 + 4) * total
    else:  # bf16: 16-bit gradients (a partition at 2, none kept at 3) + an fp32 partition
        grads = {2: 2 * total / n, 3: 0}[stage] + 4 * total / n
    optimizer = (4 + 8) * total / n  # fp32 master, Adam exp_avg + exp_avg_sq
    parts = {"weights": weights, "gradients": grads, "optimizer": optimizer, "ema": 4 * total / n}
    if stage == 3:
        parts["gathered layer"] = 4 * p.largest_layer
    return parts


def checkpoint_bytes(p: ParamCounts, stage: int, precision: str, devices: int, client: int) -> dict[str, float]:
    """Bytes on disk of one checkpoint on `devices` ranks: the module's weights in the model states file
    (not at ZeRO-3, whose ranks save their partitions in the optimizer files), the fp32 master weights and
    Adam moments, the EMA (the rank files), and the client state (`client` bytes: the loader state and
    the config), which ZeRO-3 writes into every rank's model states file."""
    return {"weights": 0 if stage == 3 else word_bytes(precision) * p.total, "optimizer": 12 * p.total, "ema": 4 * p.total,
            "client state": client * (devices if stage == 3 else 1)}


REDUCE_BUCKET = 500_000_000  # DeepSpeed's zero_optimization.reduce_bucket_size (elements), which this engine keeps
REUSE_DISTANCE = 1_000_000_000  # DeepSpeed's stage3_max_reuse_distance (elements), which this engine keeps


def deepspeed_buffers(p: ParamCounts, stage: int, precision: str, resident_only: bool) -> dict[str, float]:
    """Bytes of DeepSpeed's buffers beyond the model states. `resident_only` (the CPU): only the pages
    written count, at most every parameter's.
    * ZeRO-1/2: the gradient reduction bucket, reduce_bucket_size elements (fp32 at ZeRO-1, the
      gradients' dtype at ZeRO-2). At ZeRO-1 on the CPU the gradients are views into it (measured), so
      only what it holds beyond them is resident; a GPU allocates it whole. ZeRO-1 in bf16 runs the
      BF16_Optimizer, which has none.
    * ZeRO-3: the bucket, in communication_data_type (fp32 here); the parameters kept gathered across
      the turn from forward to backward (those used again within stage3_max_reuse_distance elements of
      the trace: the last REUSE_DISTANCE / 2 elements of layers), beyond the layer DeepSpeed's estimate
      counts; and `reduce copy`, the fp32 copy of the filled bucket that reduce_scatter_coalesced
      concatenates (when it comes: `memory.peak_per_device`)."""
    word = word_bytes(precision)
    filled = min(REDUCE_BUCKET, p.total)
    bucket = filled if resident_only else REDUCE_BUCKET
    if stage == 1:
        return {"reduce bucket": 0 if precision == "bf16" else
                max(0, 4 * bucket - 4 * p.total) if resident_only else 4 * bucket}
    if stage == 2:
        return {"reduce bucket": word * bucket}
    kept = max(0, word * min(p.total, REUSE_DISTANCE // 2) - 4 * p.largest_layer)
    return {"reduce bucket": 4 * bucket, "kept gathered": kept, "reduce copy": 4 * filled}
