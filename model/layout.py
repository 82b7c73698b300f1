"""Layout builders: documents (ordered text / image / video segments) -> per-token arrays.

Pure functions shared by the data pipeline (training batches) and the sampler. A latent
segment becomes `<boi>` (or `<bov>`), its noised copy and/or its clean copy, then
`<eoi>` (`<eov>`). Units (ARCHITECTURE.md, "The attention rule"):

* every text token is its own unit;
* monoformer: the whole latent is one unit, shared by its noised and clean copies;
* acdit: each block of `block_size` latent tokens is one unit, shared by the block's
  noised and clean copies; a latent's tokens are ordered block by block.

Roles: `generate` = noised copy with diffusion loss (acdit adds the clean copy, always);
`context` = clean copy only, no loss; `both` = noised + clean (text after the latent then
sees it clean).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal, Sequence, Union

import torch

from model.packed_batch import IMAGE, TEXT, VIDEO, PackedBatch
from model.patchify import patchify
from model.special_tokens import BOI, BOV, EOI, EOV, LATENT, PAD

Role = Literal["generate", "context", "both"]
ROLES = ("generate", "context", "both")


@dataclasses.dataclass
class TextSegment:
    tokens: Sequence[int]
    loss: bool = True  # train next-token prediction on these tokens


@dataclasses.dataclass
class LatentSegment:
    latent: torch.Tensor  # image C,H,W or video C,T,H,W (unpatchified)
    role: Role = "generate"


Segment = Union[TextSegment, LatentSegment]


@dataclasses.dataclass
class LayoutSpec:
    """How latents are laid out; taken from ModelConfig so training and sampling agree."""
    mode: Literal["monoformer", "acdit"] = "monoformer"
    patch_size: int = 2
    block_size: int = 0  # acdit: latent tokens per block; 0 = whole latent

    @classmethod
    def from_model_config(cls, cfg) -> "LayoutSpec":
        return cls(mode=cfg.mode, patch_size=cfg.patch_size, block_size=cfg.block_size)


@dataclasses.dataclass
class DocLayout:
    """Per-token arrays of one document (length L) and its latent tokens (n, P)."""
    tokens: torch.Tensor
    modality: torch.Tensor
    unit: torch.Tensor
    noisy: torch.Tensor
    pos: torch.Tensor
    text_loss: torch.Tensor
    latent_loss: torch.Tensor
    latents: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def slice(self, a: int, b: int) -> "DocLayout":
        """Tokens [a, b) with their latent rows (for running a document piece by piece)."""
        lat = self.modality != TEXT
        la, lb = int(lat[:a].sum()), int(lat[:b].sum())
        return DocLayout(self.tokens[a:b], self.modality[a:b], self.unit[a:b], self.noisy[a:b], self.pos[a:b],
                         self.text_loss[a:b], self.latent_loss[a:b], self.latents[la:lb])

    @staticmethod
    def concat(parts: Sequence["DocLayout"]) -> "DocLayout":
        """Pieces of one document, joined back in order (they stay one document when packed)."""
        lat = [p.latents for p in parts if p.latents.shape[0]]
        return DocLayout(*(torch.cat([getattr(p, f.name) for p in parts])
                           for f in dataclasses.fields(DocLayout) if f.name != "latents"),
                         latents=torch.cat(lat) if lat else torch.zeros(0, 0))

    def shifted(self, offset: int) -> "DocLayout":
        """The same tokens placed `offset` positions and units later in their document."""
        return dataclasses.replace(self, unit=self.unit + offset, pos=self.pos + offset)


def latent_grid(shape: Sequence[int], patch_size: int) -> tuple[int, int, int]:
    """Token grid (T, h, w) of an image (C,H,W: T=1) or video (C,T,H,W) latent."""
    t = shape[1] if len(shape) == 4 else 1
    return t, shape[-2] // patch_size, shape[-1] // patch_size


def block_order(grid: tuple[int, int, int], block_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sequence order of a latent's raster tokens and the block of each.

    Returns (order, block, n_blocks): `order[i]` is the raster index (t, h, w row-major)
    of the i-th token in the sequence, `block[i]` its block. Images use square blocks of
    `block_size` = s*s tokens, videos chunks of whole frames; 0 or >= all tokens = one block.
    """
    t, h, w = grid
    n = t * h * w
    if block_size <= 0 or block_size >= n:
        return torch.arange(n), torch.zeros(n, dtype=torch.long), 1
    if t > 1:  # video: chunks of whole frames
        frame = h * w
        if block_size % frame:
            raise ValueError(f"block_size: {block_size} is not a whole number of frames of {frame} tokens")
        block = torch.arange(n) // block_size
        return torch.arange(n), block, int(block[-1]) + 1
    s = math.isqrt(block_size)
    if s * s != block_size or h % s or w % s:
        raise ValueError(f"block_size: {block_size} is not a square s*s tiling the {h}x{w} token grid")
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    blk = (ii // s) * (w // s) + (jj // s)
    within = (ii % s) * s + (jj % s)
    key = (blk * block_size + within).flatten()
    order = torch.argsort(key)
    return order, blk.flatten()[order], (h // s) * (w // s)


def _grid_positions(grid: tuple[int, int, int], start: int) -> torch.Tensor:
    t, h, w = grid
    tt, ii, jj = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt.flatten(), ii.flatten(), jj.flatten()], dim=1) + start


def layout_document(segments: Sequence[Segment], spec: LayoutSpec) -> DocLayout:
    """Lay out one document; positions and units start at 0."""
    parts: list[dict] = []
    latents: list[torch.Tensor] = []
    index = 0  # running rotary index
    unit = 0

    def text_part(ids, loss):
        nonlocal index, unit
        n = len(ids)
        ar = torch.arange(n)
        parts.append(dict(tokens=torch.as_tensor(ids, dtype=torch.long).reshape(n),
                          modality=torch.full((n,), TEXT), unit=unit + ar,
                          noisy=torch.zeros(n, dtype=torch.bool),
                          pos=(index + ar)[:, None].expand(n, 3), loss=torch.full((n,), loss)))
        index += n
        unit += n

    for seg in segments:
        if isinstance(seg, TextSegment):
            text_part(list(seg.tokens), seg.loss)
            continue
        if not isinstance(seg, LatentSegment):
            raise ValueError(f"segment: expected TextSegment or LatentSegment, got {type(seg).__name__}")
        if seg.role not in ROLES:
            raise ValueError(f"segment.role: {seg.role!r} is not one of {'|'.join(ROLES)}")
        video = seg.latent.dim() == 4
        tokens = patchify(seg.latent, spec.patch_size)  # raster order, validates the shape
        grid = latent_grid(seg.latent.shape, spec.patch_size)
        block_size = spec.block_size if spec.mode == "acdit" else 0
        order, block, n_blocks = block_order(grid, block_size)
        copies = {"generate": (True, False), "context": (False, True), "both": (True, True)}[seg.role]
        if spec.mode == "acdit" and seg.role == "generate":
            copies = (True, True)
        text_part([BOV if video else BOI], True)  # predicting <boi> = deciding to draw
        pos = _grid_positions(grid, index)[order]
        tokens = tokens[order]
        n = tokens.shape[0]
        for noisy, present in zip((True, False), copies):
            if not present:
                continue
            parts.append(dict(tokens=torch.full((n,), LATENT), modality=torch.full((n,), VIDEO if video else IMAGE),
                              unit=unit + block, noisy=torch.full((n,), noisy), pos=pos,
                              loss=torch.full((n,), noisy)))
            latents.append(tokens)
        unit += n_blocks
        index += max(grid)
        text_part([EOV if video else EOI], False)

    cat = {k: torch.cat([p[k] for p in parts]) if parts else torch.zeros(0, dtype=torch.long)
           for k in ("tokens", "modality", "unit", "noisy", "loss")}
    pos = torch.cat([p["pos"] for p in parts]) if parts else torch.zeros(0, 3, dtype=torch.long)
    is_text = cat["modality"] == TEXT
    # text_loss at s: s and s+1 are text, and the target token s+1 is marked for loss
    text_loss = torch.zeros_like(is_text)
    text_loss[:-1] = is_text[:-1] & is_text[1:] & cat["loss"][1:].bool()
    latent_loss = cat["noisy"].bool() & ~is_text
    return DocLayout(tokens=cat["tokens"], modality=cat["modality"], unit=cat["unit"],
                     noisy=cat["noisy"].bool(), pos=pos, text_loss=text_loss, latent_loss=latent_loss,
                     latents=torch.cat(latents) if latents else torch.zeros(0, 0))


def pack_rows(rows: Sequence[Sequence[DocLayout]], seq_len: int, pad_id: int = PAD) -> PackedBatch:
    """Pack documents into rows of `seq_len` tokens (row r holds rows[r] in order), padding with doc=-1.

    Timesteps are 0 (clean); `model.diffusion.assign_timesteps` draws them.
    """
    fields = {k: [] for k in ("tokens", "modality", "doc", "unit", "noisy", "pos", "text_loss", "latent_loss")}
    latents = []
    for r, docs in enumerate(rows):
        length = sum(len(d) for d in docs)
        if length > seq_len:
            raise ValueError(f"pack_rows: row {r} holds {length} tokens, more than seq_len={seq_len}")
        pad = seq_len - length

        def cat(name, fill, dtype=torch.long):
            tail = torch.full((pad,) if name != "pos" else (pad, 3), fill, dtype=dtype)
            return torch.cat([getattr(d, name) for d in docs] + [tail]) if docs else tail

        fields["tokens"].append(cat("tokens", pad_id))
        fields["modality"].append(cat("modality", TEXT))
        fields["unit"].append(cat("unit", 0))
        fields["pos"].append(cat("pos", 0))
        for name in ("noisy", "text_loss", "latent_loss"):
            fields[name].append(cat(name, False, torch.bool))
        fields["doc"].append(torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)]
                                       + [torch.full((pad,), -1)]))
        latents += [d.latents for d in docs if d.latents.shape[0]]
    out = {k: torch.stack(v) for k, v in fields.items()}
    lat = torch.cat(latents) if latents else torch.zeros(0, 0)
    return PackedBatch(**out, latents=lat.float(), timestep=torch.zeros(lat.shape[0]))
