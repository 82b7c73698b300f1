"""Overfit the model on one synthetic text+image batch on the CPU: the next-token loss falls
towards zero and each caption samples its own image back.

    python -m model.overfit --config configs/overfit-tiny.yaml [key=value ...]

The documents are fixed; the diffusion timesteps and noise are drawn anew at every step, as in
training, so the model must learn to denoise each image from every noise level.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time

import torch

from model.config_system import Config, ConfigError, knob, load_config
from model.diffusion import Diffusion, assign_timesteps
from model.layout import LayoutSpec, TextSegment, layout_document, pack_rows
from model.model_config import ModelConfig
from model.special_tokens import BOS
from model.synthetic import caption_image_document
from model.transformer import UnifiedTransformer


@dataclasses.dataclass
class OverfitConfig(Config):
    model: ModelConfig = knob(ModelConfig(), "the network")
    steps: int = knob(300, "optimizer steps")
    lr: float = knob(2e-3, "AdamW learning rate")
    seed: int = knob(0, "seed of the weights, the batch and the noise")
    batch_size: int = knob(2, "documents (rows) in the batch")
    copies: int = knob(1, "rows per document: each copy draws its own timestep and noise")
    text_len: int = knob(32, "caption tokens per document")
    latent_hw: int = knob(8, "latent height = width")
    warmup: int = knob(20, "steps of linear learning-rate warmup")
    decay: bool = knob(True, "cosine decay of the learning rate to 0 over the steps")
    log_every: int = knob(25, "print every N steps")


def overfit_documents(cfg: OverfitConfig) -> list[list]:
    """[<bos> caption][latent][tail text] per row: the caption laid out as sampling lays out a prompt."""
    g = torch.Generator().manual_seed(cfg.seed)
    docs = []
    for _ in range(cfg.batch_size):
        segments = caption_image_document(cfg.model, cfg.text_len, cfg.latent_hw, g, tail_len=8)
        docs.append([TextSegment([BOS] + list(segments[0].tokens))] + segments[1:])
    return docs


def learning_rate_factor(cfg: OverfitConfig, step: int) -> float:
    """Linear warmup, then a cosine decay to 0 at the last step (or constant without `decay`)."""
    if step <= cfg.warmup:
        return step / cfg.warmup
    if not cfg.decay:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))


def overfit(cfg: OverfitConfig, log=print) -> tuple[UnifiedTransformer, list[dict]]:
    """Train on the documents of `overfit_documents` -> (model, per-step losses)."""
    torch.manual_seed(cfg.seed)
    model = UnifiedTransformer(cfg.model)
    spec = LayoutSpec.from_model_config(cfg.model)
    docs = [layout_document(d, spec) for d in overfit_documents(cfg)] * cfg.copies
    batch = pack_rows([[d] for d in docs], max(len(d) for d in docs))
    diffusion = Diffusion(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: learning_rate_factor(cfg, i + 1))
    history = []
    t0 = time.time()
    for step in range(1, cfg.steps + 1):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # new timesteps and noise every step
        losses = model.loss(assign_timesteps(batch, diffusion, g), generator=g)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        sched.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
        if log is not None and (step == 1 or step % cfg.log_every == 0 or step == cfg.steps):
            h = history[-1]
            log(f"step {step:4d}  loss {h['loss']:.4f}  lm {h['lm_loss']:.4f}  "
                f"diffusion {h['diffusion_loss']:.4f}  ({time.time() - t0:.1f}s)")
    return model.eval(), history


def sample_back(model: UnifiedTransformer, cfg: OverfitConfig, steps: int = 25) -> list[float]:
    """Relative error ||sample - image|| / ||image|| of each document's image, sampled from its caption."""
    from model.sample import sample_latents
    errors = []
    for segments in overfit_documents(cfg):
        image = segments[1].latent
        sample = sample_latents(model, [list(segments[0].tokens)[1:]], tuple(image.shape), steps, seed=cfg.seed)[0]
        errors.append(float((sample - image).norm() / image.norm()))
    return errors


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
    model, h = overfit(cfg)
    errors = ", ".join(f"{e:.3f}" for e in sample_back(model, cfg))
    print(f"lm_loss fell {h[0]['lm_loss'] / h[-1]['lm_loss']:.1f}x over {cfg.steps} steps; "
          f"images sampled back from their captions with relative errors {errors}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
