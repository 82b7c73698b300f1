"""What every encoder shares: channel matching and the latent frame rule of a temporal factor."""
from __future__ import annotations

import numpy as np


def as_pixels(images: np.ndarray, channels: int) -> np.ndarray:
    """...,H,W,C uint8 (0..255) or float in [0, 1] -> float32 in [0, 1] with `channels` channels."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return match_channels(images.astype(np.float32) / 255.0, channels)
    return match_channels(images.astype(np.float32, copy=False), channels)


def match_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """...,H,W,C -> ...,H,W,channels (grey <-> RGB)."""
    c = images.shape[-1]
    if c == channels:
        return images
    if channels == 3 and c == 1:
        return np.repeat(images, 3, axis=-1)
    if channels == 1 and c == 3:
        return images.mean(axis=-1, keepdims=True)
    raise ValueError(f"image: {c} channels cannot be converted to {channels}")


def latent_frames(frames: int, temporal_factor: int, frame_step: int = 0) -> int:
    """Latent frames of a clip of `frames` frames. A causal video VAE keeps the first frame and
    folds each following group of `temporal_factor` frames into one: 1 + (T - 1) / factor. It takes
    T = 1 + frame_step * k (frame_step: the factor, or a multiple of it where the VAE needs more,
    as CogVideoX, which decodes latent frames in pairs after the first, needs 2x); factor 1 (an
    image encoder run frame by frame) keeps T."""
    if frames < 1:
        raise ValueError(f"{frames} frames: a clip has at least one")
    if temporal_factor == 1:
        return frames
    step = frame_step or temporal_factor
    if (frames - 1) % step:
        k = (frames - 1) // step
        raise ValueError(f"{frames} frames: an encoder of temporal factor {temporal_factor} takes 1 + "
                         f"{step}k frames ({1 + k * step} or {1 + (k + 1) * step})")
    return 1 + (frames - 1) // temporal_factor


def frames_at_least(frames: int, temporal_factor: int, frame_step: int = 0) -> int:
    """The fewest frames >= `frames` that the rule takes."""
    step = 1 if temporal_factor == 1 else frame_step or temporal_factor
    return frames if step == 1 else 1 + step * -(-(frames - 1) // step)


def pixel_frames(latent: int, temporal_factor: int) -> int:
    """Frames that `latent` latent frames decode to (the inverse of `latent_frames`)."""
    return latent if temporal_factor == 1 else 1 + (latent - 1) * temporal_factor


def frame_rule(temporal_factor: int, frame_step: int = 0) -> str:
    """The rule as the manifest and the release state it."""
    if temporal_factor == 1:
        return "T"
    step = frame_step or temporal_factor
    return f"1 + (T - 1) / {temporal_factor}" + (f", T = 1 + {step}k" if step != temporal_factor else "")
