"""Samples at evaluation: a grid of `train.sample_prompts` and a quality number, from the EMA.

At each evaluation every rank assembles the whole fp32 weights (the EMA when the run keeps
one) with DeepSpeed's `safe_get_full_fp32_param`, which works the same under ZeRO-1, 2 and 3;
rank 0 loads them into a plain model copy, samples `samples_per_prompt` images per prompt
with guidance, saves a PNG grid (one row per prompt) and scores them with
`train.sample_quality` (pretrain.quality). The copy costs one full fp32 model on rank 0 for
the length of the sampling.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from model.transformer import UnifiedTransformer
from pretrain.ema import full_fp32_state


class EvalSampler:
    def __init__(self, cfg, manifests: list[dict]):
        """Loads the tokenizer, the latent encoder and the scorer now, so that a missing file stops
        the run at its start, not at its first evaluation. `enabled` is False when the run samples no
        grids or its data has no images or no tokenizer."""
        from data_pipelines.encoders import load_encoder
        from data_pipelines.tokenizer import Tokenizer
        from pretrain.quality import get_scorer
        from pretrain.release import info_from_manifests
        self.cfg, t = cfg, cfg.train
        self.scorer = get_scorer(t.sample_quality) if t.sample_quality else None
        self.enabled = False
        if not (t.sample_prompts and t.eval_interval):
            return
        info, tok_path = info_from_manifests(manifests)
        if "image" not in info["latent_shapes"] or tok_path is None:
            return
        tok = Tokenizer(tok_path)
        self.prompts = list(t.sample_prompts)
        self.prompt_ids = [tok.encode(p) for p in self.prompts for _ in range(t.samples_per_prompt)]
        self.shape, self.encoder = info["latent_shapes"]["image"], load_encoder(info["encoder"])
        self.enabled = True

    @torch.no_grad()
    def sample(self, engine, ema, step: int, is_main: bool, device) -> tuple[Optional[Path], dict]:
        """(the grid's path on rank 0, the quality metrics `sample/...` on rank 0). Every rank must
        call it (assembling the weights is collective)."""
        from model.sample import sample_latents
        from pretrain.images import decode, save_image_grid
        if not self.enabled:
            return None, {}
        state = ema.full_state(engine) if ema is not None else full_fp32_state(engine)
        if not is_main:
            return None, {}
        t = self.cfg.train
        model = UnifiedTransformer(self.cfg.model)
        model.load_state_dict(state)
        model.to(device).eval()
        latents = sample_latents(model, self.prompt_ids, self.shape, t.sample_steps, t.sample_cfg,
                                 seed=self.cfg.run.seed)
        pixels = decode(self.encoder, latents)
        path = Path(self.cfg.run.dir) / "samples" / f"step_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image_grid(pixels, path, cols=t.samples_per_prompt)
        metrics = {}
        if self.scorer is not None:
            metrics = {f"sample/{k}": v for k, v in self.scorer(self.prompts, pixels, t.samples_per_prompt).items()}
        return path, metrics
