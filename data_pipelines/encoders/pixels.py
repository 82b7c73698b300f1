"""The `pixels` encoder: images scaled to [-1, 1], no network (tiny demos and tests)."""
from __future__ import annotations

import numpy as np
import torch

from data_pipelines.encoders.frames import as_pixels, latent_frames


class PixelEncoder:
    temporal_factor = 1
    frame_step = 1
    spatial_factor = 1

    def __init__(self, channels: int = 3):
        if channels not in (1, 3):
            raise ValueError(f"channels: pixels encoder takes 1 or 3, got {channels}")
        self.channels = channels

    def describe(self) -> dict:
        return {"type": "pixels", "channels": self.channels, "spatial_factor": 1, "temporal_factor": 1,
                "latent_frames": "T"}

    def latent_frames(self, frames: int) -> int:
        return latent_frames(frames, 1)

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """N,H,W,C in [0, 1] (or uint8) -> N,C',H,W in [-1, 1] (float16)."""
        x = as_pixels(images, self.channels)
        return (np.moveaxis(x, -1, 1) * 2.0 - 1.0).astype(np.float16)

    def encode_clips(self, clips: np.ndarray) -> np.ndarray:
        """N,T,H,W,C in [0, 1] -> N,C',T,H,W."""
        return self.encode_images(clips)  # moveaxis(-1, 1) keeps T where a clip needs it

    def pixel_shape(self, latent_shape) -> tuple[int, ...]:
        """(C, [T,] H, W) of what latents of (c, [t,] h, w) decode to."""
        return (self.channels, *latent_shape[1:])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """N,C,H,W or N,C,T,H,W latents -> pixels of the same layout in [0, 1]."""
        return ((latents.float() + 1.0) / 2.0).clamp(0, 1)
