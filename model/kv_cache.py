"""KV cache: keys/values of tokens already run, with the arrays the attention rule needs.

Positions live in `pos` and the mask depends only on (doc, unit, noisy), so cached tokens
may sit anywhere (rows of different prefix lengths are right-padded with doc = -1).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from model.packed_batch import PackedBatch


@dataclasses.dataclass
class KVCache:
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: k, v of shape B,Hkv,T,Dh (rotated)
    doc: torch.Tensor    # B,T
    unit: torch.Tensor   # B,T
    noisy: torch.Tensor  # B,T

    def __len__(self) -> int:
        return self.doc.shape[1]

    def key_arrays(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(doc, unit, noisy) of all keys: the cached tokens followed by the batch's."""
        return (torch.cat([self.doc, batch.doc], 1), torch.cat([self.unit, batch.unit], 1),
                torch.cat([self.noisy, batch.noisy], 1))

    def extended(self, new: list[tuple[torch.Tensor, torch.Tensor]], batch: PackedBatch) -> "KVCache":
        """A cache that also holds the batch's tokens (whose keys/values are `new`)."""
        layers = [(torch.cat([k0, k1], 2), torch.cat([v0, v1], 2)) for (k0, v0), (k1, v1) in zip(self.layers, new)]
        return KVCache(layers, *self.key_arrays(batch))

    @staticmethod
    def start(new: list[tuple[torch.Tensor, torch.Tensor]], batch: PackedBatch) -> "KVCache":
        return KVCache([(k.detach(), v.detach()) for k, v in new], batch.doc, batch.unit, batch.noisy)


def extend_cache(cache: Optional[KVCache], new, batch: PackedBatch) -> KVCache:
    return KVCache.start(new, batch) if cache is None else cache.extended(new, batch)
