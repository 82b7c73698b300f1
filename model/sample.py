"""Image and video sampling: MonoFormer (the whole latent at once) and ACDiT (block by block).

A sample's document is laid out exactly as in training ([<bos> caption <boi>] then the
latent), then run in pieces against a KV cache:

* the prompt once (its keys/values are reused at every denoising step);
* per block (monoformer: one block, the whole latent): the noised tokens are denoised
  with a diffusers scheduler, each step attending to the cache and to themselves;
* acdit: the finished block's clean copy is run once and appended to the cache, so the
  next block sees it (skip-causal, as in training).

Classifier-free guidance runs the null caption (<bos> alone, as caption dropout trains it)
in the same batch; rows of different prompt lengths are padded in the cache (doc = -1).
`use_cache=False` recomputes the whole visible sequence at every step (to check the cache).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from model.generate import check_context
from model.layout import DocLayout, LatentSegment, LayoutSpec, TextSegment, block_order, latent_grid, layout_document, pack_rows
from model.patchify import unpatchify
from model.special_tokens import BOS

SAMPLERS = ("auto", "ddim", "dpm++", "euler")


def make_scheduler(cfg, sampler: str = "auto"):
    """A diffusers scheduler matching the training objective: DDIM or DPM-Solver++ (ddpm), FlowMatch Euler (flow)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: {sampler!r} is not one of {'|'.join(SAMPLERS)}")
    if sampler == "auto":
        sampler = "dpm++" if cfg.objective == "ddpm" else "euler"
    if (cfg.objective == "flow") != (sampler == "euler"):
        raise ValueError(f"sampler: {sampler!r} does not fit objective {cfg.objective!r} "
                         f"(ddpm: ddim|dpm++, flow: euler)")
    common = dict(num_train_timesteps=cfg.num_train_timesteps)
    if sampler == "ddim":
        return DDIMScheduler(**common, beta_schedule=cfg.beta_schedule, clip_sample=False,
                             prediction_type=cfg.prediction)
    if sampler == "dpm++":
        return DPMSolverMultistepScheduler(**common, beta_schedule=cfg.beta_schedule, algorithm_type="dpmsolver++",
                                           solver_order=2, prediction_type=cfg.prediction)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def unit_time(cfg, scheduler, t) -> float:
    """Scheduler timestep -> the model's time in [0, 1]."""
    if cfg.objective == "flow":
        return float(t) / scheduler.config.num_train_timesteps
    return float(t) / (cfg.num_train_timesteps - 1)


def _rows(docs: Sequence[DocLayout], starts: Sequence[int], a: int, b: int, device):
    """One row per sample: its tokens [start + a, start + b) (start = its first latent token)."""
    parts = [d.slice(f + a, f + b) for d, f in zip(docs, starts)]
    return pack_rows([[p] for p in parts], max(len(p) for p in parts)).to(device)


def check_prompts(model, prompts: Sequence[Sequence[int]], shape: Sequence[int]) -> None:
    """ValueError naming the model's context when a prompt plus its latent does not fit."""
    spec = LayoutSpec.from_model_config(model.cfg)
    for p in prompts:
        doc = layout_document([TextSegment([BOS] + list(p)), LatentSegment(torch.zeros(tuple(shape)))], spec)
        check_context(model, len(doc), "prompt + latent")


@torch.no_grad()
def sample_latents(model, prompts: Sequence[Sequence[int]], shape: Sequence[int], steps: int = 50,
                   cfg_scale: float = 1.0, sampler: str = "auto", seed: int = 0, use_cache: bool = True,
                   progress: Optional[Callable] = None) -> torch.Tensor:
    """Latents (n, *shape) for n prompts (token ids); shape = (C, H, W) image or (C, T, H, W) video."""
    cfg = model.cfg
    device = next(model.parameters()).device
    spec = LayoutSpec.from_model_config(cfg)
    if shape[0] != cfg.latent_channels:
        raise ValueError(f"shape: {shape[0]} latent channels, the model has {cfg.latent_channels}")
    n = len(prompts)
    guided = cfg_scale != 1.0
    captions = [[BOS] + list(p) for p in prompts] + ([[BOS]] * n if guided else [])
    blank = torch.zeros(tuple(shape))
    check_prompts(model, prompts, shape)
    docs = [layout_document([TextSegment(c), LatentSegment(blank, "generate")], spec) for c in captions]
    starts = [int((d.modality != 0).nonzero()[0]) for d in docs]  # first latent token of each row
    ref = docs[0].slice(starts[0], len(docs[0]))  # the latent part (same in every row)
    noised_units = ref.unit[ref.noisy]
    bounds = torch.cat([torch.tensor([0]), torch.nonzero(noised_units[1:] != noised_units[:-1]).flatten() + 1,
                        torch.tensor([len(noised_units)])]).tolist()
    n_noised, P = len(noised_units), cfg.latent_patch_dim
    gen = torch.Generator().manual_seed(seed)

    prompts_only = [d.slice(0, f) for d, f in zip(docs, starts)]
    prefix = pack_rows([[p] for p in prompts_only], max(starts)).to(device)
    cache = model.step(prefix, extend=True)[1] if use_cache else None
    done: list[torch.Tensor] = []  # finished blocks (n, len, P)
    for a, b in zip(bounds[:-1], bounds[1:]):
        noised = _rows(docs, starts, a, b, device)
        x = torch.randn((n, b - a, P), generator=gen).to(device)
        scheduler = make_scheduler(cfg, sampler)
        scheduler.set_timesteps(steps)
        for t in scheduler.timesteps:
            noised.timestep = torch.full((noised.latents.shape[0],), unit_time(cfg, scheduler, t), device=device)
            rows_x = torch.cat([x, x]) if guided else x
            if use_cache:
                pred = model.step(noised, rows_x.reshape(-1, P), cache)[0].latent_pred
            else:
                pred = _uncached_pred(model, docs, starts, a, b, n_noised, done, rows_x, noised.timestep[0], device)
            pred = pred.reshape(-1, b - a, P).float()
            if guided:
                cond, uncond = pred[:n], pred[n:]
                pred = uncond + cfg_scale * (cond - uncond)
            x = scheduler.step(pred, t, x).prev_sample
            if progress is not None:
                progress(1)
        done.append(x)
        if spec.mode == "acdit" and use_cache:  # the clean copy of this block joins the cache
            clean = _rows(docs, starts, n_noised + a, n_noised + b, device)
            clean.timestep = torch.zeros(clean.latents.shape[0], device=device)
            rows_x = torch.cat([x, x]) if guided else x
            cache = model.step(clean, rows_x.reshape(-1, P), cache, extend=True)[1]
    tokens = torch.cat(done, dim=1)  # n, n_noised, P in sequence (block) order
    return unsequence(tokens, cfg, shape, spec)


def _uncached_pred(model, docs, starts, a, b, n_noised, done, rows_x, t_now, device):
    """The prediction for noised tokens [a, b) from the whole visible sequence, recomputed:
    the prompt, (acdit) the clean copies of the finished blocks, and the noised block."""
    acdit = model.cfg.mode == "acdit" and a > 0
    finished = torch.cat(done, dim=1) if acdit else None
    rows, values = [], []
    for r, (d, f) in enumerate(zip(docs, starts)):
        clean = [d.slice(f + n_noised, f + n_noised + a)] if acdit else []
        rows.append([DocLayout.concat([d.slice(0, f), *clean, d.slice(f + a, f + b)])])
        values += ([finished[r % finished.shape[0]]] if acdit else []) + [rows_x[r]]
    batch = pack_rows(rows, max(len(row[0]) for row in rows)).to(device)
    noisy = batch.noisy[batch.is_latent]
    batch.timestep = torch.where(noisy, t_now, torch.zeros_like(t_now))
    out = model(batch, torch.cat([v.reshape(-1, model.cfg.latent_patch_dim) for v in values]).to(device))
    return out.latent_pred[noisy]


def unsequence(tokens: torch.Tensor, cfg, shape: Sequence[int], spec: LayoutSpec) -> torch.Tensor:
    """Latent tokens in sequence (block) order -> latents (n, *shape)."""
    grid = latent_grid(shape, cfg.patch_size)
    order, _, _ = block_order(grid, spec.block_size if spec.mode == "acdit" else 0)
    raster = torch.empty_like(tokens)
    raster[:, order] = tokens
    video = len(shape) == 4
    return torch.stack([unpatchify(t, cfg.latent_channels, grid, cfg.patch_size, video) for t in raster])
