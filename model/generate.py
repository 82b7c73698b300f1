"""Text generation with a KV cache (or without, to check it)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from model.layout import LayoutSpec, TextSegment, layout_document, pack_rows
from model.special_tokens import BOS, EOS


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
