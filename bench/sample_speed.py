"""Images per second: MonoFormer vs ACDiT (block sizes 1, 4, 16, whole) at the same step count,
with and without the KV cache.

    python bench/sample_speed.py [--n 4] [--steps 10] [--latent 8] [--dim 256 --layers 4]

A randomly initialised model (speed does not depend on the weights); 4-channel latents of
latent x latent with patch 2 (latent 8 -> 16 tokens; 16 -> 64 tokens), a 16-token prompt, CFG on.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.model_config import ModelConfig  # noqa: E402
from model.sample import sample_latents  # noqa: E402
from model.transformer import UnifiedTransformer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4, help="images per call")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--latent", type=int, default=16, help="latent height = width (tokens: (latent/2)^2)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--cfg", type=float, default=3.0)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = (args.latent // 2) ** 2
    rows = [("monoformer", 0)] + [("acdit", b) for b in (1, 4, 16) if b < tokens] + [("acdit", 0)]
    print(f"device={device} dim={args.dim} layers={args.layers} latent tokens={tokens} n={args.n} "
          f"steps={args.steps} cfg={args.cfg}")
    print(f"{'mode':10s} {'block':>6s} {'cache':>6s} {'forward calls':>13s} {'seconds':>8s} {'images/s':>9s}")
    for mode, block in rows:
        cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=max(1, args.dim // 64), vocab_size=1000,
                          latent_channels=4, patch_size=2, mode=mode, block_size=block)
        torch.manual_seed(0)
        model = UnifiedTransformer(cfg).to(device).eval()
        blocks = 1 if block in (0,) or block >= tokens else tokens // block
        for cache in (True, False):
            kw = dict(prompts=[list(range(20, 36))] * args.n, shape=(4, args.latent, args.latent), steps=args.steps,
                      cfg_scale=args.cfg, use_cache=cache)
            sample_latents(model, **{**kw, "steps": 1})  # warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            sample_latents(model, **kw)
            if device == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
            calls = blocks * args.steps
            print(f"{mode:10s} {block or 'whole':>6} {'yes' if cache else 'no':>6s} {calls:13d} {dt:8.2f} "
                  f"{args.n / dt:9.2f}", flush=True)


if __name__ == "__main__":
    main()
