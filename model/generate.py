"""Text generation with a KV cache (or without, to check it): continuing a prompt, and captioning
latents (image-to-text: the image laid out clean, first, as image-first training documents are)."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from model.layout import DocLayout, LatentSegment, LayoutSpec, TextSegment, layout_document, pack_rows
from model.special_tokens import BOI, BOS, BOV, EOS


def check_context(model, length: int, what: str) -> None:
    if length > model.cfg.max_seq_len:
        raise ValueError(f"{what}: {length} tokens, more than the model's context (model.max_seq_len="
                         f"{model.cfg.max_seq_len})")


def text_batch(ids: Sequence[int], start: int, spec: LayoutSpec, device):
    """One row of text tokens placed at running index `start` of document 0."""
    return pack_rows([[layout_document([TextSegment(list(ids))], spec).shifted(start)]], len(ids)).to(device)


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Greedy when temperature == 0, else nucleus sampling from softmax(logits / temperature)."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate_text(model, prompt: Sequence[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int = 0, use_cache: bool = True, stop: Optional[Sequence[int]] = (EOS,)) -> list[int]:
    """Continue `prompt` (token ids; <bos> is put before it) by up to max_new_tokens tokens."""
    spec = LayoutSpec.from_model_config(model.cfg)
    device = next(model.parameters()).device
    ids = [BOS] + [int(t) for t in prompt]
    check_context(model, len(ids) + max_new_tokens, "prompt + max_new_tokens")
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    cache, pending, start = None, ids, 0
    while len(out) < max_new_tokens:
        if use_cache:
            o, cache = model.step(text_batch(pending, start, spec, device), cache=cache, extend=True)
            start += len(pending)
        else:
            o, _ = model.step(text_batch(ids + out, 0, spec, device))
        token = sample_token(model.lm_head(o.hidden[0, -1]), temperature, top_p, gen)
        out.append(token)
        pending = [token]
        if stop and token in stop:
            break
    return out


def caption_document(latent: torch.Tensor, caption: Sequence[int], spec: LayoutSpec) -> DocLayout:
    """`<bos> <boi> clean latent <eoi>` + caption, as an image-first training document lays it out."""
    return layout_document([TextSegment([BOS]), LatentSegment(latent, "context"), TextSegment(list(caption))], spec)


@torch.no_grad()
def caption_latents(model, latents: torch.Tensor, max_new_tokens: int = 16, temperature: float = 0.0,
                    top_p: float = 1.0, seed: int = 0, use_cache: bool = True,
                    stop: Sequence[int] = (EOS, BOI, BOV), seeds: Optional[Sequence[int]] = None) -> list[list[int]]:
    """Captions (token ids, without the stop token: the document's end, or the next image or video of
    an interleaved document) of latents (n, C, H, W) or (n, C, T, H, W) of one shape: the rows run
    together, one token each per step, until every row stopped. With the cache, the image is run once
    and each new token attends to it; `use_cache=False` recomputes the whole document at every token
    (to check the cache). Row r samples from its own generator, seeded `seeds[r]` (default seed + r),
    so its caption does not depend on the rows beside it."""
    spec = LayoutSpec.from_model_config(model.cfg)
    device = next(model.parameters()).device
    latents = latents.float().cpu()
    prefix = caption_document(latents[0], [], spec)  # every row's layout (one shape): only the values differ
    check_context(model, len(prefix) + max_new_tokens, "image + max_new_tokens")
    gens = [torch.Generator().manual_seed(int(x)) for x in (seeds if seeds is not None else
                                                             range(seed, seed + len(latents)))]
    fed: list[list[int]] = [[] for _ in latents]  # tokens drawn per row, including any after its stop
    cache, batch = None, pack_rows([[caption_document(lat, [], spec)] for lat in latents], len(prefix)).to(device)
    next_unit, next_pos = int(prefix.unit[-1]) + 1, int(prefix.pos[-1, 0]) + 1
    for k in range(max_new_tokens):
        if use_cache:
            o, cache = model.step(batch, cache=cache, extend=True)
        else:
            full = [caption_document(lat, ids, spec) for lat, ids in zip(latents, fed)]
            o, _ = model.step(pack_rows([[d] for d in full], len(full[0])).to(device))
        logits = model.lm_head(o.hidden[:, -1])
        for r in range(len(latents)):
            fed[r].append(sample_token(logits[r], temperature, top_p, gens[r]))
        if all(any(t in stop for t in ids) for ids in fed):
            break
        # each row's new token, at its place after the image (units count blocks, positions the grid)
        rows = [layout_document([TextSegment(ids[-1:])], spec) for ids in fed]
        batch = pack_rows([[dataclasses.replace(d, unit=d.unit + next_unit + k, pos=d.pos + next_pos + k)]
                           for d in rows], 1).to(device)
    return [ids[:min((ids.index(t) for t in stop if t in ids), default=len(ids))] for ids in fed]
