"""Time a full training step of the model (forward + backward + AdamW) and print tokens/s and MFU.

    python bench/model_step.py --preset tiny                      # CPU smoke run
    python bench/model_step.py --preset 0.9b --compile            # GPU, the shapes of
                                                                  # shared/bench/reference_step.py
Rows: `text` (pure causal text), `monoformer` (caption + one image per row, the image one
bidirectional unit) and `acdit` (one image latent per row as clean + noised copies in
square blocks: the reference's "flex-SCAM 2S" row). MFU counts the FLOPs the mask allows:
6 * params * tokens + 12 * layers * dim * seq * density per token (as the reference does).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.attention import attention_mask  # noqa: E402
from model.model_config import ModelConfig  # noqa: E402
from model.synthetic import synthetic_batch  # noqa: E402
from model.transformer import UnifiedTransformer  # noqa: E402

PRESETS = {  # dim, layers, heads, ffn, vocab, batch, seq, acdit block (tokens)
    "tiny": dict(dim=64, n_layers=2, n_heads=4, ffn_dim=128, vocab_size=256, batch=1, seq=256, block=16),
    "small": dict(dim=256, n_layers=4, n_heads=4, ffn_dim=704, vocab_size=1024, batch=2, seq=1024, block=16),
    "0.9b": dict(dim=2048, n_layers=16, n_heads=16, ffn_dim=5632, vocab_size=32000, batch=2, seq=4096, block=256),
}


def make_batch(cfg: ModelConfig, kind: str, batch: int, seq: int):
    """A batch of `batch` rows of about `seq` tokens per latent copy, for row kind `kind`."""
    if kind == "text":
        return synthetic_batch(cfg.replace(mode="monoformer"), batch, seq, 0, seq_len=seq)
    p = cfg.patch_size
    if kind == "monoformer":  # a quarter of the row is image tokens, the rest caption
        side = int(math.isqrt(seq // 4))
        return synthetic_batch(cfg, batch, seq - side * side - 2, side * p, seq_len=seq)
    side = int(math.isqrt(seq))  # acdit: the whole row is one latent, twice (clean + noised)
    return synthetic_batch(cfg, batch, 0, side * p)


def matmul_peak(device: str) -> float:
    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ a
    sync(device)
    t, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ a
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench(cfg: ModelConfig, kind: str, batch_size: int, seq: int, steps: int, compile_blocks: bool,
          device: str) -> dict:
    torch.manual_seed(0)
    torch._dynamo.reset()  # each row compiles for its own static shapes, as a run of one kind does
    model = UnifiedTransformer(cfg).to(device)
    if compile_blocks:
        model.compile_blocks()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    batch = make_batch(cfg, kind, batch_size, seq).to(device)
    gen = torch.Generator().manual_seed(0)
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step():
        with amp:
            loss = model.loss(batch, generator=gen)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    dt = (time.perf_counter() - t) / steps
    tokens = batch.tokens.numel()
    S = batch.tokens.shape[1]
    density = attention_mask(batch.doc, batch.unit, batch.noisy).float().mean().item()
    flops = tokens * (6 * model.num_params() + 12 * cfg.n_layers * cfg.dim * S * density)
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else 0.0
    return dict(kind=kind, ms=dt * 1e3, tok_s=tokens / dt, flops=flops / dt, S=S, density=density, mem=mem,
                params=model.num_params())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--kinds", default="text,monoformer,acdit")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="torch.compile each block (GPU)")
    p.add_argument("--attention", default="auto", choices=["auto", "flex", "sdpa"])
    p.add_argument("--objective", default="ddpm", choices=["ddpm", "flow"])
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pr = dict(PRESETS[args.preset])
    batch, seq, block = pr.pop("batch"), pr.pop("seq"), pr.pop("block")
    peak = matmul_peak(device)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device={name} torch={torch.__version__} matmul peak={peak / 1e12:.1f} TFLOP/s "
          f"({'bf16' if device == 'cuda' else 'fp32'}); preset={args.preset} {pr} batch={batch}")
    print(f"{'row':12s} {'seq':>6s} {'density':>7s} {'ms/step':>9s} {'tokens/s':>10s} {'TFLOP/s':>8s} "
          f"{'MFU':>6s} {'mem GiB':>7s}")
    for kind in args.kinds.split(","):
        cfg = ModelConfig(**pr, attention=args.attention, objective=args.objective,
                          mode="acdit" if kind == "acdit" else "monoformer", block_size=block)
        r = bench(cfg, kind, batch, seq, args.steps, args.compile, device)
        print(f"{kind:12s} {r['S']:6d} {r['density']:7.3f} {r['ms']:9.1f} {r['tok_s']:10.0f} "
              f"{r['flops'] / 1e12:8.2f} {r['flops'] / peak:6.1%} {r['mem']:7.1f}", flush=True)


if __name__ == "__main__":
    main()
