"""Join the parts of a split extraction into one shard manifest.

    python -m data_pipelines.merge_shards OUT

OUT is the --out of every task of `data_pipelines.write_shards --source webdataset|parquet`. A task
that finds every input unit finished when it ends merges by itself; on a shared file system whose
listings lag (NFS), two tasks ending together may each miss the other's part, so a Slurm extraction
ends with this as a step of its own (slurm/write_shards.sbatch).
"""
from __future__ import annotations

import argparse
import sys

from data_pipelines.ingest.parts import merge_parts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the extraction's --out folder")
    p.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="refuse when more of all the tasks' samples were skipped")
    a = p.parse_args(argv)
    try:
        m = merge_parts(a.out, a.max_bad_fraction)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{k} {v}" for k, v in m.skipped.items()) or "none"
    print(f"wrote {a.out}/manifest.json: {m.num_samples} samples in {len(m.shards)} shards, skipped: {skipped} "
          f"(fingerprint {m.fingerprint})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
