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


def build_engine(model: nn.Module, cfg, device: torch.device, load_universal: bool = False):
    """deepspeed.initialize with torch AdamW (fused on GPU) and the config's LR schedule."""
    import deepspeed
    t = cfg.train
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                                  eps=t.eps, fused=device.type == "cuda")
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, device, load_universal),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, t)))
    # the trainer scales each loss by the world size because DeepSpeed averages gradients over ranks
    assert engine.gradient_average, "DeepSpeed must average gradients over ranks (gradient_allreduce_op mean)"
    return engine
