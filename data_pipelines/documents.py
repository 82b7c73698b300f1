"""Decoded shard samples -> laid-out documents (DocLayout) and packing them into rows."""
from __future__ import annotations

import hashlib
import struct
from typing import Union

import torch

from model.layout import DocLayout, LatentSegment, LayoutSpec, TextSegment, layout_document
from model.special_tokens import BOS, EOS


def stateless_uniform(*keys: int) -> float:
    """A uniform [0, 1) number determined by integer keys (no generator state to save)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(keys)}q", *keys), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def build_document(segments: list[dict], spec: LayoutSpec, role: str, drop_caption: bool,
                   add_bos_eos: bool, image_first: bool = False) -> Union[list[int], DocLayout]:
    """Lay out one decoded sample. A text-only document stays a list of token ids (the packer
    may split it between rows); a document with latents becomes its (indivisible) DocLayout.
    `image_first` (image-to-text): every caption (text directly before a latent) is put after its
    latent, which is laid out clean (`context`: no diffusion loss) for the caption to read; such a
    caption is the target, so it is never dropped. Latents without a caption keep `role`."""
    segs = []
    i = 0
    while i < len(segments):
        seg = segments[i]
        captioned = "tokens" in seg and i + 1 < len(segments) and "latent" in segments[i + 1]
        if captioned and image_first:
            segs += [LatentSegment(torch.from_numpy(segments[i + 1]["latent"]).float(), "context"),
                     TextSegment(seg["tokens"])]
            i += 2
            continue
        if "tokens" in seg:
            if not (captioned and drop_caption and role != "context"):
                segs.append(TextSegment(seg["tokens"]))
        else:
            segs.append(LatentSegment(torch.from_numpy(seg["latent"]).float(), role))
        i += 1
    if add_bos_eos:
        segs = [TextSegment([BOS])] + segs + [TextSegment([EOS])]
    if all(isinstance(s, TextSegment) for s in segs):
        return [int(t) for s in segs for t in s.tokens]
    return layout_document(segs, spec)


def text_chunk(ids: list[int], start: int, end: int, spec: LayoutSpec) -> DocLayout:
    return layout_document([TextSegment(ids[start:end])], spec)


def best_fit(lengths: list[int], seq_len: int) -> list[int]:
    """Indices of buffered documents for one row: the oldest always (so none waits forever),
    then repeatedly the longest one that still fits (ties: the older). Depends only on the
    buffer, so a resumed packer fed the same documents makes the same rows."""
    chosen, room = [0], seq_len - min(lengths[0], seq_len)
    for i in sorted(range(1, len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] <= room:
            chosen.append(i)
            room -= lengths[i]
            if room == 0:
                break
    return sorted(chosen)


def timestep_generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(stateless_uniform(*keys) * 2 ** 62))
