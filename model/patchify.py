"""Latent <-> token conversion: non-overlapping p x p spatial patches, frame by frame for video."""
from __future__ import annotations

import torch


def patchify(latent: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Image C,H,W or video C,T,H,W -> tokens (T*H/p*W/p, C*p*p) in raster (t, h, w) order."""
    if latent.dim() not in (3, 4):
        raise ValueError(f"latent: expected C,H,W (image) or C,T,H,W (video), got shape {tuple(latent.shape)}")
    x = latent if latent.dim() == 4 else latent.unsqueeze(1)
    c, t, h, w = x.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"latent: height {h} and width {w} must be divisible by patch_size={p}")
    x = x.reshape(c, t, h // p, p, w // p, p).permute(1, 2, 4, 0, 3, 5)
    return x.reshape(t * (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, channels: int, grid: tuple[int, int, int], patch_size: int,
               video: bool) -> torch.Tensor:
    """Inverse of `patchify` for raster-ordered tokens over the token grid (T, h, w)."""
    t, h, w = grid
    p = patch_size
    if tokens.shape != (t * h * w, channels * p * p):
        raise ValueError(f"tokens: shape {tuple(tokens.shape)} does not match grid {grid} "
                         f"with {channels} channels and patch_size={p}")
    x = tokens.reshape(t, h, w, channels, p, p).permute(3, 0, 1, 4, 2, 5).reshape(channels, t, h * p, w * p)
    return x if video else x.squeeze(1)
