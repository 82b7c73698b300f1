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
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.register_buffer("axis", torch.arange(head_dim // 2) % 3, persistent=False)

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos B,S,3 -> (cos, sin), each B,1,S,head_dim (fp32)."""
        angles = pos[:, :, self.axis].float() * self.inv_freq
        emb = torch.cat([angles, angles], dim=-1)[:, None]
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x B,H,S,Dh rotated by (cos, sin); computed in fp32, returned in x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)
