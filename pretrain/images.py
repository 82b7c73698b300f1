"""Decoded samples -> a PNG grid (images) or an animated GIF grid (video)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch


def tile(images: torch.Tensor, pad: int = 2, cols: Optional[int] = None) -> np.ndarray:
    """n,C,H,W in [0, 1] -> one uint8 H',W',3 grid, `cols` images a row (default: as square as possible)."""
    n, c, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), np.float32)
    x = images.float().clamp(0, 1).numpy().transpose(0, 2, 3, 1)
    if c == 1:
        x = np.repeat(x, 3, axis=-1)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[i, ..., :3]
    return (grid * 255).round().astype(np.uint8)


def upscale(img: np.ndarray, min_side: int = 256) -> np.ndarray:
    k = max(1, -(-min_side // max(1, min(img.shape[:2]))))  # ceil: at least min_side pixels
    return img.repeat(k, 0).repeat(k, 1)


def save_image_grid(images: torch.Tensor, path: str | Path, cols: Optional[int] = None) -> Path:
    from PIL import Image
    Image.fromarray(upscale(tile(images, cols=cols))).save(path)
    return Path(path)


def save_video_grid(videos: torch.Tensor, path: str | Path, fps: int = 8, cols: Optional[int] = None) -> Path:
    """videos n,C,T,H,W in [0, 1] -> an animated GIF of grids (`cols` videos a row)."""
    from PIL import Image
    frames = [Image.fromarray(upscale(tile(videos[:, :, t], cols=cols))) for t in range(videos.shape[2])]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return Path(path)


def decode(encoder, latents: torch.Tensor) -> torch.Tensor:
    """Latents n,C,H,W or n,C,T,H,W -> pixels in [0, 1] (video frame by frame)."""
    if latents.dim() == 4:
        return encoder.decode(latents.float().cpu())
    n, c, t = latents.shape[:3]
    frames = latents.permute(0, 2, 1, 3, 4).reshape(n * t, c, *latents.shape[3:])
    pixels = encoder.decode(frames.float().cpu())
    return pixels.reshape(n, t, *pixels.shape[1:]).permute(0, 2, 1, 3, 4)
