"""The attention rule, written once, and the two back-ends that apply it.

    allow(q, k) = doc[q] == doc[k] != -1 and (
        (not noisy[k] and unit[k] < unit[q]) or
        (unit[k] == unit[q] and noisy[k] == noisy[q]))

`attention_mask` evaluates it densely (sdpa back-end, tests); `block_mask` hands the same
function to FlexAttention as a `mask_mod` (flex back-end, block-sparse on GPU).
Queries that may attend to nothing (padding) produce zeros in both back-ends.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

BACKENDS = ("auto", "flex", "sdpa")


def allow(q_doc, q_unit, q_noisy, k_doc, k_unit, k_noisy):
    """The attention rule, elementwise over broadcastable query/key arrays."""
    same_doc = (q_doc == k_doc) & (k_doc != -1)
    earlier_clean = ~k_noisy & (k_unit < q_unit)
    same_unit = (k_unit == q_unit) & (k_noisy == q_noisy)
    return same_doc & (earlier_clean | same_unit)


def attention_mask(doc: torch.Tensor, unit: torch.Tensor, noisy: torch.Tensor,
                   kv: Optional[tuple] = None) -> torch.Tensor:
    """BoolTensor[B, Sq, Sk]: may query q attend to key k. `kv` = (doc, unit, noisy) of the
    keys when they differ from the queries (a KV cache); default: the queries themselves."""
    k_doc, k_unit, k_noisy = kv if kv is not None else (doc, unit, noisy)
    return allow(doc[:, :, None], unit[:, :, None], noisy[:, :, None],
                 k_doc[:, None, :], k_unit[:, None, :], k_noisy[:, None, :])


def allowed_pairs(doc: torch.Tensor, unit: torch.Tensor, noisy: torch.Tensor, chunk: int = 1024) -> int:
    """Number of (query, key) pairs the rule allows in a batch (for FLOP counts), in row chunks."""
    total = 0
    for b in range(doc.shape[0]):
        k = (doc[b:b + 1], unit[b:b + 1], noisy[b:b + 1])
        for a in range(0, doc.shape[1], chunk):
            q = (doc[b:b + 1, a:a + chunk], unit[b:b + 1, a:a + chunk], noisy[b:b + 1, a:a + chunk])
            total += int(attention_mask(*q, kv=k).sum())
    return total


def block_mask(doc: torch.Tensor, unit: torch.Tensor, noisy: torch.Tensor,
               kv: Optional[tuple] = None, block_size: int = 128) -> BlockMask:
    """The same rule as a FlexAttention BlockMask (one per batch row, shared by heads)."""
    k_doc, k_unit, k_noisy = kv if kv is not None else (doc, unit, noisy)

    def mask_mod(b, h, q, k):
        return allow(doc[b, q], unit[b, q], noisy[b, q], k_doc[b, k], k_unit[b, k], k_noisy[b, k])

    B, Sq = doc.shape
    return create_block_mask(mask_mod, B, None, Sq, k_doc.shape[1], device=doc.device,
                             BLOCK_SIZE=block_size, _compile=doc.is_cuda)


def resolve_backend(name: str, device: torch.device, inference: bool = False) -> str:
    """'auto' = flex for training passes on CUDA; sdpa on CPU and for inference (no gradient:
    evaluation, sampling), whose varying lengths (prompts, a growing KV cache) would recompile
    the static-shape compiled flex kernel and its block mask for each new length."""
    if name not in BACKENDS:
        raise ValueError(f"attention: {name!r} is not one of {'|'.join(BACKENDS)}")
    if name == "auto":
        return "flex" if torch.device(device).type == "cuda" and not inference else "sdpa"
    return name


@dataclasses.dataclass
class AttentionBias:
    """A built mask for one forward pass, shared by every layer."""
    backend: str
    dense: Optional[torch.Tensor] = None      # B,1,Sq,Sk bool (sdpa), empty rows opened on the diagonal
    has_key: Optional[torch.Tensor] = None    # B,1,Sq,1 bool (sdpa): rows that may attend; None = all
    blocks: Optional[BlockMask] = None        # flex


def build_attention_bias(doc, unit, noisy, backend: str, kv: Optional[tuple] = None) -> AttentionBias:
    """Build the mask for `backend` ('flex' or 'sdpa'; resolve 'auto' first)."""
    if backend == "flex":
        return AttentionBias("flex", blocks=block_mask(doc, unit, noisy, kv))
    if backend != "sdpa":
        raise ValueError(f"attention: {backend!r} is not one of flex|sdpa")
    mask = attention_mask(doc, unit, noisy, kv)
    has_key = mask.any(-1, keepdim=True)
    if bool(has_key.all()):
        return AttentionBias("sdpa", dense=mask[:, None])
    # SDPA returns NaN for a row with no allowed key: open one key, then zero that row's output.
    mask = mask.clone()
    mask[..., 0] |= ~has_key[..., 0]
    return AttentionBias("sdpa", dense=mask[:, None], has_key=has_key[:, None])


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: AttentionBias) -> torch.Tensor:
    """q: B,H,Sq,Dh; k, v: B,Hkv,Sk,Dh (grouped-query when Hkv < H) -> B,H,Sq,Dh."""
    gqa = k.shape[1] != q.shape[1]
    if bias.backend == "flex":
        fn = _compiled_flex() if q.is_cuda else flex_attention
        return fn(q, k, v, block_mask=bias.blocks, enable_gqa=gqa)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.dense, enable_gqa=gqa)
    return out if bias.has_key is None else out * bias.has_key.to(out.dtype)
