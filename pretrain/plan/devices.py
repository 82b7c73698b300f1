"""The devices a plan is made for: memory and dense bf16 peak (the vendors' data sheets)."""
from __future__ import annotations

import dataclasses
import os

GB = 10 ** 9


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    memory: int  # bytes one device holds
    precision: str  # what train.precision=auto picks on it
    peak: float = 0.0  # dense FLOP/s (bf16 on a GPU; measured fp32 matmul per rank on the CPU)


GPUS = {"h100": Device("h100", 80 * GB, "bf16", 989e12), "h200": Device("h200", 141 * GB, "bf16", 989e12),
        "a100-80g": Device("a100-80g", 80 * GB, "bf16", 312e12)}


def device(name: str, per_node: int, memory_gb: float = 0.0) -> Device:
    """A named GPU, or `cpu`: this machine's memory shared by `per_node` ranks; `memory_gb` overrides."""
    if name == "cpu":
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // per_node
        from pretrain.plan.compute import cpu_flops
        found = Device("cpu", memory, "fp32", cpu_flops(per_node))
    else:
        found = GPUS[name]
    return dataclasses.replace(found, memory=int(memory_gb * GB)) if memory_gb else found
