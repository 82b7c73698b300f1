"""Tokens/s and MFU of the real trainer: DeepSpeed engine, packed loader, loss, optimizer step.

    python bench/train_step.py --preset tiny-cpu            # CPU: the tiny-cpu model
    python bench/train_step.py --preset 0.9b --compile      # GPU: the shapes of shared/bench/reference_step.py

Rows are filled by synthetic shards written first (not timed): `monoformer` rows hold a
caption and one image (a quarter of the row), `acdit` rows one latent as clean + noised
copies in square blocks of 256 tokens (the reference's "flex-SCAM 2S" row), `text` rows
text only. One process; `Trainer.train_step` is what `pretrain.train` runs.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipelines.config import DataConfig, DatasetConfig  # noqa: E402
from data_pipelines.shards import ShardSetWriter  # noqa: E402
from model.model_config import ModelConfig  # noqa: E402
from pretrain.config import ExperimentConfig, RunConfig, TrainConfig, WandbConfig  # noqa: E402
from pretrain.distributed import init_distributed  # noqa: E402
from pretrain.metrics import batch_flops, peak_flops  # noqa: E402
from pretrain.process import run_and_exit  # noqa: E402
from pretrain.train import Trainer  # noqa: E402

PRESETS = {  # model, rows per micro-batch, tokens per (latent copy of a) row, acdit block
    "tiny-cpu": (dict(dim=128, n_layers=4, n_heads=4, vocab_size=2000), 4, 256, 16),
    "0.9b": (dict(dim=2048, n_layers=16, n_heads=16, ffn_dim=5632, vocab_size=32000), 2, 4096, 256),
}


def write_synthetic_shards(out: Path, kind: str, seq: int, channels: int, patch: int, vocab: int,
                           n: int = 64) -> None:
    """Documents that fill one row each (bos/eos and boi/eoi included)."""
    rng = np.random.default_rng(0)
    writer = ShardSetWriter(out, samples_per_shard=16)
    for i in range(n):
        if kind == "text":
            segments, arrays = [{"text": "", "tokens": rng.integers(9, vocab, seq - 2).tolist()}], {}
        else:
            side = int(math.isqrt(seq // 4 if kind == "monoformer" else seq))
            text_len = seq - side * side - 4 if kind == "monoformer" else 0
            latent = rng.standard_normal((channels, side * patch, side * patch)).astype(np.float16)
            segments = [{"text": "", "tokens": rng.integers(9, vocab, text_len).tolist()},
                        {"latent": "lat0.npy", "kind": "image", "shape": list(latent.shape)}]
            arrays = {"lat0.npy": latent}
        writer.write(f"syn-{i:06d}", {"segments": segments}, arrays)
    writer.close(encoder={"type": "synthetic"}, latent_channels=channels,
                 tokenizer={"fingerprint": "synthetic", "vocab_size": vocab})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny-cpu")
    p.add_argument("--kinds", default="text,monoformer,acdit")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    model_kw, rows, seq, block = PRESETS[args.preset]
    dist = init_distributed()
    print(f"preset={args.preset} {model_kw} rows={rows} device={dist.device} zero={args.zero_stage}")
    print(f"{'row':11s} {'seq':>6s} {'ms/step':>9s} {'tokens/s':>10s} {'MFU':>7s}")
    for kind in args.kinds.split(","):
        torch._dynamo.reset()  # each row compiles for its own static shapes, as a run of one kind does
        with tempfile.TemporaryDirectory() as tmp:
            mc = ModelConfig(**model_kw, latent_channels=4, patch_size=2, block_size=block,
                             mode="acdit" if kind == "acdit" else "monoformer")
            write_synthetic_shards(Path(tmp) / "shards", kind, seq, 4, 2, mc.vocab_size)
            row_len = 2 * seq + 4 if kind == "acdit" else seq
            cfg = ExperimentConfig(
                run=RunConfig(dir=str(Path(tmp) / "run")), model=mc,
                data=DataConfig(datasets=[DatasetConfig(path=str(Path(tmp) / "shards"))], seq_len=row_len,
                                num_workers=2, caption_dropout=0.0, add_bos_eos=True),
                train=TrainConfig(zero_stage=args.zero_stage, micro_batch_size=rows, compile=args.compile,
                                  warmup_steps=0, max_steps=10 ** 6),
                wandb=WandbConfig(mode="disabled"))
            trainer = Trainer(cfg, dist, resume="none")
            batches = iter(trainer.loader)
            for _ in range(3):
                trainer.train_step(batches)
            sync = torch.cuda.synchronize if dist.device.type == "cuda" else (lambda: None)
            sync()
            t = time.perf_counter()
            for _ in range(args.steps):
                trainer.train_step(batches)
            sync()
            dt = (time.perf_counter() - t) / args.steps
            batch = trainer.last_batch
            peak = peak_flops(0.0, dist.device)
            mfu = batch_flops(mc, trainer.params_by_use, batch) / dt / peak if peak else float("nan")
            print(f"{kind:11s} {batch.tokens.shape[1]:6d} {dt * 1e3:9.1f} {batch.tokens.numel() / dt:10.0f} "
                  f"{mfu:7.1%}", flush=True)
            del trainer


if __name__ == "__main__":
    run_and_exit(main)
