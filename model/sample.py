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


def _document(captions, shape, spec) -> list[DocLayout]:
    blank = torch.zeros(tuple(shape))
    return [layout_document([TextSegment(c), LatentSegment(blank, "generate")], spec) for c in captions]


def frames_per_block(cfg, shape: Sequence[int]) -> int:
    """Latent frames in one ACDiT block of a video (0: not generated frame block by frame block)."""
    if len(shape) != 4 or cfg.mode != "acdit":
        return 0
    t, h, w = latent_grid(shape, cfg.patch_size)
    return t if cfg.block_size <= 0 or cfg.block_size >= t * h * w else cfg.block_size // (h * w)


def window_shape(model, captions: Sequence[Sequence[int]], shape: Sequence[int]) -> list[int]:
    """The latent shape laid out when sampling: `shape` itself when prompt + latent fit the model's
    context; for ACDiT video, otherwise the most whole blocks of frames that fit (the sliding window);
    anything else that does not fit is a ValueError naming the context."""
    spec = LayoutSpec.from_model_config(model.cfg)
    longest = max(captions, key=len)

    def fits(s) -> bool:
        return len(_document([longest], s, spec)[0]) <= model.cfg.max_seq_len

    k = frames_per_block(model.cfg, shape)
    if fits(shape) or not k:
        check_context(model, len(_document([longest], shape, spec)[0]), "prompt + latent")
        return list(shape)
    if not fits([shape[0], 2 * k, *shape[2:]]):  # a window of one block would see no frame before it
        raise ValueError(f"prompt + latent: {len(_document([longest], shape, spec)[0])} tokens, more than the "
                         f"model's context (model.max_seq_len={model.cfg.max_seq_len}), which holds fewer than 2 "
                         f"blocks of {k} frames to slide a window over")
    if shape[1] % k:
        raise ValueError(f"frames: {shape[1]} latent frames are not whole blocks of {k} (model.block_size "
                         f"{model.cfg.block_size})")
    frames = k
    while frames + k < shape[1] and fits([shape[0], frames + k, *shape[2:]]):
        frames += k
    return [shape[0], frames, *shape[2:]]


def check_prompts(model, prompts: Sequence[Sequence[int]], shape: Sequence[int]) -> None:
    """ValueError naming the model's context when a prompt plus its latent (for ACDiT video: one
    block of frames) does not fit."""
    window_shape(model, [[BOS] + list(p) for p in prompts], shape)


@torch.no_grad()
def sample_latents(model, prompts: Sequence[Sequence[int]], shape: Sequence[int], steps: int = 50,
                   cfg_scale: float = 1.0, sampler: str = "auto", seed: int = 0, use_cache: bool = True,
                   progress: Optional[Callable] = None) -> torch.Tensor:
    """Latents (n, *shape) for n prompts (token ids); shape = (C, H, W) image or (C, T, H, W) video.

    An ACDiT video longer than the model's context is generated through a sliding window: the
    document laid out is the prompt and the most blocks of frames that fit (`window_shape`); once its
    last block is reached, each further block is denoised as that last block, after the window's
    earlier blocks were refilled (re-run from the prompt) with the latest finished frames. The oldest
    frames leave the cache, and every block sees its context at the positions of a clip's start."""
    cfg = model.cfg
    device = next(model.parameters()).device
    spec = LayoutSpec.from_model_config(cfg)
    if shape[0] != cfg.latent_channels:
        raise ValueError(f"shape: {shape[0]} latent channels, the model has {cfg.latent_channels}")
    n = len(prompts)
    guided = cfg_scale != 1.0
    captions = [[BOS] + list(p) for p in prompts] + ([[BOS]] * n if guided else [])
    window = window_shape(model, captions, shape)
    docs = _document(captions, window, spec)
    starts = [int((d.modality != 0).nonzero()[0]) for d in docs]  # first latent token of each row
    ref = docs[0].slice(starts[0], len(docs[0]))  # the latent part (same in every row)
    noised_units = ref.unit[ref.noisy]
    bounds = torch.cat([torch.tensor([0]), torch.nonzero(noised_units[1:] != noised_units[:-1]).flatten() + 1,
                        torch.tensor([len(noised_units)])]).tolist()
    n_noised, P = len(noised_units), cfg.latent_patch_dim
    k = frames_per_block(cfg, shape)
    total = len(bounds) - 1 if window == list(shape) else len(bounds) - 1 + (shape[1] - window[1]) // k
    gen = torch.Generator().manual_seed(seed)

    cache = _prefill(model, docs, starts, 0, n_noised, [], guided, device) if use_cache else None
    done: list[torch.Tensor] = []  # finished blocks (n, len, P)
    for j in range(total):
        i = min(j, len(bounds) - 2)  # the block of the laid-out document this one is denoised as
        a, b = bounds[i], bounds[i + 1]
        seen = done[len(done) - i:] if i else []  # the finished blocks this one sees (acdit)
        if use_cache and j > i:  # the window slides: refill its earlier blocks with the latest frames
            cache = _prefill(model, docs, starts, a, n_noised, seen, guided, device)
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
                pred = _uncached_pred(model, docs, starts, a, b, n_noised, seen, rows_x, noised.timestep[0], device)
            pred = pred.reshape(-1, b - a, P).float()
            if guided:
                cond, uncond = pred[:n], pred[n:]
                pred = uncond + cfg_scale * (cond - uncond)
            x = scheduler.step(pred, t, x).prev_sample
            if progress is not None:
                progress(1)
        done.append(x)
        if spec.mode == "acdit" and use_cache and j == i:  # its clean copy joins the cache
            clean = _rows(docs, starts, n_noised + a, n_noised + b, device)
            clean.timestep = torch.zeros(clean.latents.shape[0], device=device)
            rows_x = torch.cat([x, x]) if guided else x
            cache = model.step(clean, rows_x.reshape(-1, P), cache, extend=True)[1]
    tokens = torch.cat(done, dim=1)  # n, all noised tokens, P in sequence (block) order
    return unsequence(tokens, cfg, shape, spec)


def _prefill(model, docs, starts, a, n_noised, seen, guided, device):
    """The cache of each row's prompt and the clean copies of its first `a` noised tokens' blocks,
    whose values are the finished blocks `seen`."""
    parts = [[DocLayout.concat([d.slice(0, f), d.slice(f + n_noised, f + n_noised + a)])] for d, f in zip(docs, starts)]
    batch = pack_rows(parts, max(len(p[0]) for p in parts)).to(device)
    values = None
    if seen:
        x = torch.cat(seen, dim=1)
        values = (torch.cat([x, x]) if guided else x).reshape(-1, model.cfg.latent_patch_dim).to(device)
        batch.timestep = torch.zeros(values.shape[0], device=device)
    return model.step(batch, values, extend=True)[1]


def _uncached_pred(model, docs, starts, a, b, n_noised, done, rows_x, t_now, device):
    """The prediction for noised tokens [a, b) from the whole visible sequence, recomputed:
    the prompt, (acdit) the clean copies of the finished blocks, and the noised block."""
    acdit = model.cfg.mode == "acdit" and a > 0
    finished = torch.cat(done, dim=1) if acdit else None  # `done`: the blocks before [a, b), a tokens
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
