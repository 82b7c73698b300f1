"""Decoded samples -> a PNG grid (images), or an MP4 or animated GIF of grids (video)."""
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


VIDEO_SUFFIXES = (".mp4", ".gif")


def save_video_grid(videos: torch.Tensor, path: str | Path, fps: float = 8, cols: Optional[int] = None) -> Path:
    """videos n,C,T,H,W in [0, 1] -> one video of grids (`cols` videos a row): H.264 `.mp4` (PyAV) or
    animated `.gif`, by the path's suffix."""
    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"{path}: a video is written as {' or '.join(VIDEO_SUFFIXES)}")
    frames = [upscale(tile(videos[:, :, t], cols=cols)) for t in range(videos.shape[2])]
    if path.suffix.lower() == ".gif":
        from PIL import Image
        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    else:
        _write_mp4(frames, path, fps)
    return path


def _write_mp4(frames: list[np.ndarray], path: Path, fps: float) -> None:
    import av
    from fractions import Fraction
    h, w = (frames[0].shape[0] + 1) // 2 * 2, (frames[0].shape[1] + 1) // 2 * 2  # yuv420p: even sides
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4",
                                rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for f in frames:
            padded = np.pad(f, ((0, h - f.shape[0]), (0, w - f.shape[1]), (0, 0)), mode="edge")
            out.mux(stream.encode(av.VideoFrame.from_ndarray(padded, format="rgb24")))
        out.mux(stream.encode())


def decode(encoder, latents: torch.Tensor) -> torch.Tensor:
    """Latents n,C,H,W or n,C,T,H,W -> pixels in [0, 1] (a video VAE unfolds latent frames too)."""
    return encoder.decode(latents.float().cpu())
