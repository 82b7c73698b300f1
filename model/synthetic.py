"""Synthetic interleaved documents (random text ids, random latents) for demos, tests and benches."""
from __future__ import annotations

import torch

from model.diffusion import assign_timesteps
from model.layout import LatentSegment, LayoutSpec, TextSegment, layout_document, pack_rows
from model.packed_batch import PackedBatch
from model.special_tokens import SPECIAL_TOKENS


def caption_image_document(cfg, text_len: int, latent_hw: int, generator: torch.Generator,
                           frames: int = 0, role: str = "generate", tail_len: int = 0) -> list:
    """[caption][image or video latent][tail text] with random ids and N(0,1) latents;
    a part of length 0 is left out."""
    lo = len(SPECIAL_TOKENS)

    def ids(n):
        return torch.randint(lo, cfg.vocab_size, (n,), generator=generator).tolist()

    segs = [TextSegment(ids(text_len))] if text_len else []
    if latent_hw:  # 0 = a text-only document
        shape = (cfg.latent_channels,) + ((frames,) if frames else ()) + (latent_hw, latent_hw)
        segs.append(LatentSegment(torch.randn(shape, generator=generator), role))
    return segs + ([TextSegment(ids(tail_len))] if tail_len else [])


def synthetic_batch(cfg, batch_size: int, text_len: int, latent_hw: int, seed: int = 0,
                    seq_len: int = 0, frames: int = 0, tail_len: int = 0) -> PackedBatch:
    """One caption+latent document per row, laid out in the model's mode, timesteps drawn."""
    g = torch.Generator().manual_seed(seed)
    spec = LayoutSpec.from_model_config(cfg)
    docs = [layout_document(caption_image_document(cfg, text_len, latent_hw, g, frames, tail_len=tail_len), spec)
            for _ in range(batch_size)]
    seq_len = seq_len or max(len(d) for d in docs)
    batch = pack_rows([[d] for d in docs], seq_len)
    from model.diffusion import Diffusion
    return assign_timesteps(batch, Diffusion(cfg), g)
