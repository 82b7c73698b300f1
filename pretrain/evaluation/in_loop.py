"""Samples at evaluation, from the EMA: a grid of `train.sample_prompts` and a quality number, and
captions of held-out images (`train.caption_quality`: sample/caption_accuracy).

At each evaluation every rank takes part in assembling the whole fp32 weights (the EMA when
the run keeps one) with DeepSpeed's `safe_get_full_fp32_param`, which works the same under
ZeRO-1, 2 and 3; only rank 0 keeps them. A plain model copy holds them (assigned, not copied:
one full fp32 model on rank 0 for the length of the sampling), samples `samples_per_prompt` images
(or videos: `train.sample_kind`) per prompt with guidance, saves a PNG grid (a GIF of grids; one row
per prompt) and scores them with `train.sample_quality` (pretrain.quality). With `train.caption_quality`,
the same model captions the first `caption_samples` (caption, image) samples of `data.eval_datasets`
greedily (pretrain.evaluation.captioning), writes `samples/step_N.captions.tsv` (reference, caption)
and logs the share the judge calls right.
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
from pretrain.evaluation.captioning import caption_set


class SamplingFailed(RuntimeError):
    pass


class EvalSampler:
    def __init__(self, cfg, manifests: list[dict], is_main: bool = True):
        """Loads the tokenizer, the latent encoder, the scorer and the images to caption, and checks the
        prompts (they fit the context; the scorer can judge them) on every rank and the captions (the
        judge can judge them) on rank 0, whose failure the trainer passes to every rank, now: a missing
        file or a bad prompt stops the run at its start (ConfigError), not at its first evaluation. `enabled` is False when the run samples no grids
        (none asked, or its data has no images or no tokenizer) and captions nothing. Only rank 0
        (`is_main`) keeps the encoder and the images."""
        from data_pipelines.encoders import load_encoder
        from pretrain.quality import get_scorer
        from pretrain.export.release import info_from_manifests
        self.cfg, t = cfg, cfg.train
        self.scorer = get_scorer(t.sample_quality) if t.sample_quality else None
        self.images = self.captions = False
        self.info, self.tokenizer = info_from_manifests(manifests)
        with torch.device("meta"):
            shell = UnifiedTransformer(cfg.model)
        if t.caption_quality:
            self._check_captions(shell, is_main)
        if not (t.sample_prompts and t.eval_interval):
            if t.sample_quality or t.sample_prompts:
                warnings.warn("train.sample_prompts/sample_quality: no samples without both sample_prompts "
                              f"and eval_interval > 0 (eval_interval={t.eval_interval})")
        elif t.sample_kind not in self.info["latent_shapes"] or self.tokenizer is None:
            warnings.warn(f"train.sample_prompts: no samples, the data has no {t.sample_kind} or no tokenizer")
        else:
            self._check_prompts(shell)
        self.encoder = load_encoder(self.info["encoder"]) if is_main and self.images else None
        self.enabled = self.images or self.captions

    def _check_prompts(self, shell) -> None:
        from model.sample import check_prompts
        from pretrain.export.release import Loaded
        from pretrain.sample import tokenizer_of
        t = self.cfg.train
        self.prompts = list(t.sample_prompts)
        shape = self.info["latent_shapes"][t.sample_kind]
        try:
            check_prompts(shell, [tokenizer_of(Loaded(shell, self.tokenizer, self.info)).encode(p)
                                  for p in self.prompts], shape)
            if self.scorer is not None:
                from data_pipelines.encoders import load_encoder
                self.scorer.check(self.prompts, load_encoder(self.info["encoder"]).pixel_shape(shape))
        except ValueError as e:
            raise ConfigError(f"train.sample_prompts{'/sample_quality=' + t.sample_quality if self.scorer else ''}: "
                              f"{e}") from None
        self.images = True

    def _check_captions(self, shell, is_main: bool) -> None:
        """The (caption, image) samples to caption, read on rank 0 only (the trainer stops every rank
        when it fails): there are some, of the model's latent channels, the judge can judge their
        captions, and an image with caption_max_tokens fits the context."""
        from data_pipelines.tokenizer import load_tokenizer
        from model.generate import caption_document, check_context
        from model.layout import LayoutSpec
        from pretrain.evaluation.captioning import get_judge
        t, where = self.cfg.train, f"train.caption_quality={self.cfg.train.caption_quality}"
        if not t.eval_interval:
            warnings.warn(f"{where}: no captions without evaluations (train.eval_interval=0)")
            return
        if not self.cfg.data.add_bos_eos:
            raise ConfigError(f"{where}: captions are read as image-first documents are laid out, which needs "
                              "data.add_bos_eos")
        if self.tokenizer is None:
            raise ConfigError(f"{where}: the training data names no tokenizer")
        self.captions = True
        if not is_main:
            return
        try:
            latents, ids = caption_set([d.path for d in self.cfg.data.eval_datasets], t.caption_samples)
        except (OSError, ValueError) as e:  # a missing or unreadable held-out set (BadSample is a ValueError)
            raise ConfigError(f"{where}: data.eval_datasets: {e}") from None
        if not latents:
            raise ConfigError(f"{where}: data.eval_datasets hold no (caption, image) sample to caption")
        channels = {x.shape[0] for x in latents} - {self.cfg.model.latent_channels}
        if channels:
            raise ConfigError(f"{where}: data.eval_datasets hold latents of {channels.pop()} channels, the model "
                              f"takes {self.cfg.model.latent_channels} (model.latent_channels)")
        try:
            tok = load_tokenizer(self.tokenizer)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{where}: tokenizer {self.tokenizer}: {e}") from None
        self.caption_refs = [tok.decode(x) for x in ids]
        try:
            judge = get_judge(t.caption_quality)
            for ref in self.caption_refs:
                judge(ref, ref)
            spec = LayoutSpec.from_model_config(self.cfg.model)
            for shape in {tuple(x.shape) for x in latents}:
                check_context(shell, len(caption_document(torch.zeros(shape), [], spec)) + t.caption_max_tokens,
                              "image + train.caption_max_tokens")
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        self.caption_latents = latents

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

    def _sample_and_score(self, state: dict, step: int, device) -> tuple[Optional[Path], dict]:
        from pretrain.export.release import Loaded
        model = UnifiedTransformer.from_state_dict(self.cfg.model, state).to(device).eval()
        loaded = Loaded(model, self.tokenizer, self.info)
        path, metrics = self._images(loaded, step) if self.images else (None, {})
        if self.captions:
            metrics.update(self._captions(loaded, step))
        return path, metrics

    def _images(self, loaded, step: int) -> tuple[Path, dict]:
        from pretrain.images import save_image_grid, save_video_grid
        from pretrain.sample import sample_pixels
        t = self.cfg.train
        pixels = sample_pixels(loaded, self.prompts, t.samples_per_prompt, t.sample_kind, t.sample_steps, t.sample_cfg,
                               seed=self.cfg.run.seed, progress=False, encoder=self.encoder)
        video = t.sample_kind == "video"
        path = self._samples_dir() / f"step_{step:08d}.{'gif' if video else 'png'}"
        if video:
            save_video_grid(pixels, path, fps=(self.info.get("video") or {}).get("fps") or 8, cols=t.samples_per_prompt)
        else:
            save_image_grid(pixels, path, cols=t.samples_per_prompt)
        metrics = {}
        if self.scorer is not None:
            scores = self.scorer.score(self.prompts, pixels, t.samples_per_prompt)
            metrics = {f"sample/{k}": v for k, v in scores.items()}
        return path, metrics

    def _captions(self, loaded, step: int) -> dict:
        from pretrain.evaluation.captioning import caption_latent_batches, one_line, score_captions
        t = self.cfg.train
        captions = caption_latent_batches(loaded, self.caption_latents, t.caption_max_tokens, seed=self.cfg.run.seed)
        lines = "".join(f"{one_line(ref)}\t{one_line(got)}\n" for ref, got in zip(self.caption_refs, captions))
        (self._samples_dir() / f"step_{step:08d}.captions.tsv").write_text("reference\tcaption\n" + lines)
        return {"sample/caption_accuracy": score_captions(captions, self.caption_refs, t.caption_quality)
                ["caption_accuracy"]}

    def _samples_dir(self) -> Path:
        path = Path(self.cfg.run.dir) / "samples"
        path.mkdir(parents=True, exist_ok=True)
        return path
