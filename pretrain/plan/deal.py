"""The data deal at scale, on paper: how an epoch's shards are shared by slots (ranks x workers), and
what saving and folding the state of that many slots costs. Runs the loader's own `order.py`."""
from __future__ import annotations

import time

import numpy as np

from data_pipelines.order import Dealing, DatasetOrder


def slot_samples(order: DatasetOrder, slots: int, in_flight: int, epoch: int = 0) -> np.ndarray:
    """Samples each slot reads of epoch `epoch` (unit u of the run goes to slot u % slots)."""
    dealing = Dealing(order, slots, 0, 0, in_flight)
    upe = dealing.units_per_epoch
    if dealing.whole_shards:
        starts = order.epoch(epoch)[1]
    else:
        starts = np.arange(upe + 1, dtype=np.int64) * order.num_samples // upe
    owner = (epoch * upe + np.arange(upe)) % slots
    return np.bincount(owner, weights=np.diff(starts), minlength=slots).astype(np.int64)


def cursors_midway(order: DatasetOrder, slots: int, in_flight: int, seed: int = 0) -> dict[int, tuple[int, int]]:
    """A cursor per slot as a run stopped in the middle would leave them: each slot in its first two
    groups, part way through."""
    rng = np.random.default_rng(seed)
    dealing = Dealing(order, slots, 0, 0, in_flight)
    out = {}
    for slot in range(slots):
        g = int(rng.integers(0, 2))
        n = sum(b - a for _, a, b in dealing.group_ranges(slot, g))
        out[slot] = (g, int(rng.integers(0, n + 1)))
    return out


def pulled(order: DatasetOrder, slots: int, in_flight: int, cursors: dict[int, tuple[int, int]]) -> int:
    """How many positions the cursors have pulled (their groups before g whole, q of the g-th)."""
    dealing = Dealing(order, slots, 0, 0, in_flight)
    return sum(b - a for slot, (g, q) in cursors.items() for gg in range(g)
               for _, a, b in dealing.group_ranges(slot, gg)) + sum(q for _, q in cursors.values())


def time_fold(order: DatasetOrder, slots: int, in_flight: int, new_slots: int, new_in_flight: int,
              cursors: dict[int, tuple[int, int]]) -> tuple[float, dict]:
    """Seconds to fold the cursors into consumed positions and deal the rest to `new_slots` slots (the
    first group of each new slot), and the consumed positions."""
    start = time.perf_counter()
    base = Dealing(order, slots, 0, 0, in_flight).fold_cursors({}, cursors, ())
    again = Dealing(order, new_slots, 0, 0, new_in_flight)
    for slot in range(new_slots):
        again.remaining(slot, 0, base)
    return time.perf_counter() - start, base
