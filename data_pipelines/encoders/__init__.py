"""Latent encoders: images/videos in [0, 1] <-> latents the model diffuses.

* `pixels`: scale to [-1, 1] (no network; for tiny demos), `channels` 1 (grey) or 3 (RGB).
* `vae`: a diffusers autoencoder from a local folder (`from_pretrained`): `AutoencoderKL` (video
  frame by frame) or a video VAE (`AutoencoderKLWan`, `AutoencoderKLLTXVideo`,
  `AutoencoderKLCogVideoX`) that folds frames too; see `encoders.vae`.

Every encoder has `encode_images` (N,H,W,C), `encode_clips` (N,T,H,W,C), `latent_frames(T)`,
`pixel_shape`, `decode`, `spatial_factor`, `temporal_factor`, and `describe()`: a JSON-able
description written into the shard manifest and the release folder, from which
`load_encoder(description)` rebuilds it (for decoding samples).
"""
from __future__ import annotations

from data_pipelines.encoders.frames import frames_at_least, latent_frames, pixel_frames
from data_pipelines.encoders.pixels import PixelEncoder
from data_pipelines.encoders.vae import VAE_CLASSES, VAEEncoder

ENCODERS = ("pixels", "vae")
__all__ = ["ENCODERS", "PixelEncoder", "VAEEncoder", "VAE_CLASSES", "build_encoder", "frames_at_least", "latent_frames",
           "load_encoder", "pixel_frames"]


def build_encoder(name: str, vae: str | None = None, channels: int = 3, device: str | None = None):
    """An encoder by name; a VAE runs on `device` (default: the GPU when there is one)."""
    if name == "pixels":
        return PixelEncoder(channels)
    if name == "vae":
        if not vae:
            raise ValueError(f"encoder: 'vae' needs --vae DIR (a diffusers {'|'.join(VAE_CLASSES)} folder)")
        return VAEEncoder(vae, device)
    raise ValueError(f"encoder: {name!r} is not one of {'|'.join(ENCODERS)}")


def load_encoder(description: dict, device: str | None = None):
    """Rebuild an encoder from its `describe()` output (manifest or release folder)."""
    kind = description.get("type")
    if kind == "pixels":
        return PixelEncoder(description["channels"])
    if kind == "vae":
        return VAEEncoder(description["path"], device)
    raise ValueError(f"encoder description: unknown type {kind!r}")
