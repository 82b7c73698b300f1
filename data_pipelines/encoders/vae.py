"""The `vae` encoder: a diffusers autoencoder from a local folder, chosen by its config's class.

| `_class_name`            | frames            | spatial factor                        | latents (normalised)          |
|--------------------------|-------------------|---------------------------------------|-------------------------------|
| `AutoencoderKL`          | one by one        | 2^(len(block_out_channels) - 1)       | (z - shift_factor) * scaling_factor |
| `AutoencoderKLWan`       | 1 + (T - 1) / 2^k, k = sum(temperal_downsample) | 2^(len(dim_mult) - 1) x patch_size | (z - latents_mean) / latents_std |
| `AutoencoderKLLTXVideo`  | 1 + (T - 1) / its temporal_compression_ratio | its spatial_compression_ratio | (z - latents_mean) * scaling_factor / latents_std |
| `AutoencoderKLCogVideoX` | 1 + (T - 1) / temporal_compression_ratio | 2^(len(block_out_channels) - 1) | z * scaling_factor       |

The factors are read from the architecture, not from the advisory `scale_factor_*` fields, and the
first clip encoded checks them. Latents are the posterior's mode, normalised as the diffusers
pipelines do before their transformer sees them; `decode` undoes it. Batched, on the GPU when
there is one.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from data_pipelines.encoders.frames import as_pixels, frame_rule, latent_frames, pixel_frames
from model.config_system import InputMissing

VAE_CLASSES = ("AutoencoderKL", "AutoencoderKLWan", "AutoencoderKLLTXVideo", "AutoencoderKLCogVideoX")


def vae_class(path: Path) -> str:
    """The diffusers class a VAE folder was saved from (its config.json's `_class_name`)."""
    config = path / "config.json"
    if not config.is_file():
        raise InputMissing(f"{path}: not a diffusers VAE folder (no config.json)")
    try:
        name = json.loads(config.read_text()).get("_class_name")
    except ValueError:
        raise ValueError(f"{config}: not JSON") from None
    if name not in VAE_CLASSES:
        raise ValueError(f"{config}: _class_name {name!r} is not one of {'|'.join(VAE_CLASSES)}")
    return name


def _architecture(vae, name: str) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """(spatial factor, temporal factor, per-channel mean, per-channel scale) of a loaded VAE."""
    if name == "AutoencoderKLCogVideoX":  # its pipelines scale only, whatever the config holds
        c = vae.config.latent_channels
        return (2 ** (len(vae.config.block_out_channels) - 1), int(vae.config.temporal_compression_ratio),
                torch.zeros(c), torch.full((c,), float(vae.config.scaling_factor)))
    cfg = vae.config
    if name == "AutoencoderKL":
        c = cfg.latent_channels
        shift = float(getattr(cfg, "shift_factor", None) or 0.0)
        return (2 ** (len(cfg.block_out_channels) - 1), 1, torch.full((c,), shift),
                torch.full((c,), float(cfg.scaling_factor)))
    if name == "AutoencoderKLWan":
        c = cfg.z_dim
        if len(cfg.latents_mean) != c or len(cfg.latents_std) != c:
            raise ValueError(f"AutoencoderKLWan: latents_mean/latents_std have {len(cfg.latents_mean)}/"
                             f"{len(cfg.latents_std)} values for z_dim {c}")
        return (2 ** (len(cfg.dim_mult) - 1) * (cfg.patch_size or 1), 2 ** sum(map(bool, cfg.temperal_downsample)),
                torch.tensor(cfg.latents_mean, dtype=torch.float32), 1.0 / torch.tensor(cfg.latents_std))
    return (int(vae.spatial_compression_ratio), int(vae.temporal_compression_ratio),  # AutoencoderKLLTXVideo
            vae.latents_mean.float().cpu(), float(cfg.scaling_factor) / vae.latents_std.float().cpu())


class VAEEncoder:
    def __init__(self, path: str | Path, device: str | None = None, batch_size: int = 64):
        import diffusers
        self.path = Path(path)
        self.cls = vae_class(self.path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.vae = getattr(diffusers, self.cls).from_pretrained(str(self.path)).to(self.device).eval()
        cfg = self.vae.config
        self.spatial_factor, self.temporal_factor, mean, scale = _architecture(self.vae, self.cls)
        self.framewise = self.cls == "AutoencoderKL"  # an image VAE: a clip frame by frame
        self.channels = len(mean)
        patch = (getattr(cfg, "patch_size", None) or 1) if self.cls == "AutoencoderKLWan" else 1
        # Wan 2.2 folds 2x2 pixel patches into channels before its first conv: RGB is in/out_channels / 4
        self.in_channels, self.out_channels = int(cfg.in_channels) // patch ** 2, int(cfg.out_channels) // patch ** 2
        # CogVideoX decodes latent frames in pairs after the first: an even count would decode to 4t frames
        self.frame_step = 2 * self.temporal_factor if self.cls == "AutoencoderKLCogVideoX" else self.temporal_factor
        self.mean, self.scale = mean.to(self.device), scale.to(self.device)
        self.batch_size = batch_size
        self.checked = False

    def describe(self) -> dict:
        return {"type": "vae", "class": self.cls, "path": str(self.path.resolve()), "channels": self.channels,
                "spatial_factor": self.spatial_factor, "temporal_factor": self.temporal_factor,
                "frame_step": self.frame_step, "latent_frames": frame_rule(self.temporal_factor, self.frame_step)}

    def latent_frames(self, frames: int) -> int:
        return latent_frames(frames, self.temporal_factor, self.frame_step)

    def _per_channel(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return t.view(-1, *([1] * (z.dim() - 2)))

    @torch.no_grad()
    def _encode(self, x: torch.Tensor) -> np.ndarray:
        """N,C,[T,]H,W in [-1, 1] on the device -> normalised latents (float32, numpy)."""
        z = self.vae.encode(x).latent_dist.mode().float()
        return ((z - self._per_channel(self.mean, z)) * self._per_channel(self.scale, z)).cpu().numpy()

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """N,H,W,C in [0, 1] (or uint8) -> N,c,h,w latents, float16 (a video VAE sees each image as one frame)."""
        x = as_pixels(images, self.in_channels)
        out = []
        for i in range(0, len(x), self.batch_size):
            chunk = torch.from_numpy(x[i:i + self.batch_size]).permute(0, 3, 1, 2).to(self.device) * 2 - 1
            out.append(self._encode(chunk) if self.framewise else self._encode(chunk[:, :, None])[:, :, 0])
        return np.concatenate(out).astype(np.float16)

    def encode_clips(self, clips: np.ndarray) -> np.ndarray:
        """N,T,H,W,C in [0, 1] (or uint8) -> N,c,t,h,w latents, float16, t = latent_frames(T)."""
        n, frames = clips.shape[:2]
        t = self.latent_frames(frames)
        if self.framewise:
            z = self.encode_images(clips.reshape(n * frames, *clips.shape[2:]))
            return z.reshape(n, frames, *z.shape[1:]).transpose(0, 2, 1, 3, 4)
        x = as_pixels(clips, self.in_channels)
        step = max(1, self.batch_size // frames)  # the batch counts frames
        out = []
        for i in range(0, n, step):
            chunk = torch.from_numpy(x[i:i + step]).permute(0, 4, 1, 2, 3).to(self.device) * 2 - 1
            out.append(self._encode(chunk))
        z = np.concatenate(out)
        if not self.checked:
            expected = (t, clips.shape[2] // self.spatial_factor, clips.shape[3] // self.spatial_factor)
            if z.shape[2:] != expected:
                raise ValueError(f"{self.path} ({self.cls}): a {frames}x{clips.shape[2]}x{clips.shape[3]} clip gave "
                                 f"latents {'x'.join(map(str, z.shape[2:]))}, not {'x'.join(map(str, expected))} "
                                 f"(temporal factor {self.temporal_factor}, spatial {self.spatial_factor})")
            self.checked = True
        return z.astype(np.float16)

    def pixel_shape(self, latent_shape) -> tuple[int, ...]:
        """(C, [T,] H, W) of what latents of (c, [t,] h, w) decode to."""
        *frames, h, w = latent_shape[1:]
        frames = [pixel_frames(f, self.temporal_factor) for f in frames]
        return (self.out_channels, *frames, h * self.spatial_factor, w * self.spatial_factor)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """N,c,h,w or N,c,t,h,w latents -> pixels N,C,H,W or N,C,T,H,W in [0, 1] (on the CPU)."""
        z = latents.to(self.device, torch.float32)
        z = z / self._per_channel(self.scale, z) + self._per_channel(self.mean, z)
        video = z.dim() == 5
        if self.framewise and video:
            n, c, t = z.shape[:3]
            x = self._decode(z.permute(0, 2, 1, 3, 4).reshape(n * t, c, *z.shape[3:]))
            return x.reshape(n, t, *x.shape[1:]).permute(0, 2, 1, 3, 4)
        if not self.framewise and not video:
            return self._decode(z[:, :, None])[:, :, 0]
        return self._decode(z)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """Batched as encoding is: `batch_size` frames a call, whole clips."""
        frames = pixel_frames(z.shape[2], self.temporal_factor) if z.dim() == 5 else 1
        step = max(1, self.batch_size // frames)
        out = []
        for i in range(0, len(z), step):
            chunk, extra = z[i:i + step], {}
            if getattr(self.vae.config, "timestep_conditioning", False):  # LTX 0.9.1+: decode at time 0
                extra["temb"] = torch.zeros(len(chunk), device=chunk.device)
            out.append(((self.vae.decode(chunk, **extra).sample.float() + 1) / 2).clamp(0, 1).cpu())
        x = torch.cat(out)
        if z.dim() == 5 and x.shape[2] != frames:
            raise ValueError(f"{self.path} ({self.cls}): {z.shape[2]} latent frames decoded to {x.shape[2]} frames, "
                             f"not {frames}")
        return x
