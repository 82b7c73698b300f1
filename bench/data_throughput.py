"""Packed tokens per second from shards (digits + text mix), as the trainer would read them.

    python bench/data_throughput.py [--workers 2] [--seq-len 1024] [--batch 8] [--batches 200] \
        [--source local|http|pipe] [--shards-in-flight 4]

`--source http` serves the shard folders with data_pipelines.transport.fault_server on 127.0.0.1 (at
`--rate` bytes/s per connection if given, as a busy remote store would) and reads them by URL; `pipe`
reads them through `pipe:cat {shard}`. The table counts the shard requests made and the MB/s sent
while timed: the transport, beside the packing.

Builds a tokenizer and shards in a temporary folder first (not timed): scikit-learn digits
through the `pixels` encoder and text from the Debian python3.11-doc sources when installed
(else the standard library's documentation).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipelines.config import DataConfig, DatasetConfig  # noqa: E402
from data_pipelines.demo_data import text_corpus  # noqa: E402
from data_pipelines.loader import PackedLoader  # noqa: E402
from data_pipelines.sources import text_lines, iter_text_files  # noqa: E402
from data_pipelines.tokenizer import train_tokenizer  # noqa: E402
from data_pipelines.transport.fault_server import FaultServer  # noqa: E402
from data_pipelines.write_shards import write_shards  # noqa: E402
from model.model_config import ModelConfig  # noqa: E402

def build(root: Path, text_docs: int, per_shard: int) -> tuple[Path, Path, Path]:
    corpus = text_corpus(root)
    lines = list(text_lines(iter_text_files([corpus])))[:200000]
    tok = root / "tok.model"
    train_tokenizer(lines, tok, vocab_size=4000)
    common = dict(tokenizer=str(tok), encoder="pixels", channels=1, progress=False)
    write_shards("digits", str(root / "digits"), samples_per_shard=per_shard, **common)
    write_shards("text", str(root / "text"), samples_per_shard=per_shard, input=[str(corpus)], max_chars=4000,
                 num_samples=text_docs, **common)
    return tok, root / "digits", root / "text"


def transport(server, root: Path) -> tuple[int, int]:
    """(shard requests, bytes sent) of the server so far: each .tar request from its start to the end."""
    tars = [r for r in server.requests() if r["name"].endswith(".tar") and r["fault"] in (None, "rate")]
    return len(tars), sum((root / r["name"]).stat().st_size - r["start"] for r in tars)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--text-docs", type=int, default=2000)
    p.add_argument("--mode", default="monoformer", choices=["monoformer", "acdit"])
    p.add_argument("--digits-weight", type=float, default=0.5, help="mixture weight of digits (text: 1 - it)")
    p.add_argument("--source", default="local", choices=["local", "http", "pipe"])
    p.add_argument("--rate", type=float, default=0, help="with --source http: bytes/s the server sends per connection")
    p.add_argument("--samples-per-shard", type=int, default=256)
    p.add_argument("--shards-in-flight", type=int, default=DataConfig.shards_in_flight,
                   help="data.shards_in_flight: shards each worker interleaves")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tok, digits, text = build(Path(tmp), args.text_docs, args.samples_per_shard)
        server = FaultServer(tmp, {"*.tar": {"rate": args.rate}} if args.rate else {}) \
            if args.source == "http" else None
        if server is not None:
            digits, text = server.url("digits"), server.url("text")
        elif args.source == "pipe":
            digits, text = f"pipe:cat {digits}/{{shard}}", f"pipe:cat {text}/{{shard}}"
        mc = ModelConfig(vocab_size=4000, latent_channels=1, patch_size=2, mode=args.mode, block_size=4)
        cfg = DataConfig(datasets=[DatasetConfig(path=str(digits), weight=args.digits_weight),
                                   DatasetConfig(path=str(text), weight=1 - args.digits_weight)], mix_by="documents",
                         seq_len=args.seq_len, num_workers=args.workers, num_epochs=0,
                         shards_in_flight=args.shards_in_flight)
        loader = PackedLoader(cfg, mc, args.batch)
        it = iter(loader)
        for _ in range(5):  # start the workers
            next(it)
        sent = transport(server, Path(tmp)) if server else (0, 0)
        t = time.perf_counter()
        real = total = 0
        for _ in range(args.batches):
            b = next(it)
            total += b.tokens.numel()
            real += int((b.doc != -1).sum())
        dt = time.perf_counter() - t
        requests, sent = [b - a for a, b in zip(sent, transport(server, Path(tmp)) if server else (0, 0))]
        tars = list((Path(tmp) / "digits").glob("*.tar"))
        shard_kb = sum(f.stat().st_size for f in tars) / len(tars) / 1e3
        del it, loader  # the workers stop reading before the server goes
        if server is not None:
            server.stop()
    print(f"source={args.source} workers={args.workers} seq_len={args.seq_len} batch={args.batch} mode={args.mode} "
          f"shards_in_flight={args.shards_in_flight} digits weight={args.digits_weight} batches={args.batches} "
          f"rate={args.rate:g} B/s digit shard={shard_kb:.0f} KB")
    print(f"{'packed tokens/s':>16s} {'real tokens/s':>14s} {'fill':>6s} {'batches/s':>10s} {'seconds':>8s} "
          f"{'shard GETs':>10s} {'MB/s sent':>10s}")
    print(f"{total / dt:16.0f} {real / dt:14.0f} {real / total:6.1%} {args.batches / dt:10.1f} {dt:8.1f} "
          f"{requests:10d} {sent / dt / 1e6:10.2f}")


if __name__ == "__main__":
    main()
