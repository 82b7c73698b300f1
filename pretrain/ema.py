"""EMA of the weights, kept per rank on that rank's ZeRO partition of the fp32 master weights.

Each rank holds the EMA in exactly the flat layout of its own fp32 partitions (ZeRO-1/2:
`optimizer.single_partition_of_fp32_groups`, ZeRO-1 in bf16 (DeepSpeed's BF16_Optimizer):
`fp32_groups_flat_partition`, ZeRO-3: `optimizer.fp32_partitioned_groups_flat`),
so an update is one `lerp_` per parameter group with no communication, and the EMA can
be reassembled the way DeepSpeed reassembles the fp32 master weights. These are DeepSpeed
internals: the version is pinned by the tests that check them.
"""
from __future__ import annotations

import torch


def fp32_partitions(engine) -> list[torch.Tensor]:
    opt = engine.optimizer
    if hasattr(opt, "single_partition_of_fp32_groups"):
        return list(opt.single_partition_of_fp32_groups)
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        return list(opt.fp32_partitioned_groups_flat)
    if hasattr(opt, "fp32_groups_flat_partition"):  # ZeRO-1 in bf16 with fp32 gradient accumulation
        return list(opt.fp32_groups_flat_partition)
    raise RuntimeError(f"EMA needs a ZeRO optimizer (stage 1, 2 or 3), got {type(opt).__name__}")


@torch.no_grad()
def full_fp32_state(engine, keep: bool = True) -> dict[str, torch.Tensor]:
    """The engine's whole fp32 master weights by parameter name, on CPU (collective: every rank
    calls it). A rank with `keep` False takes part in the gathers but keeps nothing (returns {})."""
    from deepspeed.utils import safe_get_full_fp32_param
    state = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        if keep:
            state[name] = full.detach().float().cpu().clone()
    return state


def decay_at(step: int, decay: float, warmup: bool = True) -> float:
    """The decay of the update after optimizer step `step` (0-based). With warmup (diffusers'
    EMAModel default) the early EMA follows the weights instead of keeping the initialisation
    for ~1/(1-decay) steps."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


class ShardedEMA:
    def __init__(self, engine, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.masters = fp32_partitions(engine)
        self.shadow = [m.detach().clone() for m in self.masters]

    @torch.no_grad()
    def reset(self, engine) -> None:
        """Start the EMA over from the engine's current weights (after loading a checkpoint without one)."""
        self.masters = fp32_partitions(engine)
        for s, m in zip(self.shadow, self.masters):
            s.copy_(m)

    @torch.no_grad()
    def update(self, step: int) -> None:
        weight = 1.0 - decay_at(step, self.decay, self.warmup)
        for s, m in zip(self.shadow, self.masters):
            s.lerp_(m.detach(), weight)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow) or any(
                a.shape != b.shape for a, b in zip(state["shadow"], self.shadow)):
            raise ValueError("EMA state: partition shapes differ from this run's (another world size or "
                             "ZeRO stage?)")
        for s, saved in zip(self.shadow, state["shadow"]):
            s.copy_(saved)

    @torch.no_grad()
    def full_state(self, engine, keep: bool = True) -> dict[str, torch.Tensor]:
        """The whole fp32 EMA by parameter name, on CPU, on the ranks with `keep` (collective: all
        ranks call it).
        The EMA is put in the masters' place for DeepSpeed's public `safe_get_full_fp32_param`, which
        gathers each tensor from the partitions, and the masters are then restored."""
        saved = [m.detach().clone() for m in self.masters]
        try:
            for m, s in zip(self.masters, self.shadow):
                m.copy_(s)
            return full_fp32_state(engine, keep)
        finally:
            for m, v in zip(self.masters, saved):
                m.copy_(v)

    @torch.no_grad()
    def load_full(self, engine, full: dict) -> None:
        """Take this rank's partitions of a full fp32 EMA state dict (a resume on another number of
        ranks). ZeRO-3 pieces are cut here: piece r of a parameter of n values holds values
        [r*p, (r+1)*p) of ceil(n/ranks) = p, the last pieces padded with zeros (DeepSpeed's
        safe_set_full_fp32_param reads past the end when the ranks do not divide n). ZeRO-1/2 go
        through safe_set_full_fp32_param, which cuts their group partitions."""
        names = [name for name, _ in engine.module.named_parameters()]
        missing = [name for name in names if name not in full]
        if missing:
            raise KeyError(f"EMA state has no tensor for parameter {missing[0]}")
        opt = engine.optimizer
        if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
            for name, p in engine.module.named_parameters():
                group, offset, piece = opt.grad_position[opt.get_param_id(p)]
                rank = opt._get_param_partition_rank(p)
                values = full[name].reshape(-1)[rank * piece:(rank + 1) * piece].to(torch.float32)
                target = self.shadow[group].narrow(0, offset, piece)
                target.zero_()
                target[:values.numel()].copy_(values)
            return
        from deepspeed.utils import safe_set_full_fp32_param
        saved = [m.detach().clone() for m in self.masters]
        for name, p in engine.module.named_parameters():
            safe_set_full_fp32_param(p, full[name].to(p.device, torch.float32))
        for s, m in zip(self.shadow, self.masters):
            s.copy_(m)
        for m, v in zip(self.masters, saved):
            m.copy_(v)
