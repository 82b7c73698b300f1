"""The global, seed-determined sample order and how it is dealt to loader slots.

Per dataset and epoch e, the order is: shards in a seeded permutation, samples inside each
shard in a seeded permutation. A sample's *position* p in [0, N) is its index in that
order; (epoch, p) names it independently of how many ranks or workers read.

The order is cut into *units* of contiguous positions: one shard each when there are at
least S x F shards (S = ranks x workers "slots", F = `data.shards_in_flight`), else S x F
equal slices of the epoch (one sample each when N < S x F), so every slot gets its share
and a shard is fetched by about S x F / shards slots. Unit u = e * units_per_epoch + i is
read by slot u % S. A slot reads its units F at a time: its g-th *group* is its units
gF .. gF+F-1, their remaining positions merged in a seeded order that keeps each unit's
own order, so a slot interleaves F shards (shards are often clustered by source). A
slot's progress is a cursor (g, q): it has pulled its groups before the g-th and the first
q positions of the g-th's merged order.

What has been consumed is kept as `Intervals` of positions per epoch ("base"); a slot
skips positions in the base. On a change of S or F the slots' cursors are folded into the
base (`fold_cursors`) and the remaining positions are dealt to the new slots: nothing seen
is repeated, nothing unseen is skipped.
"""
from __future__ import annotations

import bisect
import functools
from typing import Iterable, Optional

import numpy as np


class Intervals:
    """A set of integers as sorted, disjoint half-open ranges [a, b); bulk operations are one pass."""

    def __init__(self, ranges: Iterable = ()):
        self.starts: list[int] = []
        self.ends: list[int] = []
        self._arrays: Optional[tuple] = None  # starts and ends as arrays, for `contains` (None: stale)
        self.add_ranges(ranges)

    def __getstate__(self) -> dict:  # (the arrays are a cache: not sent to workers)
        return {"starts": self.starts, "ends": self.ends}

    def __setstate__(self, state: dict) -> None:
        self.starts, self.ends, self._arrays = state["starts"], state["ends"], None

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self.starts, self.ends))

    def add(self, a: int, b: Optional[int] = None) -> None:
        b = a + 1 if b is None else b
        if b <= a:
            return
        i = bisect.bisect_left(self.ends, a)  # the first range that ends at or after a
        j = bisect.bisect_right(self.starts, b)  # ranges from i to j touch [a, b)
        if i < j:
            a, b = min(a, self.starts[i]), max(b, self.ends[j - 1])
        self.starts[i:j], self.ends[i:j] = [a], [b]
        self._arrays = None

    def add_ranges(self, ranges: Iterable) -> None:
        """Add many [a, b) at once (sorted and merged with the set in one pass)."""
        merged: list[list[int]] = []
        for a, b in sorted([*zip(self.starts, self.ends), *((int(a), int(b)) for a, b in ranges)]):
            if b <= a:
                continue
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.starts, self.ends = [a for a, _ in merged], [b for _, b in merged]
        self._arrays = None

    def add_positions(self, positions: np.ndarray) -> None:
        """Add every position of an array, as runs of consecutive ones."""
        self.add_ranges(position_runs(positions))

    def remove_positions(self, positions: Iterable[int]) -> None:
        """Take out every listed position (one pass over the ranges)."""
        cuts = sorted(set(positions))
        starts, ends, c = [], [], 0
        for a, b in zip(self.starts, self.ends):
            while c < len(cuts) and cuts[c] < a:
                c += 1
            while c < len(cuts) and cuts[c] < b:
                if cuts[c] > a:
                    starts.append(a)
                    ends.append(cuts[c])
                a, c = cuts[c] + 1, c + 1
            if a < b:
                starts.append(a)
                ends.append(b)
        self.starts, self.ends = starts, ends
        self._arrays = None

    def __contains__(self, p: int) -> bool:
        i = bisect.bisect_right(self.starts, p) - 1
        return i >= 0 and p < self.ends[i]

    def contains(self, positions: np.ndarray) -> np.ndarray:
        """A boolean array: which positions are in the set."""
        if not self.starts:
            return np.zeros(len(positions), bool)
        if self._arrays is None:
            self._arrays = (np.asarray(self.starts), np.asarray(self.ends))
        starts, ends = self._arrays
        i = np.searchsorted(starts, positions, side="right") - 1
        return (i >= 0) & (positions < ends[np.maximum(i, 0)])

    def covers_range(self, a: int, b: int) -> bool:
        """Whether every position in [a, b) is in the set."""
        i = bisect.bisect_right(self.starts, a) - 1
        return b <= a or (i >= 0 and self.ends[i] >= b)

    def covers(self, n: int) -> bool:
        return n == 0 or (len(self.starts) == 1 and self.starts[0] <= 0 and self.ends[0] >= n)

    def count(self) -> int:
        return sum(self.ends) - sum(self.starts)

    def to_list(self) -> list:
        return [[a, b] for a, b in zip(self.starts, self.ends)]


def position_runs(positions: np.ndarray) -> list[tuple[int, int]]:
    """The positions of an array as [a, b) runs of consecutive ones."""
    p = np.sort(np.asarray(positions, dtype=np.int64))
    p = p[np.r_[True, p[1:] != p[:-1]]] if len(p) else p  # (distinct: np.unique hashes, slower)
    if not len(p):
        return []
    cut = np.flatnonzero(np.diff(p) != 1) + 1
    return list(zip(p[np.r_[0, cut]].tolist(), (p[np.r_[cut - 1, len(p) - 1]] + 1).tolist()))


class DatasetOrder:
    """The per-epoch order of one dataset's samples (shard sizes from its manifest)."""

    def __init__(self, shard_sizes: list[int], seed: int, shuffle: bool = True, shards_in_use: int = 8):
        self.sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.num_samples = int(self.sizes.sum())
        self.seed, self.shuffle, self.shards_in_use = seed, shuffle, shards_in_use
        self._caches()

    def _caches(self) -> None:
        # per instance (one on the class would be shared by every dataset): two epochs' shard orders,
        # and the in-shard permutations of the shards a reader uses, in two epochs
        self.epoch = functools.lru_cache(maxsize=4)(self._epoch)
        self.within = functools.lru_cache(maxsize=2 * self.shards_in_use)(self._within)

    def __getstate__(self) -> dict:  # workers started by spawn/forkserver get the order pickled
        return {k: v for k, v in self.__dict__.items() if k not in ("epoch", "within")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._caches()

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard permutation, start position of each permuted shard + total at the end)."""
        perm = (np.random.default_rng([self.seed, e]).permutation(len(self.sizes)) if self.shuffle
                else np.arange(len(self.sizes)))
        return perm, np.concatenate([[0], np.cumsum(self.sizes[perm])])

    def _within(self, e: int, shard: int) -> np.ndarray:
        n = int(self.sizes[shard])
        perm = np.random.default_rng([self.seed, e, shard, 1]).permutation(n) if self.shuffle else np.arange(n)
        return perm.astype(np.int32) if n < 2 ** 31 else perm

    def locate(self, e: int, p: int) -> tuple[int, int]:
        """Position p of epoch e -> (shard index, sample index inside the shard's stored order)."""
        perm, starts = self.epoch(e)
        i = int(np.searchsorted(starts, p, side="right")) - 1
        shard = int(perm[i])
        return shard, int(self.within(e, shard)[p - starts[i]])


MERGE = 2  # seed domain of a group's merge order


class Dealing:
    """How one dataset's units are dealt to `slots` slots from `first_epoch` on, `in_flight` at a time."""

    def __init__(self, order: DatasetOrder, slots: int, first_epoch: int = 0, num_epochs: int = 0,
                 in_flight: int = 1):
        self.order, self.slots, self.in_flight = order, slots, in_flight
        self.whole_shards = len(order.sizes) >= slots * in_flight
        self.units_per_epoch = (len(order.sizes) if self.whole_shards
                                else max(1, min(order.num_samples, slots * in_flight)))
        self.first_epoch, self.num_epochs = first_epoch, num_epochs

    def unit(self, slot: int, k: int) -> tuple[int, int]:
        """(epoch, unit index in the epoch) of the slot's k-th unit."""
        u = self.first_epoch * self.units_per_epoch + slot + k * self.slots
        return divmod(u, self.units_per_epoch)

    def group(self, slot: int, g: int) -> list[tuple[int, int]]:
        """(epoch, unit index) of the units of the slot's g-th group."""
        return [self.unit(slot, k) for k in range(g * self.in_flight, (g + 1) * self.in_flight)]

    def exhausted(self, epoch: int) -> bool:
        return bool(self.num_epochs) and epoch >= self.num_epochs

    def group_exhausted(self, slot: int, g: int) -> bool:
        return self.exhausted(self.unit(slot, g * self.in_flight)[0])

    def unit_start(self, e: int, i: int) -> int:
        """First position of unit i of epoch e (i = units_per_epoch: the epoch's end)."""
        if not self.whole_shards:
            return i * self.order.num_samples // self.units_per_epoch
        return int(self.order.epoch(e)[1][i])

    def unit_range(self, e: int, i: int, j: Optional[int] = None) -> tuple[int, int]:
        """Positions [a, b) of units i..j-1 (default: unit i alone) of epoch e."""
        return self.unit_start(e, i), self.unit_start(e, i + 1 if j is None else j)

    def group_ranges(self, slot: int, g: int) -> list[tuple[int, int, int]]:
        """(epoch, a, b) of each unit of the slot's g-th group in an epoch still to read: positions [a, b)."""
        return [(e, *self.unit_range(e, i)) for e, i in self.group(slot, g) if not self.exhausted(e)]

    def group_shards(self, slot: int, g: int, base: Optional[dict[int, Intervals]] = None) -> list[int]:
        """The shards the slot's g-th group reads, in order; with `base`, only those it still reads
        something of (positions not in the base)."""
        out = []
        for e, a, b in self.group_ranges(slot, g):
            perm, starts = self.order.epoch(e)
            i, j = np.searchsorted(starts, [a, b - 1], side="right") - 1 if b > a else (0, -1)
            for k in range(int(i), int(j) + 1):
                lo, hi = max(a, int(starts[k])), min(b, int(starts[k + 1]))
                if not base or e not in base or not base[e].covers_range(lo, hi):
                    out.append(int(perm[k]))
        return list(dict.fromkeys(out))

    def remaining(self, slot: int, g: int, base: dict[int, Intervals]) -> tuple[np.ndarray, np.ndarray]:
        """(epochs, positions) of the slot's g-th group not in the base, in the group's merge order."""
        runs = []
        for e, a, b in self.group_ranges(slot, g):
            p = np.arange(a, b, dtype=np.int64)
            runs.append((e, p[~base[e].contains(p)] if e in base else p))
        if not runs:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        label = np.repeat(np.arange(len(runs)), [len(p) for _, p in runs])
        if self.order.shuffle:
            first = self.first_epoch * self.units_per_epoch + slot + g * self.in_flight * self.slots
            rng = np.random.default_rng([self.order.seed, MERGE, self.slots, self.in_flight, first])
            label = rng.permutation(label)
        else:  # round robin
            rank = np.concatenate([np.arange(len(p)) for _, p in runs])
            label = label[np.lexsort((label, rank))]
        epochs, positions = np.empty(len(label), np.int32), np.empty(len(label), np.int64)
        where = np.argsort(label, kind="stable")  # the merged places of each unit's positions, in order
        positions[where] = np.concatenate([p for _, p in runs])
        epochs[where] = np.concatenate([np.full(len(p), e) for e, p in runs])
        return epochs, positions

    def fold_cursors(self, base: dict[int, Intervals], cursors: dict[int, tuple[int, int]],
                     unconsumed: Iterable[tuple[int, int]]) -> dict[int, Intervals]:
        """Base + everything the slots pulled (cursor (g, q) per slot) - `unconsumed` (e, p)."""
        out = {e: Intervals(iv.ranges) for e, iv in base.items()}
        if not cursors:
            return out
        gmin = min(g for g, _ in cursors.values())
        upe = self.units_per_epoch
        lo = self.first_epoch * upe
        hi = lo + gmin * self.in_flight * self.slots  # units [lo, hi) were pulled by their slots
        runs: dict[int, list] = {}  # per epoch, ranges pulled: added at once (one sort, however many slots)
        for e in range(lo // upe, -(-hi // upe)):
            if self.exhausted(e):
                break
            i0, i1 = max(lo, e * upe) - e * upe, min(hi, (e + 1) * upe) - e * upe
            runs.setdefault(e, []).append(self.unit_range(e, i0, i1))
        for slot, (g, q) in cursors.items():
            for e, a, b in (r for gg in range(gmin, g) for r in self.group_ranges(slot, gg)):
                runs.setdefault(e, []).append((a, b))
            epochs, positions = (a[:q] for a in self.remaining(slot, g, base))
            for e in ([int(epochs[0])] if len(epochs) and epochs.min() == epochs.max() else np.unique(epochs)):
                runs.setdefault(int(e), []).extend(position_runs(positions[epochs == e]))
        for e, ranges in runs.items():
            out.setdefault(e, Intervals()).add_ranges(ranges)
        by_epoch: dict[int, list[int]] = {}
        for e, p in unconsumed:
            by_epoch.setdefault(e, []).append(p)
        for e, ps in by_epoch.items():
            if e in out:
                out[e].remove_positions(ps)
        return out

    def first_open_epoch(self, base: dict[int, Intervals]) -> int:
        """The first epoch (from first_epoch on) that the base does not cover whole."""
        e = self.first_epoch
        while e in base and base[e].covers(self.order.num_samples):
            e += 1
        return e
