"""Memory of one reader streaming large shards over HTTP, by data.shards_in_flight (F).

    python bench/data_memory.py [--shard-mb 200] [--shards 8] [--in-flight 1 2 4] [--groups 2] [--source http|local]

Writes `--shards` shards of about `--shard-mb` MB each (a caption and a 16x64x64 float16 latent per
sample, 128 KB; not timed), serves them with data_pipelines.transport.fault_server on 127.0.0.1 and,
for each F, reads `--groups` groups of F shards with one reader (one rank, no worker: the reader is
the process) in a fresh process. Reported per F: the reader's resident memory (VmRSS) before its
first shard and at its peak (VmHWM), and the peak of its spill files (downloaded shards waiting on
disk, data.spill_dir), in MB and in shards.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SAMPLE_SHAPE = (16, 64, 64)


def write_set(out: Path, shards: int, shard_mb: int) -> int:
    """A shard set of `shards` shards of ~shard_mb MB; returns samples per shard."""
    from data_pipelines.shards import ShardSetWriter
    per_shard = max(1, shard_mb * 10**6 // (2 * int(np.prod(SAMPLE_SHAPE))))
    rng = np.random.default_rng(0)
    writer = ShardSetWriter(out, per_shard)
    for i in range(shards * per_shard):
        doc = {"segments": [{"text": "a sample", "tokens": [20 + i % 50, 30, 40]},
                            {"latent": "lat0.npy", "kind": "image", "shape": list(SAMPLE_SHAPE)}]}
        writer.write(f"s{i:07d}", doc, {"lat0.npy": rng.standard_normal(SAMPLE_SHAPE, dtype=np.float32)
                                        .astype(np.float16)})
    writer.close(latent_channels=SAMPLE_SHAPE[0], tokenizer={"vocab_size": 256})
    return per_shard


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def spill_bytes() -> int:
    """Bytes in this process's open unlinked temporary files (the spill files)."""
    total = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").endswith("(deleted)"):
                total += os.stat(f"/proc/self/fd/{fd}").st_size
        except OSError:
            pass
    return total


def read(path: str, in_flight: int, samples: int) -> dict:
    """One reader over `path` until `samples` samples went by; memory figures in MB."""
    from data_pipelines.config import DataConfig, DatasetConfig
    from data_pipelines.loader import PackedLoader
    from model.model_config import ModelConfig
    mc = ModelConfig(vocab_size=256, latent_channels=SAMPLE_SHAPE[0], patch_size=4)
    cfg = DataConfig(datasets=[DatasetConfig(path=path)], seq_len=1024, num_workers=0, shards_in_flight=in_flight,
                     num_epochs=1, caption_dropout=0.0)
    loader = PackedLoader(cfg, mc, batch_size=4)
    before, spill_peak, seen = status_mb("VmRSS"), 0, 0
    for _ in loader:
        seen += sum(1 for row in loader.last_keys for _ in row)
        spill_peak = max(spill_peak, spill_bytes())
        if seen >= samples:
            break
    return {"rss_before": before, "rss_peak": status_mb("VmHWM"), "spill_peak": spill_peak / 1e6, "samples": seen}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shard-mb", type=int, default=200)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--in-flight", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--groups", type=int, default=2, help="groups of F shards each reader reads")
    p.add_argument("--source", default="http", choices=["http", "local"])
    p.add_argument("--child", nargs=3, metavar=("PATH", "F", "SAMPLES"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(read(args.child[0], int(args.child[1]), int(args.child[2]))))
        return
    from data_pipelines.transport.fault_server import FaultServer
    with tempfile.TemporaryDirectory() as tmp:
        per_shard = write_set(Path(tmp) / "set", args.shards, args.shard_mb)
        shard_mb = (Path(tmp) / "set" / "shard-000000.tar").stat().st_size / 1e6
        server = FaultServer(tmp) if args.source == "http" else None
        path = server.url("set") if server else str(Path(tmp) / "set")
        rows = []
        for f in args.in_flight:
            samples = min(args.groups * f, args.shards) * per_shard
            out = subprocess.run([sys.executable, __file__, "--child", path, str(f), str(samples)], check=True,
                                 capture_output=True, text=True).stdout
            rows.append((f, json.loads(out.strip().splitlines()[-1])))
        if server:
            server.stop()
    print(f"source={args.source} shards={args.shards} x {shard_mb:.0f} MB ({per_shard} samples of "
          f"{'x'.join(map(str, SAMPLE_SHAPE))} float16) groups={args.groups}")
    print(f"{'F':>3s} {'samples':>8s} {'RSS before MB':>14s} {'RSS peak MB':>12s} {'peak - before':>14s} "
          f"{'spill peak MB':>14s} {'spill shards':>13s}")
    for f, r in rows:
        print(f"{f:3d} {r['samples']:8d} {r['rss_before']:14.0f} {r['rss_peak']:12.0f} "
              f"{r['rss_peak'] - r['rss_before']:14.0f} {r['spill_peak']:14.0f} {r['spill_peak'] / shard_mb:13.2f}")


if __name__ == "__main__":
    main()
