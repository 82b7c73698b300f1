"""The data deal at internet scale, measured in simulation (issue 29): synthetic manifests of 100k and
1M shards (2,000-8,000 samples each), dealt with the loader's own order.py code to 1,024, 4,096 and
16,384 slots (ranks x workers), data.shards_in_flight 4.

    .venv/bin/python bench/deal_at_scale.py [--shards 100000 1000000] [--slots 1024 4096 16384]

Columns: time to deal (each slot's share of an epoch, and every slot's first group of positions, as
each reader computes at its start), the saved state's JSON size (two datasets, full packing buffers)
and the time to build and serialise it (not to write it), the time to fold a state stopped midway into another layout (a quarter of
the slots, shards_in_flight 2) and deal every new slot its first group, and each slot's share of an
epoch (samples, max / min).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipelines.loader_state import state_bytes  # noqa: E402
from data_pipelines.order import Dealing, DatasetOrder  # noqa: E402
from pretrain.plan.deal import cursors_midway, pulled, slot_samples, time_fold  # noqa: E402


def row(shards: int, slots: int, in_flight: int = 4) -> dict:
    sizes = np.random.default_rng(0).integers(2000, 8001, shards)
    order = DatasetOrder(sizes.tolist(), seed=0, shuffle=True, shards_in_use=2 * in_flight + 2)
    start = time.perf_counter()
    share = slot_samples(order, slots, in_flight)
    dealing = Dealing(order, slots, 0, 0, in_flight)
    for slot in range(slots):
        dealing.remaining(slot, 0, {})
    deal_s = time.perf_counter() - start
    start = time.perf_counter()
    size = state_bytes(slots, 2, 32)
    save_s = time.perf_counter() - start
    cursors = cursors_midway(order, slots, in_flight)
    fold_s, base = time_fold(order, slots, in_flight, max(1, slots // 4), 2, cursors)
    assert sum(iv.count() for iv in base.values()) == pulled(order, slots, in_flight, cursors)
    assert int(share.sum()) == order.num_samples
    return {"shards": shards, "slots": slots, "deal_s": deal_s, "state_bytes": size, "save_s": save_s,
            "fold_s": fold_s, "share_max_min": float(share.max() / share.min())}


def main(argv=None) -> int:
    a = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--shards", type=int, nargs="+", default=[100_000, 1_000_000])
    a.add_argument("--slots", type=int, nargs="+", default=[1024, 4096, 16384])
    a.add_argument("--json", action="store_true")
    args = a.parse_args(argv)
    print("| shards | slots | deal s | state MB | save s | fold + re-deal s | share max/min |")
    print("|---|---|---|---|---|---|---|")
    for shards in args.shards:
        for slots in args.slots:
            r = row(shards, slots)
            print(json.dumps(r) if args.json else
                  f"| {shards:,} | {slots:,} | {r['deal_s']:.2f} | {r['state_bytes'] / 1e6:.1f} | {r['save_s']:.2f} | "
                  f"{r['fold_s']:.2f} | {r['share_max_min']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
