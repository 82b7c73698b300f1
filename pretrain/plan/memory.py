"""Memory per device at the step's peak: model states, DeepSpeed's buffers, and one
micro-batch's activations (micro-batches of a step run one after another), per ZeRO stage, attention
back-end and activation checkpointing."""
from __future__ import annotations

from typing import Optional

from pretrain.plan.activations import activation_bytes
from pretrain.plan.sizes import ParamCounts, deepspeed_buffers, model_states


def batch_shape(cfg, batches: Optional[list], latent_share: float) -> dict:
    """Rows, seq_len, and the most latent tokens and text targets a micro-batch held among `batches`
    (else the stated share of full rows)."""
    rows, s = cfg.train.micro_batch_size, cfg.data.seq_len
    if batches:
        return {"rows": rows, "seq_len": s, "latent": max(int(b.is_latent.sum()) for b in batches),
                "text_targets": max(int(b.text_loss.sum()) for b in batches)}
    return {"rows": rows, "seq_len": s, "latent": int(latent_share * rows * s),
            "text_targets": int((1 - latent_share) * rows * s)}


def activations(cfg, shape: dict, precision: str) -> dict:
    """Activation bytes (saved + the backward's peak) for each back-end, without and with
    activation checkpointing, and each back-end's mask."""
    out = {}
    for backend in ("sdpa", "flex"):
        for ckpt in (False, True):
            a = activation_bytes(cfg.model, shape["rows"], shape["seq_len"], shape["latent"],
                                 shape["text_targets"], backend, precision, ckpt)
            out[f"{backend}{' checkpointed' if ckpt else ''}"] = a["saved"] + a["backward"]
            out[f"{backend} mask"] = a["mask"]
    return out


def peak_per_device(params: ParamCounts, devices: int, precision: str, activation: float, ema: bool,
                    on_cpu: bool) -> dict:
    """{stage: {part: bytes, ..., total}} at the step's peak, `activation` bytes for the micro-batch."""
    out = {}
    for stage in (1, 2, 3):
        parts = model_states(params, stage, devices, precision)
        if not ema:
            parts.pop("ema")
        parts.update(deepspeed_buffers(params, stage, precision, resident_only=on_cpu))
        parts["activations"] = activation
        out[str(stage)] = dict(parts, total=sum(parts.values()))
    return out
