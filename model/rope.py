"""Rotary position embedding over the three position axes (t, h, w) of `pos`.

Frequency f of a head rotates by the position on axis f % 3 (interleaved M-RoPE). For text,
t = h = w = running index, so this is exactly Llama's 1-D RoPE (rotate-half convention),
and Llama weights import unchanged.
"""
from __future__ import annotations

import torch
from torch import nn


class Rotary(nn.Module):
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos B,S,3 -> (cos, sin), each B,1,S,head_dim (fp32).

        The frequencies are made here in fp32 rather than kept as a buffer, which a bf16
        engine would cast (and so coarsen) with the weights."""
        half = torch.arange(0, self.head_dim, 2, device=pos.device, dtype=torch.float32)
        inv_freq = 1.0 / (self.theta ** (half / self.head_dim))
        axis = torch.arange(self.head_dim // 2, device=pos.device) % 3
        angles = pos[:, :, axis].float() * inv_freq
        emb = torch.cat([angles, angles], dim=-1)[:, None]
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x B,H,S,Dh rotated by (cos, sin); computed in fp32, returned in x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)
