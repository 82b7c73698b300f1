"""Samples at evaluation: a grid of `train.sample_prompts` and a quality number, from the EMA.

At each evaluation every rank takes part in assembling the whole fp32 weights (the EMA when
the run keeps one) with DeepSpeed's `safe_get_full_fp32_param`, which works the same under
ZeRO-1, 2 and 3; only rank 0 keeps them. A plain model copy holds them (assigned, not copied:
one full fp32 model on rank 0 for the length of the sampling), samples `samples_per_prompt` images
(or videos: `train.sample_kind`) per prompt with guidance, saves a PNG grid (a GIF of grids; one row
per prompt) and scores them with `train.sample_quality` (pretrain.quality).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import torch

from model.config_system import ConfigError
from model.transformer import UnifiedTransformer
from pretrain.distributed import any_rank
from pretrain.ema import full_fp32_state


class SamplingFailed(RuntimeError):
    pass


class EvalSampler:
    def __init__(self, cfg, manifests: list[dict], is_main: bool = True):
        """Loads the tokenizer, the latent encoder and the scorer and checks the prompts (they fit the
        context; the scorer can judge them) now, on every rank, so that a missing file or a bad prompt
        stops the run at its start (ConfigError), not at its first evaluation. `enabled` is False when
        the run samples no grids or its data has no images or no tokenizer. Only rank 0 (`is_main`)
        keeps the encoder."""
        from data_pipelines.encoders import load_encoder
        from model.sample import check_prompts
        from pretrain.quality import get_scorer
        from pretrain.release import Loaded, info_from_manifests
        from pretrain.sample import tokenizer_of
        self.cfg, t = cfg, cfg.train
        self.scorer = get_scorer(t.sample_quality) if t.sample_quality else None
        self.enabled = False
        if not (t.sample_prompts and t.eval_interval):
            if t.sample_quality or t.sample_prompts:
                warnings.warn("train.sample_prompts/sample_quality: no samples without both sample_prompts "
                              f"and eval_interval > 0 (eval_interval={t.eval_interval})")
            return
        info, tok_path = info_from_manifests(manifests)
        if t.sample_kind not in info["latent_shapes"] or tok_path is None:
            warnings.warn(f"train.sample_prompts: no samples, the data has no {t.sample_kind} or no tokenizer")
            return
        self.info, self.tokenizer, self.prompts = info, tok_path, list(t.sample_prompts)
        self.encoder = load_encoder(info["encoder"])
        shape = info["latent_shapes"][t.sample_kind]
        with torch.device("meta"):
            shell = UnifiedTransformer(cfg.model)
        try:
            check_prompts(shell, [tokenizer_of(Loaded(shell, tok_path, info)).encode(p) for p in self.prompts], shape)
            if self.scorer is not None:
                self.scorer.check(self.prompts, self.encoder.pixel_shape(shape))
        except ValueError as e:
            raise ConfigError(f"train.sample_prompts{'/sample_quality=' + t.sample_quality if self.scorer else ''}: "
                              f"{e}") from None
        if not is_main:
            self.encoder = None
        self.enabled = True

    @torch.no_grad()
    def sample(self, engine, ema, step: int, dist) -> tuple[Optional[Path], dict]:
        """(the grid's path on rank 0, the quality metrics `sample/...` on rank 0). Every rank must
        call it (assembling the weights is collective); when sampling fails on rank 0, every rank
        raises (SamplingFailed), so that none waits for the others."""
        if not self.enabled:
            return None, {}
        keep = dist.is_main
        state = ema.full_state(engine, keep=keep) if ema is not None else full_fp32_state(engine, keep=keep)
        error = None
        if dist.is_main:
            try:
                result = self._sample_and_score(state, step, dist.device)
            except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
                error = e
            del state
            if dist.device.type == "cuda":
                torch.cuda.empty_cache()
        if any_rank(error is not None, dist.control_group):
            raise SamplingFailed(f"sampling at step {step} failed on rank 0: {error!r}") from error
        return result if dist.is_main else (None, {})

    def _sample_and_score(self, state: dict, step: int, device) -> tuple[Path, dict]:
        from pretrain.images import save_image_grid, save_video_grid
        from pretrain.release import Loaded
        from pretrain.sample import sample_pixels
        t = self.cfg.train
        model = UnifiedTransformer.from_state_dict(self.cfg.model, state).to(device).eval()
        pixels = sample_pixels(Loaded(model, self.tokenizer, self.info), self.prompts, t.samples_per_prompt,
                               t.sample_kind, t.sample_steps, t.sample_cfg, seed=self.cfg.run.seed, progress=False,
                               encoder=self.encoder)
        video = t.sample_kind == "video"
        path = Path(self.cfg.run.dir) / "samples" / f"step_{step:08d}.{'gif' if video else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if video:
            save_video_grid(pixels, path, fps=(self.info.get("video") or {}).get("fps") or 8, cols=t.samples_per_prompt)
        else:
            save_image_grid(pixels, path, cols=t.samples_per_prompt)
        metrics = {}
        if self.scorer is not None:
            scores = self.scorer.score(self.prompts, pixels, t.samples_per_prompt)
            metrics = {f"sample/{k}": v for k, v in scores.items()}
        return path, metrics
