"""Decoded shard samples -> laid-out documents (DocLayout) and packing them into rows."""
from __future__ import annotations

import hashlib
import struct
from typing import Optional

import torch

from model.layout import DocLayout, LatentSegment, LayoutSpec, TextSegment, layout_document
from model.special_tokens import BOS, EOS


def stateless_uniform(*keys: int) -> float:
    """A uniform [0, 1) number determined by integer keys (no generator state to save)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(keys)}q", *keys), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def build_pieces(segments: list[dict], spec: LayoutSpec, seq_len: int, role: str, drop_caption: bool,
                 add_bos_eos: bool) -> list[DocLayout]:
    """Lay out one decoded sample; a text-only document longer than `seq_len` is cut into
    pieces of at most `seq_len` tokens. A document with latents that does not fit -> []."""
    segs = []
    for i, seg in enumerate(segments):
        if "tokens" in seg:
            caption = i + 1 < len(segments) and "latent" in segments[i + 1]
            if not (caption and drop_caption and role != "context"):
                segs.append(TextSegment(seg["tokens"]))
        else:
            segs.append(LatentSegment(torch.from_numpy(seg["latent"]).float(), role))
    if add_bos_eos:
        segs = [TextSegment([BOS])] + segs + [TextSegment([EOS])]
    if all(isinstance(s, TextSegment) for s in segs):
        ids = [t for s in segs for t in s.tokens]
        return [layout_document([TextSegment(ids[a:a + seq_len])], spec) for a in range(0, len(ids), seq_len)]
    doc = layout_document(segs, spec)
    return [doc] if len(doc) <= seq_len else []


def first_fit(lengths: list[int], seq_len: int) -> list[int]:
    """Indices of buffered documents for one row: the oldest always, then each later one that
    still fits, in buffer order. Depends only on the buffer, so a resumed packer that is fed
    the same documents makes the same rows."""
    chosen, room = [], seq_len
    for i, n in enumerate(lengths):
        if n <= room:
            chosen.append(i)
            room -= n
            if room == 0:
                break
    return chosen


def timestep_generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(stateless_uniform(*keys) * 2 ** 62))


def fill_fraction(rows_lengths: list[int], seq_len: int) -> Optional[float]:
    return sum(rows_lengths) / (seq_len * len(rows_lengths)) if rows_lengths else None
