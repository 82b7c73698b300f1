"""Overfit the model on one synthetic text+image batch on the CPU and print both losses falling.

    python -m model.overfit --config configs/overfit-tiny.yaml [key=value ...]

The batch, its timesteps and its noise are fixed, so a working model drives both the
next-token and the diffusion loss towards zero. A smoke test of the whole model path.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from model.config import Config, ConfigError, knob, load_config
from model.model_config import ModelConfig
from model.synthetic import synthetic_batch
from model.transformer import UnifiedTransformer


@dataclasses.dataclass
class OverfitConfig(Config):
    model: ModelConfig = knob(ModelConfig(), "the network")
    steps: int = knob(300, "optimizer steps")
    lr: float = knob(2e-3, "AdamW learning rate")
    seed: int = knob(0, "seed of the weights, the batch and the noise")
    batch_size: int = knob(2, "documents (rows) in the batch")
    text_len: int = knob(32, "caption tokens per document")
    latent_hw: int = knob(8, "latent height = width")
    log_every: int = knob(25, "print every N steps")


def overfit(cfg: OverfitConfig, log=print) -> list[dict]:
    torch.manual_seed(cfg.seed)
    model = UnifiedTransformer(cfg.model)
    batch = synthetic_batch(cfg.model, cfg.batch_size, cfg.text_len, cfg.latent_hw, seed=cfg.seed, tail_len=8)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    history = []
    t0 = time.time()
    for step in range(1, cfg.steps + 1):
        losses = model.loss(batch, generator=torch.Generator().manual_seed(cfg.seed))
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
        if step == 1 or step % cfg.log_every == 0 or step == cfg.steps:
            h = history[-1]
            log(f"step {step:4d}  loss {h['loss']:.4f}  lm {h['lm_loss']:.4f}  "
                f"diffusion {h['diffusion_loss']:.4f}  ({time.time() - t0:.1f}s)")
    return history


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file (model:, steps:, ...)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.dim=128")
    args = p.parse_args(argv)
    try:
        cfg = load_config(OverfitConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = UnifiedTransformer(cfg.model).num_params()
    print(f"model: {n / 1e6:.2f}M parameters, mode={cfg.model.mode}, objective={cfg.model.objective}")
    h = overfit(cfg)
    lm, diff = h[0]["lm_loss"] / h[-1]["lm_loss"], h[0]["diffusion_loss"] / h[-1]["diffusion_loss"]
    print(f"lm_loss fell {lm:.1f}x, diffusion_loss fell {diff:.1f}x over {cfg.steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
