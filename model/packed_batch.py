"""PackedBatch: the one sequence contract between the data pipeline, the model and the sampler.

Per-token arrays of shape (B, S) describe a packed batch of interleaved documents;
`latents` / `timestep` hold the latent tokens in sequence (row-major b, s) order.
See ARCHITECTURE.md, "The sequence contract".
"""
from __future__ import annotations

import dataclasses

import torch

TEXT, IMAGE, VIDEO = 0, 1, 2  # values of `modality`


@dataclasses.dataclass
class PackedBatch:
    tokens: torch.Tensor       # B,S long: text token id; latent positions hold a placeholder id
    modality: torch.Tensor     # B,S long: 0 text, 1 image latent, 2 video latent
    doc: torch.Tensor          # B,S long: packed document index; -1 = padding
    unit: torch.Tensor         # B,S long: causal unit (see the attention rule)
    noisy: torch.Tensor        # B,S bool: token belongs to a noised latent copy
    pos: torch.Tensor          # B,S,3 long: rotary positions (t, h, w)
    latents: torch.Tensor      # N,P float: clean patchified latent tokens, sequence order
    timestep: torch.Tensor     # N float in [0, 1]: diffusion time per latent token (0 = clean)
    text_loss: torch.Tensor    # B,S bool: logits here are trained to predict tokens[:, s+1]
    latent_loss: torch.Tensor  # B,S bool: diffusion loss on this (noised) latent token

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)

    @property
    def is_latent(self) -> torch.Tensor:
        """B,S bool: positions that hold a latent token (rows of `latents`)."""
        return self.modality != TEXT

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        return PackedBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                              for f in dataclasses.fields(self)})

    def pin_memory(self) -> "PackedBatch":
        """Page-locked copy (DataLoader(pin_memory=True) calls this), for `to(cuda, non_blocking=True)`."""
        return PackedBatch(**{f.name: getattr(self, f.name).pin_memory() for f in dataclasses.fields(self)})

    def validate(self, patch_dim: int | None = None) -> "PackedBatch":
        """Check shapes and cross-field consistency; ValueError names the first bad field."""
        if self.tokens.dim() != 2:
            raise ValueError(f"PackedBatch.tokens: expected shape (B, S), got {tuple(self.tokens.shape)}")
        bs = tuple(self.tokens.shape)
        for name in ("modality", "doc", "unit", "noisy", "text_loss", "latent_loss"):
            if tuple(getattr(self, name).shape) != bs:
                raise ValueError(f"PackedBatch.{name}: shape {tuple(getattr(self, name).shape)} != tokens {bs}")
        for name in ("noisy", "text_loss", "latent_loss"):
            if getattr(self, name).dtype != torch.bool:
                raise ValueError(f"PackedBatch.{name}: expected a bool tensor, got {getattr(self, name).dtype}")
        if tuple(self.pos.shape) != bs + (3,):
            raise ValueError(f"PackedBatch.pos: shape {tuple(self.pos.shape)} != {bs + (3,)}")
        lat = self.is_latent
        pad = self.doc == -1
        # every value check in one host transfer (one sync on a GPU, not one per check)
        checks = torch.stack([lat.sum(), ((self.modality < TEXT) | (self.modality > VIDEO)).any(),
                              (self.noisy & ~lat).any(), (self.text_loss & lat).any(),
                              (self.latent_loss & ~self.noisy).any(), (pad & (lat | self.text_loss)).any()])
        n_latent, bad_modality, noisy_text, loss_on_latent, loss_on_clean, padding = checks.tolist()
        if bad_modality:
            raise ValueError("PackedBatch.modality: values must be 0 (text), 1 (image) or 2 (video)")
        if self.latents.dim() != 2 or self.latents.shape[0] != n_latent:
            raise ValueError(f"PackedBatch.latents: {tuple(self.latents.shape)} rows do not match the "
                             f"{n_latent} latent positions of modality")
        if patch_dim is not None and n_latent and self.latents.shape[1] != patch_dim:
            raise ValueError(f"PackedBatch.latents: {self.latents.shape[1]} values per token, "
                             f"the model expects {patch_dim}")
        if tuple(self.timestep.shape) != (n_latent,):
            raise ValueError(f"PackedBatch.timestep: shape {tuple(self.timestep.shape)} != ({n_latent},)")
        for bad, message in ((noisy_text, "noisy: set on a text position"),
                             (loss_on_latent, "text_loss: set on a latent position"),
                             (loss_on_clean, "latent_loss: set on a position that is not a noised latent"),
                             (padding, "doc: padding (-1) holds a latent or a loss position")):
            if bad:
                raise ValueError(f"PackedBatch.{message}")
        return self
