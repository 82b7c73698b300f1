"""Diffusion objectives over latent tokens, with time t in [0, 1] (0 = clean, 1 = noise).

* `ddpm`: diffusers' DDPMScheduler adds the noise at the discrete step round(t * (T-1));
  t is drawn uniformly over the T steps. The target is the noise (`prediction: epsilon`) or
  v = sqrt(a) eps - sqrt(1-a) x0 (`v_prediction`, Salimans & Ho 2022), whose error weighs
  the same on the image at every noise level: epsilon's image error grows as 1/sqrt(a) where
  the noise dominates.
* `flow`: rectified flow x_t = (1 - t) x0 + t eps; the target is the velocity eps - x0;
  t is drawn logit-normal. This matches diffusers' FlowMatchEulerDiscreteScheduler (sigma = t).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch
from torch import nn

from model.packed_batch import PackedBatch

OBJECTIVES = ("ddpm", "flow")


class Diffusion:
    def __init__(self, cfg):
        if cfg.objective not in OBJECTIVES:
            raise ValueError(f"objective: {cfg.objective!r} is not one of {'|'.join(OBJECTIVES)}")
        self.objective, self.prediction = cfg.objective, cfg.prediction
        self.num_train_timesteps = cfg.num_train_timesteps
        self.logit_mean, self.logit_std = cfg.flow_logit_mean, cfg.flow_logit_std
        self.scheduler = None
        if self.objective == "ddpm":
            from diffusers import DDPMScheduler
            self.scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps,
                                           beta_schedule=cfg.beta_schedule, prediction_type=cfg.prediction)

    def sample_t(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """n training times in [0, 1] (CPU, float32)."""
        if self.objective == "ddpm":
            steps = torch.randint(0, self.num_train_timesteps, (n,), generator=generator)
            return steps.float() / (self.num_train_timesteps - 1)
        z = torch.randn(n, generator=generator) * self.logit_std + self.logit_mean
        return torch.sigmoid(z)

    def discrete_step(self, t: torch.Tensor) -> torch.Tensor:
        """ddpm: the scheduler step index of time t."""
        return (t * (self.num_train_timesteps - 1)).round().long()

    def noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, training target) for clean tokens x0 (N,P), noise eps and times t (N)."""
        if self.objective == "ddpm":
            steps = self.discrete_step(t).to(x0.device)
            xt = self.scheduler.add_noise(x0, eps, steps)
            return xt, (eps if self.prediction == "epsilon" else self.scheduler.get_velocity(x0, eps, steps))
        tt = t.to(x0.dtype)[:, None]
        return (1 - tt) * x0 + tt * eps, eps - x0


def assign_timesteps(batch: PackedBatch, diffusion: Diffusion,
                     generator: Optional[torch.Generator] = None) -> PackedBatch:
    """Draw one time per noised unit (row, doc, unit) and set `timestep`; clean tokens get 0."""
    lat = batch.is_latent
    noisy = batch.noisy[lat]
    rows = torch.arange(lat.shape[0], device=lat.device)[:, None].expand_as(lat)[lat]
    key = torch.stack([rows, batch.doc[lat], batch.unit[lat]], dim=1)[noisy]
    t = torch.zeros(noisy.shape[0])
    if key.shape[0]:
        groups, inverse = torch.unique(key.cpu(), dim=0, return_inverse=True)
        t[noisy.cpu()] = diffusion.sample_t(groups.shape[0], generator)[inverse]
    return dataclasses.replace(batch, timestep=t.to(batch.latents.device))


def row_noise(batch: PackedBatch, generators: Sequence[torch.Generator], patch_dim: int) -> torch.Tensor:
    """Noise (N,P) for the latent tokens of a batch (CPU), row b drawn from generators[b]: a row's
    noise does not depend on the rows batched with it, so the same global batch gets the same noise
    however it is split into micro-batches and ranks."""
    counts = batch.is_latent.sum(1).tolist()
    return torch.cat([torch.zeros(0, patch_dim)] + [torch.randn(n, patch_dim, generator=g)
                                                   for n, g in zip(counts, generators)])


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of 1000*t followed by a 2-layer MLP (as in DiT)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * 1000.0)[:, None] * freqs
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))
