"""Latent encoders: images/videos in [0, 1] <-> latents the model diffuses.

* `pixels`: scale to [-1, 1] (no network; for tiny demos), `channels` 1 (grey) or 3 (RGB).
* `vae`: a diffusers `AutoencoderKL` from a local folder (`from_pretrained`), latents
  multiplied by the config's `scaling_factor` (and shifted by `shift_factor` if set);
  batched, on the GPU when there is one. Video is encoded frame by frame.

`describe()` gives a JSON-able description written into the shard manifest and the release
folder; `load_encoder(description)` rebuilds the encoder from it (for decoding samples).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

ENCODERS = ("pixels", "vae")


def _match_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """N,H,W,C -> N,H,W,channels (grey <-> RGB)."""
    c = images.shape[-1]
    if c == channels:
        return images
    if channels == 3 and c == 1:
        return np.repeat(images, 3, axis=-1)
    if channels == 1 and c == 3:
        return images.mean(axis=-1, keepdims=True)
    raise ValueError(f"image: {c} channels cannot be converted to {channels}")


class PixelEncoder:
    def __init__(self, channels: int = 3):
        if channels not in (1, 3):
            raise ValueError(f"channels: pixels encoder takes 1 or 3, got {channels}")
        self.channels = channels
        self.spatial_factor = 1

    def describe(self) -> dict:
        return {"type": "pixels", "channels": self.channels, "spatial_factor": 1}

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """N,H,W,C in [0, 1] -> N,C',H,W in [-1, 1] (float16)."""
        x = _match_channels(np.asarray(images, np.float32), self.channels)
        return (x.transpose(0, 3, 1, 2) * 2.0 - 1.0).astype(np.float16)

    def pixel_shape(self, latent_shape) -> tuple[int, int, int]:
        """(C, H, W) of the images that latents of (c, h, w) decode to."""
        return (self.channels, *latent_shape[-2:])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """N,C,H,W latents -> N,C,H,W images in [0, 1]."""
        return ((latents.float() + 1.0) / 2.0).clamp(0, 1)


class VAEEncoder:
    def __init__(self, path: str | Path, device: str | None = None, batch_size: int = 64):
        from diffusers import AutoencoderKL
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a diffusers AutoencoderKL folder (no config.json)")
        self.path = path
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.vae = AutoencoderKL.from_pretrained(str(path)).to(self.device).eval()
        cfg = self.vae.config
        self.scaling = float(cfg.scaling_factor)
        self.shift = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.channels = int(cfg.latent_channels)
        self.in_channels = int(cfg.in_channels)
        self.out_channels = int(cfg.out_channels)
        self.spatial_factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.batch_size = batch_size

    def describe(self) -> dict:
        return {"type": "vae", "path": str(self.path.resolve()), "channels": self.channels,
                "scaling_factor": self.scaling, "shift_factor": self.shift,
                "spatial_factor": self.spatial_factor}

    @torch.no_grad()
    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """N,H,W,C in [0, 1] -> N,c,h,w latents (mode of the posterior, scaled), float16."""
        x = _match_channels(np.asarray(images, np.float32), self.in_channels)
        out = []
        for i in range(0, len(x), self.batch_size):
            chunk = torch.from_numpy(x[i:i + self.batch_size]).permute(0, 3, 1, 2).to(self.device) * 2 - 1
            z = self.vae.encode(chunk).latent_dist.mode()
            out.append(((z - self.shift) * self.scaling).float().cpu().numpy())
        return np.concatenate(out).astype(np.float16)

    def pixel_shape(self, latent_shape) -> tuple[int, int, int]:
        """(C, H, W) of the images that latents of (c, h, w) decode to."""
        return (self.out_channels, *(n * self.spatial_factor for n in latent_shape[-2:]))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.device, torch.float32) / self.scaling + self.shift
        return ((self.vae.decode(z).sample + 1) / 2).clamp(0, 1).cpu()


def encode_video(encoder, video: np.ndarray) -> np.ndarray:
    """T,H,W,C video -> C,T,h,w latent, frame by frame."""
    return encoder.encode_images(video).transpose(1, 0, 2, 3)


def build_encoder(name: str, vae: str | None = None, channels: int = 3, device: str | None = None):
    """An encoder by name; a VAE runs on `device` (default: the GPU when there is one)."""
    if name == "pixels":
        return PixelEncoder(channels)
    if name == "vae":
        if not vae:
            raise ValueError("encoder: 'vae' needs --vae DIR (a diffusers AutoencoderKL folder)")
        return VAEEncoder(vae, device)
    raise ValueError(f"encoder: {name!r} is not one of {'|'.join(ENCODERS)}")


def load_encoder(description: dict):
    """Rebuild an encoder from its `describe()` output (manifest or release folder)."""
    kind = description.get("type")
    if kind == "pixels":
        return PixelEncoder(description["channels"])
    if kind == "vae":
        return VAEEncoder(description["path"])
    raise ValueError(f"encoder description: unknown type {kind!r}")
