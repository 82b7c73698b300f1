"""Memory per device at the step's peak: model states, DeepSpeed's buffers, and one
micro-batch's activations (micro-batches of a step run one after another), per ZeRO stage, attention
back-end and activation checkpointing."""
from __future__ import annotations

from typing import Optional

from pretrain.plan.activations import activation_bytes
from pretrain.plan.sizes import REDUCE_BUCKET, ParamCounts, deepspeed_buffers, model_states


def batch_shape(cfg, batches: Optional[list], latent_share: float) -> dict:
    """Rows, seq_len, and the most latent tokens and text targets a micro-batch held among `batches`
    (else the stated share of full rows)."""
    rows, s = cfg.train.micro_batch_size, cfg.data.seq_len
    if batches:
        return {"rows": rows, "seq_len": s, "latent": max(int(b.is_latent.sum()) for b in batches),
                "text_targets": max(int(b.text_loss.sum()) for b in batches)}
    return {"rows": rows, "seq_len": s, "latent": int(latent_share * rows * s),
            "text_targets": int((1 - latent_share) * rows * s)}


def activation_key(backend: str, checkpointing: bool) -> str:
    """The name of an `activations` entry (also the plan's JSON key)."""
    return backend + (" checkpointed" if checkpointing else "")


def activations(cfg, shape: dict, precision: str) -> dict:
    """Activation bytes (saved + the backward's peak) for each back-end, without and with
    activation checkpointing, and each back-end's mask."""
    out = {}
    for backend in ("sdpa", "flex"):
        for ckpt in (False, True):
            a = activation_bytes(cfg.model, shape["rows"], shape["seq_len"], shape["latent"],
                                 shape["text_targets"], backend, precision, ckpt)
            out[activation_key(backend, ckpt)] = a["saved"] + a["backward"]
        out[f"{backend} mask"] = a["mask"]  # the same with and without checkpointing
    return out


def peak_per_device(params: ParamCounts, devices: int, precision: str, activation: float, ema: bool,
                    on_cpu: bool) -> dict:
    """{stage: {part: bytes, ..., total}} at the step's peak, `activation` bytes for the micro-batch.
    ZeRO-3's reduce copy comes at the end of the backward, after the activations and the parameters
    kept gathered are freed, when the bucket holds every gradient; then only what it needs beyond them
    counts. A larger model fills the bucket, and reduces it, in the middle of the backward."""
    out = {}
    for stage in (1, 2, 3):
        parts = model_states(params, stage, devices, precision)
        if not ema:
            parts.pop("ema")
        parts.update(deepspeed_buffers(params, stage, precision, resident_only=on_cpu))
        parts["activations"] = activation
        if stage == 3 and params.total <= REDUCE_BUCKET:
            parts["reduce copy"] = max(0, parts["reduce copy"] - activation - parts["kept gathered"])
        out[str(stage)] = dict(parts, total=sum(parts.values()))
    return out


def fit_fix(peak, devices: int, per_node: int, stage: int, checkpointing: bool, usable: float,
            max_nodes: int = 4096) -> dict:
    """What fits when the configured step does not. `peak(devices, stage, checkpointing)` -> bytes.
    In order (the configured `stage` first, then the others): a ZeRO stage at the configured
    checkpointing, else with activation checkpointing
    ({"stage", "checkpointing"}); else the fewest whole nodes, doubling up to `max_nodes`, with which
    a stage fits ({"devices", "nodes", "stage", "checkpointing"}); else {} (the activations, or the
    buffers that do not shrink with devices, exceed a device on their own)."""
    options = [checkpointing] if checkpointing else [False, True]

    def first(n):
        stages = [stage] + [s for s in (1, 2, 3) if s != stage]
        return next(({"stage": s, "checkpointing": c} for c in options for s in stages
                     if peak(n, s, c) <= usable), None)
    found = first(devices)
    if found:
        return found
    nodes = -(-devices // per_node)
    while nodes < max_nodes:
        nodes = min(2 * nodes, max_nodes)
        found = first(nodes * per_node)
        if found:
            return dict(found, devices=nodes * per_node, nodes=nodes)
    return {}
