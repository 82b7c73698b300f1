"""The global, seed-determined sample order and how it is dealt to loader slots.

Per dataset and epoch e, the order is: shards in a seeded permutation, samples inside each
shard in a seeded permutation. A sample's *position* p in [0, N) is its index in that
order; (epoch, p) names it independently of how many ranks or workers read.

The order is cut into *units* — one shard each (`shard` mode), or one sample each
(`sample` mode, used when there are fewer shards than slots, so no slot starves). Unit
u = e * units_per_epoch + i is read by slot u % S, where S = ranks x workers ("slots").
A slot's progress is a cursor (k, q): it has pulled its units before its k-th and the
first q remaining positions of its k-th.

What has been consumed is kept as `Intervals` of positions per epoch ("base"); a slot
skips positions in the base. On a change of S the slots' cursors are folded into the base
(`fold_cursors`) and the remaining positions are dealt to the new slots: nothing seen is
repeated, nothing unseen is skipped.
"""
from __future__ import annotations

import bisect
import functools
from typing import Iterable, Optional

import numpy as np


class Intervals:
    """A set of integers as sorted, disjoint half-open ranges [a, b)."""

    def __init__(self, ranges: Iterable = ()):
        self.ranges: list[list[int]] = []
        for a, b in ranges:
            self.add(a, b)

    def add(self, a: int, b: Optional[int] = None) -> None:
        b = a + 1 if b is None else b
        if b <= a:
            return
        starts = [r[0] for r in self.ranges]
        i = bisect.bisect_left(starts, a)
        if i > 0 and self.ranges[i - 1][1] >= a:
            i -= 1
        j = i
        while j < len(self.ranges) and self.ranges[j][0] <= b:
            a, b = min(a, self.ranges[j][0]), max(b, self.ranges[j][1])
            j += 1
        self.ranges[i:j] = [[a, b]]

    def remove(self, p: int) -> None:
        for i, (a, b) in enumerate(self.ranges):
            if a <= p < b:
                self.ranges[i:i + 1] = [r for r in ([a, p], [p + 1, b]) if r[1] > r[0]]
                return

    def __contains__(self, p: int) -> bool:
        i = bisect.bisect_right([r[0] for r in self.ranges], p) - 1
        return i >= 0 and p < self.ranges[i][1]

    def covers(self, n: int) -> bool:
        return n == 0 or (len(self.ranges) == 1 and self.ranges[0][0] <= 0 and self.ranges[0][1] >= n)

    def count(self) -> int:
        return sum(b - a for a, b in self.ranges)

    def to_list(self) -> list:
        return [list(r) for r in self.ranges]


class DatasetOrder:
    """The per-epoch order of one dataset's samples (shard sizes from its manifest)."""

    def __init__(self, shard_sizes: list[int], seed: int, shuffle: bool = True):
        self.sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.num_samples = int(self.sizes.sum())
        self.seed, self.shuffle = seed, shuffle

    @functools.lru_cache(maxsize=8)
    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard permutation, start position of each permuted shard + total at the end)."""
        perm = (np.random.default_rng([self.seed, e]).permutation(len(self.sizes)) if self.shuffle
                else np.arange(len(self.sizes)))
        return perm, np.concatenate([[0], np.cumsum(self.sizes[perm])])

    @functools.lru_cache(maxsize=64)
    def within(self, e: int, shard: int) -> np.ndarray:
        n = int(self.sizes[shard])
        return np.random.default_rng([self.seed, e, shard, 1]).permutation(n) if self.shuffle else np.arange(n)

    def locate(self, e: int, p: int) -> tuple[int, int]:
        """Position p of epoch e -> (shard index, sample index inside the shard's stored order)."""
        perm, starts = self.epoch(e)
        i = int(np.searchsorted(starts, p, side="right")) - 1
        shard = int(perm[i])
        return shard, int(self.within(e, shard)[p - starts[i]])


class Dealing:
    """How one dataset's units are dealt to `slots` slots, from `first_epoch` on."""

    def __init__(self, order: DatasetOrder, slots: int, first_epoch: int = 0, num_epochs: int = 0):
        self.order, self.slots = order, slots
        self.mode = "shard" if len(order.sizes) >= slots else "sample"
        self.units_per_epoch = len(order.sizes) if self.mode == "shard" else order.num_samples
        self.first_epoch, self.num_epochs = first_epoch, num_epochs

    def unit(self, slot: int, k: int) -> tuple[int, int]:
        """(epoch, unit index in the epoch) of the slot's k-th unit."""
        u = self.first_epoch * self.units_per_epoch + slot + k * self.slots
        return divmod(u, self.units_per_epoch)

    def exhausted(self, epoch: int) -> bool:
        return bool(self.num_epochs) and epoch >= self.num_epochs

    def unit_range(self, e: int, i: int, j: Optional[int] = None) -> tuple[int, int]:
        """Positions [a, b) of units i..j-1 (default: unit i alone) of epoch e."""
        j = i + 1 if j is None else j
        if self.mode == "sample":
            return i, j
        _, starts = self.order.epoch(e)
        return int(starts[i]), int(starts[j])

    def remaining(self, slot: int, k: int, base: dict[int, Intervals]) -> tuple[int, list[int]]:
        """(epoch, positions of the slot's k-th unit not in the base)."""
        e, i = self.unit(slot, k)
        a, b = self.unit_range(e, i)
        done = base.get(e)
        return e, [p for p in range(a, b) if done is None or p not in done]

    def fold_cursors(self, base: dict[int, Intervals], cursors: dict[int, tuple[int, int]],
                     unconsumed: Iterable[tuple[int, int]]) -> dict[int, Intervals]:
        """Base + everything the slots pulled (cursor (k, q) per slot) - `unconsumed` (e, p)."""
        out = {e: Intervals(iv.ranges) for e, iv in base.items()}
        if not cursors:
            return out
        kmin = min(k for k, _ in cursors.values())
        upe = self.units_per_epoch
        lo = self.first_epoch * upe
        hi = lo + kmin * self.slots  # units [lo, hi) were pulled by their slots
        for e in range(lo // upe, -(-hi // upe)):
            if self.exhausted(e):
                break
            i0, i1 = max(lo, e * upe) - e * upe, min(hi, (e + 1) * upe) - e * upe
            out.setdefault(e, Intervals()).add(*self.unit_range(e, i0, i1))
        for slot, (k, q) in cursors.items():
            for kk in range(kmin, k):
                e, i = self.unit(slot, kk)
                if not self.exhausted(e):
                    out.setdefault(e, Intervals()).add(*self.unit_range(e, i))
            e, rest = self.remaining(slot, k, base)
            if not self.exhausted(e):
                for p in rest[:q]:
                    out.setdefault(e, Intervals()).add(p)
        for e, p in unconsumed:
            if e in out:
                out[e].remove(p)
        return out

    def first_open_epoch(self, base: dict[int, Intervals]) -> int:
        """The first epoch (from first_epoch on) that the base does not cover whole."""
        e = self.first_epoch
        while e in base and base[e].covers(self.order.num_samples):
            e += 1
        return e
