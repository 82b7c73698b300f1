"""Generation: cached text equals uncached; each denoising prediction equals a training-layout forward;
sampling guards."""
import dataclasses

import pytest
import torch

from model.generate import generate_text
from model.layout import LatentSegment, LayoutSpec, TextSegment, layout_document, pack_rows
from model.special_tokens import BOS
from model.transformer import UnifiedTransformer
from tests.test_model import randomize, tiny


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize(UnifiedTransformer(tiny(max_seq_len=64))).eval()


def test_cached_greedy_text_equals_uncached(model):
    prompt = [20, 31, 42, 53, 64]
    cached = generate_text(model, prompt, 24, stop=None)
    uncached = generate_text(model, prompt, 24, use_cache=False, stop=None)
    assert cached == uncached and len(cached) == 24
    assert len(set(cached)) > 1  # not a degenerate constant


def test_sampled_text_is_reproducible_and_seed_dependent(model):
    a = generate_text(model, [20, 21], 16, temperature=1.0, top_p=0.9, seed=1, stop=None)
    assert a == generate_text(model, [20, 21], 16, temperature=1.0, top_p=0.9, seed=1, use_cache=False, stop=None)
    assert a != generate_text(model, [20, 21], 16, temperature=1.0, top_p=0.9, seed=2, stop=None)


def test_prompt_longer_than_the_context_is_a_clear_error(model):
    with pytest.raises(ValueError, match="max_seq_len=64"):
        generate_text(model, list(range(20, 80)), 10)


from model.sample import make_scheduler, sample_latents  # noqa: E402


@pytest.mark.parametrize("mode,block_size,objective", [("monoformer", 0, "ddpm"), ("acdit", 4, "ddpm"),
                                                        ("acdit", 1, "flow")])
def test_cached_sampling_equals_uncached(mode, block_size, objective):
    torch.manual_seed(0)
    model = randomize(UnifiedTransformer(tiny(mode=mode, block_size=block_size, objective=objective))).eval()
    kw = dict(prompts=[[20, 21, 22], [30]], shape=(4, 4, 4), steps=3, cfg_scale=2.0, seed=5)
    cached = sample_latents(model, **kw)
    uncached = sample_latents(model, **kw, use_cache=False)
    assert cached.shape == (2, 4, 4, 4) and torch.isfinite(cached).all()
    torch.testing.assert_close(cached, uncached, rtol=1e-4, atol=1e-4)


class Recorder:
    """Stands in for the model in `sample_latents` and records every `step` call."""

    def __init__(self, model):
        self.model, self.cfg, self.calls = model, model.cfg, []

    def parameters(self):
        return self.model.parameters()

    def step(self, batch, latent_input=None, cache=None, extend=False):
        out = self.model.step(batch, latent_input, cache, extend)
        batch = dataclasses.replace(batch, timestep=batch.timestep.clone())  # the sampler reuses the batch
        self.calls.append((batch, latent_input, out[0].latent_pred, extend))
        return out


def training_layout_predictions(model, captions, shape, block, x, t, finished):
    """The prediction at the noised tokens of block [a, b) from one forward of the whole document
    laid out as the data pipeline lays it out for training ([caption] <boi> noised copy [clean
    copy] <eoi>, rows of different lengths padded): x_t in that block, the finished blocks in the
    clean copies before it, and noise everywhere the mask must hide from it (the other noised
    blocks, the clean copies from this block on, their timesteps)."""
    a, b = block
    spec = LayoutSpec.from_model_config(model.cfg)
    g = torch.Generator().manual_seed(99)
    docs = [layout_document([TextSegment([BOS] + c), LatentSegment(torch.zeros(shape), "generate")], spec)
            for c in captions]
    batch = pack_rows([[d] for d in docs], max(len(d) for d in docs) + 2)
    n_noised = int(docs[0].noisy.sum())
    P = model.cfg.latent_patch_dim
    latents = torch.randn(batch.latents.shape, generator=g)
    timestep = torch.rand(batch.latents.shape[0], generator=g)
    row_of = torch.arange(len(docs))[:, None].expand_as(batch.is_latent)[batch.is_latent]
    first = 0
    for r in range(len(docs)):  # latent rows of document r: its noised tokens, then its clean copy
        n = int((row_of == r).sum())
        latents[first + a:first + b] = x[r].reshape(-1, P)
        timestep[first + a:first + b] = t
        if n > n_noised:  # acdit: the clean copy
            latents[first + n_noised:first + n_noised + a] = finished[r][:a]
            timestep[first + n_noised:first + n_noised + n] = 0.0
        first += n
    batch.timestep = timestep
    out = model(batch, latents)
    starts = torch.tensor([0] + [int((row_of == r).sum()) for r in range(len(docs) - 1)]).cumsum(0)
    return torch.stack([out.latent_pred[s + a:s + b] for s in starts.tolist()])


@pytest.mark.parametrize("mode,block_size,objective,shape", [("monoformer", 0, "ddpm", (4, 4, 4)),
                                                              ("acdit", 4, "ddpm", (4, 8, 8)),
                                                              ("acdit", 1, "flow", (4, 4, 4)),
                                                              ("acdit", 4, "flow", (4, 3, 4, 4))])
def test_every_denoising_prediction_equals_a_training_layout_forward(mode, block_size, objective, shape):
    """The sampler's cached, piecewise prediction at each step = the training forward over the whole
    document, for both guidance rows, with prompts of different lengths; and each step applies
    uncond + cfg_scale * (cond - uncond) through the scheduler."""
    from model.sample import make_scheduler, unit_time
    torch.manual_seed(0)
    model = randomize(UnifiedTransformer(tiny(mode=mode, block_size=block_size, objective=objective))).eval()
    prompts, cfg_scale, steps = [[20, 21, 22, 23, 24], [30]], 2.5, 3
    rec = Recorder(model)
    sample = sample_latents(rec, prompts=prompts, shape=shape, steps=steps, cfg_scale=cfg_scale, seed=5)
    captions = prompts + [[], []]  # the null caption is <bos> alone
    denoise = [c for c in rec.calls if c[1] is not None and not c[3]]
    cleans = [c for c in rec.calls if c[1] is not None and c[3]]
    P = model.cfg.latent_patch_dim
    blocks = len(denoise) // steps
    assert blocks * steps == len(denoise) and len(cleans) == (blocks if mode == "acdit" else 0)
    size = denoise[0][1].shape[0] // len(captions)  # tokens per block
    finished = torch.zeros(len(captions), blocks * size, P)
    for i, (batch, x, pred, _) in enumerate(denoise):
        k = i // steps
        t = batch.timestep[0]
        with torch.no_grad():
            ref = training_layout_predictions(model, captions, shape, (k * size, (k + 1) * size),
                                              x.reshape(len(captions), size, P), t, finished)
        torch.testing.assert_close(pred.reshape(len(captions), size, P), ref, rtol=1e-4, atol=1e-4)
        if i % steps == steps - 1 and mode == "acdit":
            finished[:, k * size:(k + 1) * size] = cleans[k][1].reshape(len(captions), size, P)
    # replay the guidance and the scheduler over the recorded predictions
    scheduler = make_scheduler(model.cfg)
    scheduler.set_timesteps(steps)
    for k in range(blocks):
        x = denoise[k * steps][1].reshape(len(captions), size, P)[:2]
        for j, tt in enumerate(scheduler.timesteps):
            assert float(denoise[k * steps + j][0].timestep[0]) == pytest.approx(unit_time(model.cfg, scheduler, tt))
            pred = denoise[k * steps + j][2].reshape(len(captions), size, P).float()
            x = scheduler.step(pred[2:] + cfg_scale * (pred[:2] - pred[2:]), tt, x).prev_sample
            following = denoise[k * steps + j + 1][1] if j + 1 < steps else (
                cleans[k][1] if mode == "acdit" else None)
            if following is not None:
                torch.testing.assert_close(following.reshape(len(captions), size, P)[:2], x)
        scheduler = make_scheduler(model.cfg)
        scheduler.set_timesteps(steps)
    assert sample.shape == (2, *shape) and torch.isfinite(sample).all()


def test_cfg_scale_one_runs_no_null_caption_and_guidance_changes_the_sample():
    torch.manual_seed(0)
    model = randomize(UnifiedTransformer(tiny())).eval()
    kw = dict(prompts=[[20, 21]], shape=(4, 4, 4), steps=3, seed=1)
    rec = Recorder(model)
    plain = sample_latents(rec, **kw, cfg_scale=1.0)
    assert all(c[0].shape[0] == 1 for c in rec.calls)  # the prompt row only: no null-caption row
    assert not torch.allclose(sample_latents(model, **kw, cfg_scale=3.0), plain)


def test_video_sampling_in_frame_blocks():
    torch.manual_seed(0)
    model = randomize(UnifiedTransformer(tiny(mode="acdit", block_size=4))).eval()  # 2x2 tokens per frame
    kw = dict(prompts=[[20]], shape=(4, 3, 4, 4), steps=2, seed=2)
    video = sample_latents(model, **kw)
    assert video.shape == (1, 4, 3, 4, 4)
    torch.testing.assert_close(video, sample_latents(model, **kw, use_cache=False), rtol=1e-4, atol=1e-4)


def test_sampler_must_fit_the_objective():
    with pytest.raises(ValueError, match="sampler"):
        make_scheduler(tiny(objective="flow"), "ddim")


def test_a_video_longer_than_the_context_slides_the_cache_window():
    """ACDiT's long horizon: a model whose context holds 6 frames samples 24. The attention span
    (cache + the block run) never exceeds max_seq_len, the first 6 frames are those of a 6-frame
    sample with the same seed, and the cache refilled with the latest frames gives what recomputing
    each block's visible sequence gives."""
    from model.sample import window_shape
    spec = LayoutSpec.from_model_config(tiny(mode="acdit", block_size=4))
    prompts = [[20, 21, 22], [30]]
    six = layout_document([TextSegment([BOS] + prompts[0]), LatentSegment(torch.zeros(4, 6, 4, 4))], spec)
    torch.manual_seed(0)
    model = randomize(UnifiedTransformer(tiny(mode="acdit", block_size=4, max_seq_len=len(six) + 3))).eval()
    kw = dict(prompts=prompts, steps=2, cfg_scale=2.0, seed=4)
    assert window_shape(model, [[BOS] + p for p in prompts], (4, 24, 4, 4)) == [4, 6, 4, 4]
    spans = []

    class Spans(Recorder):
        def step(self, batch, latent_input=None, cache=None, extend=False):
            spans.append((len(cache) if cache is not None else 0) + batch.tokens.shape[1])
            return super().step(batch, latent_input, cache, extend)

    rec = Spans(model)
    long = sample_latents(rec, shape=(4, 24, 4, 4), **kw)
    assert long.shape == (2, 4, 24, 4, 4) and torch.isfinite(long).all()
    assert max(spans) <= model.cfg.max_seq_len and len(spans) > 24
    # frame 15 is denoised as the last frame of a 6-frame training document whose first five are
    # the five generated frames before it (both guidance rows)
    from model.patchify import patchify
    denoise = [c for c in rec.calls if c[1] is not None and not c[3]]
    frame = 4  # tokens per frame (2x2 patches), one frame per block
    tokens = torch.stack([patchify(v, 2) for v in long])  # 2, 24 * frame, P (raster = sequence order)
    finished = torch.cat([tokens, tokens])[:, 10 * frame:15 * frame]
    for batch, x, pred, _ in denoise[15 * 2:16 * 2]:
        with torch.no_grad():
            ref = training_layout_predictions(model, prompts + [[], []], (4, 6, 4, 4), (5 * frame, 6 * frame),
                                              x.reshape(4, frame, -1), batch.timestep[0], finished)
        torch.testing.assert_close(pred.reshape(4, frame, -1), ref, rtol=1e-4, atol=1e-4)
    short = sample_latents(model, shape=(4, 6, 4, 4), **kw)
    torch.testing.assert_close(long[:, :, :6], short, rtol=0, atol=0)
    torch.testing.assert_close(long, sample_latents(model, shape=(4, 24, 4, 4), use_cache=False, **kw),
                               rtol=1e-4, atol=1e-4)
    assert not torch.allclose(long[:, :, 6:12], long[:, :, :6])  # the frames after the window are new ones


def test_what_cannot_slide_must_fit_the_context():
    torch.manual_seed(0)
    mono = UnifiedTransformer(tiny(max_seq_len=30)).eval()
    with pytest.raises(ValueError, match="max_seq_len=30"):
        sample_latents(mono, prompts=[[20]], shape=(4, 8, 4, 4), steps=1)
    acdit = UnifiedTransformer(tiny(mode="acdit", block_size=8, max_seq_len=60)).eval()  # 2 frames a block
    with pytest.raises(ValueError, match="not whole blocks"):
        sample_latents(acdit, prompts=[[20]], shape=(4, 25, 4, 4), steps=1)
    one_block = UnifiedTransformer(tiny(mode="acdit", block_size=8, max_seq_len=30)).eval()  # 2 blocks: 36 tokens
    with pytest.raises(ValueError, match=r"max_seq_len=30\), which holds fewer than 2 blocks of 2 frames"):
        sample_latents(one_block, prompts=[[20]], shape=(4, 24, 4, 4), steps=1)
