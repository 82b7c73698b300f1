"""Rotary position embedding over the three position axes (t, h, w) of `pos`.

Frequency f of a head rotates by the position on axis f % 3 (interleaved M-RoPE). For text,
t = h = w = running index, so this is exactly Llama's 1-D RoPE (rotate-half convention),
and Llama weights import unchanged.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def inverse_frequencies(cfg, device=None) -> torch.Tensor:
    """The rotary frequencies of a ModelConfig (head_dim / 2 of them, fp32), with its rope_scaling
    applied as Hugging Face's rope_type of the same name computes it."""
    half = torch.arange(0, cfg.head_dim, 2, device=device, dtype=torch.float32)
    inv_freq = 1.0 / (cfg.rope_theta ** (half / cfg.head_dim))
    if cfg.rope_scaling == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        wavelen = 2 * math.pi / inv_freq
        low_wavelen = cfg.rope_original_max_seq_len / cfg.rope_low_freq_factor
        high_wavelen = cfg.rope_original_max_seq_len / cfg.rope_high_freq_factor
        scaled = torch.where(wavelen > low_wavelen, inv_freq / cfg.rope_factor, inv_freq)
        smooth = (cfg.rope_original_max_seq_len / wavelen - cfg.rope_low_freq_factor) / \
            (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        between = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(between, smoothed, scaled)
    return inv_freq


class Rotary(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.head_dim = cfg, cfg.head_dim

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos B,S,3 -> (cos, sin), each B,1,S,head_dim (fp32).

        The frequencies are made here in fp32 rather than kept as a buffer, which a bf16
        engine would cast (and so coarsen) with the weights."""
        inv_freq = inverse_frequencies(self.cfg, pos.device)
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
