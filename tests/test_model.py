"""UnifiedTransformer: back-end agreement, text-path equivalence, gradients, overfitting, save/load."""
import pytest
import torch

from model.config_system import ConfigError
from model.diffusion import Diffusion, assign_timesteps
from model.layout import LatentSegment, LayoutSpec, TextSegment, layout_document, pack_rows
from model.model_config import ModelConfig
from model.overfit import OverfitConfig, overfit
from model.synthetic import synthetic_batch
from model.transformer import UnifiedTransformer


def tiny(**kw):
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, latent_channels=4, patch_size=2,
                qk_norm=True)
    base.update(kw)
    return ModelConfig(**base)


def randomize(model, seed=0):
    """Give the zero-initialised parts (adaLN, latent head) values, so every path is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def packed_mixed_batch(cfg, seed=0):
    """Two rows: row 0 packs two caption+image documents, row 1 one document and padding."""
    g = torch.Generator().manual_seed(seed)
    spec = LayoutSpec.from_model_config(cfg)

    def doc(n_text, hw, role="generate", frames=0):
        shape = (cfg.latent_channels,) + ((frames,) if frames else ()) + (hw, hw)
        return layout_document([TextSegment(torch.randint(9, cfg.vocab_size, (n_text,)).tolist()),
                                LatentSegment(torch.randn(shape, generator=g), role),
                                TextSegment(torch.randint(9, cfg.vocab_size, (3,)).tolist())], spec)

    p = cfg.patch_size  # sides in patches: 2x2 and 1x1 tokens at any patch size
    rows = [[doc(5, 2 * p), doc(3, 2 * p, "both")], [doc(4, 2 * p, "context"), doc(2, p, frames=2)]]
    seq_len = max(sum(len(d) for d in r) for r in rows) + 3
    return assign_timesteps(pack_rows(rows, seq_len), Diffusion(cfg), g)


@pytest.mark.parametrize("mode,block_size", [("monoformer", 0), ("acdit", 1), ("acdit", 4)])
def test_flex_and_sdpa_agree_in_forward_on_cpu(mode, block_size):
    cfg = tiny(mode=mode, block_size=block_size, attention="sdpa")
    torch.manual_seed(0)
    model = randomize(UnifiedTransformer(cfg)).eval()
    batch = packed_mixed_batch(cfg)
    with torch.no_grad():
        ref = model(batch)
        model.cfg = cfg.replace(attention="flex")
        out = model(batch)
    real = batch.doc != -1
    rel = (out.hidden[real] - ref.hidden[real]).norm() / ref.hidden[real].norm()
    assert rel < 1e-3
    assert (out.latent_pred - ref.latent_pred).norm() / ref.latent_pred.norm() < 1e-3
    assert torch.isfinite(ref.hidden).all() and torch.isfinite(out.hidden).all()


@pytest.mark.gpu
@pytest.mark.parametrize("mode,block_size", [("monoformer", 0), ("acdit", 4)])
def test_flex_and_sdpa_agree_in_outputs_and_gradients_on_cuda(mode, block_size):
    cfg = tiny(mode=mode, block_size=block_size, attention="sdpa")
    torch.manual_seed(0)
    model = randomize(UnifiedTransformer(cfg)).cuda()
    batch = packed_mixed_batch(cfg).to("cuda")
    results = []
    for backend in ("sdpa", "flex"):
        model.cfg = cfg.replace(attention=backend)
        model.zero_grad()
        loss = model.loss(batch, generator=torch.Generator().manual_seed(1))["loss"]
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert abs(l0 - l1) / abs(l0) < 1e-3
    for name in g0:
        assert (g0[name] - g1[name]).norm() <= 1e-3 * g0[name].norm() + 1e-8, name


def test_text_only_batch_equals_each_document_alone():
    cfg = tiny()
    torch.manual_seed(0)
    model = UnifiedTransformer(cfg).eval()
    spec = LayoutSpec.from_model_config(cfg)
    docs = [layout_document([TextSegment(torch.randint(9, 128, (n,)).tolist())], spec) for n in (7, 5, 4)]
    packed = pack_rows([docs[:2], docs[2:]], seq_len=13)
    with torch.no_grad():
        logits = model.logits(packed)
        for row, (doc, start) in [(0, (docs[0], 0)), (0, (docs[1], 7)), (1, (docs[2], 0))]:
            alone = model.logits(pack_rows([[doc]], len(doc)))[0]
            torch.testing.assert_close(logits[row, start:start + len(doc)], alone, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(logits).all()  # padding rows included


def test_gradients_reach_both_heads():
    cfg = tiny()
    torch.manual_seed(0)
    model = UnifiedTransformer(cfg)
    batch = packed_mixed_batch(cfg)
    losses = model.loss(batch, generator=torch.Generator().manual_seed(0))
    assert losses["lm_loss"] > 0 and losses["diffusion_loss"] > 0
    losses["loss"].backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.latent_out.weight.grad.abs().sum() > 0  # the zero-initialised latent head learns
    assert model.latent_in.weight.grad.abs().sum() > 0  # clean copies feed the text after them


@pytest.mark.slow
@pytest.mark.parametrize("objective,mode,block_size,steps,copies", [("ddpm", "monoformer", 0, 800, 16),
                                                                   ("flow", "acdit", 4, 600, 4)])
def test_tiny_model_overfits_with_random_timesteps_and_noise(objective, mode, block_size, steps, copies):
    """Timesteps and noise drawn anew at every step, as in training (`copies` rows per document, each
    with its own). Each image is then sampled back from its caption (ACDiT: block by block through
    the KV cache). ddpm's epsilon model needs more steps: its image error is its noise error times
    sqrt(1-a)/sqrt(a), large where the noise dominates."""
    from model.overfit import sample_back
    cfg = OverfitConfig(model=tiny(dim=128, objective=objective, mode=mode, block_size=block_size),
                        steps=steps, copies=copies, lr=5e-3, text_len=8, latent_hw=8)
    model, history = overfit(cfg, log=None)
    assert history[-1]["lm_loss"] < history[0]["lm_loss"] / 10
    assert max(sample_back(model, cfg)) < 0.05


def test_v_prediction_target_and_sampler():
    """ddpm with prediction=v_prediction: the target is sqrt(a) eps - sqrt(1-a) x0, and the samplers
    read the model's output as v."""
    from model.sample import make_scheduler
    cfg = tiny(prediction="v_prediction")
    d = Diffusion(cfg)
    g = torch.Generator().manual_seed(0)
    x0, eps, t = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g), torch.rand(5, generator=g)
    xt, target = d.noise(x0, eps, t)
    a = d.scheduler.alphas_cumprod[d.discrete_step(t)][:, None]
    assert torch.allclose(xt, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-6)
    assert torch.allclose(target, a.sqrt() * eps - (1 - a).sqrt() * x0, atol=1e-6)
    assert torch.allclose(a.sqrt() * xt - (1 - a).sqrt() * target, x0, atol=1e-5)  # x0 back from v
    for sampler in ("ddim", "dpm++"):
        assert make_scheduler(cfg, sampler).config.prediction_type == "v_prediction"
    with pytest.raises(ConfigError, match="prediction"):
        tiny(objective="flow", prediction="v_prediction")


def test_save_and_load_reproduce_outputs_bit_for_bit(tmp_path):
    cfg = tiny(objective="flow", mode="acdit", block_size=4)
    torch.manual_seed(0)
    model = randomize(UnifiedTransformer(cfg)).eval()
    batch = packed_mixed_batch(cfg)
    model.save_pretrained(tmp_path / "release")
    loaded = UnifiedTransformer.from_pretrained(tmp_path / "release")
    assert loaded.cfg == cfg
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.latent_pred, b.latent_pred)
    g = torch.Generator
    assert torch.equal(model.loss(batch, g().manual_seed(3))["loss"], loaded.loss(batch, g().manual_seed(3))["loss"])


def test_from_pretrained_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        UnifiedTransformer.from_pretrained(tmp_path)


def test_latent_count_mismatch_names_latents():
    cfg = tiny()
    model = UnifiedTransformer(cfg)
    batch = synthetic_batch(cfg, 1, 4, 4)
    batch.latents = batch.latents[:-1]
    with pytest.raises(ValueError, match="latents"):
        model(batch)


def test_latent_width_mismatch_names_latents():
    cfg = tiny()
    batch = synthetic_batch(cfg.replace(latent_channels=3), 1, 4, 4)
    with pytest.raises(ValueError, match="latents"):
        UnifiedTransformer(cfg)(batch)


def test_image_not_divisible_by_patch_names_patch_size():
    with pytest.raises(ValueError, match="patch_size"):
        layout_document([LatentSegment(torch.randn(4, 5, 4))], LayoutSpec(patch_size=2))


def test_bad_block_size_names_block_size():
    with pytest.raises(ValueError, match="block_size"):
        layout_document([LatentSegment(torch.randn(4, 8, 8))], LayoutSpec(mode="acdit", patch_size=2, block_size=3))


@pytest.mark.parametrize("field,value", [("objective", "score"), ("attention", "xformers"), ("mode", "dit")])
def test_unknown_choice_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{field: value})
    assert issubclass(ConfigError, ValueError)


def test_every_parameter_gets_a_gradient_from_a_text_only_batch():
    """Data-parallel ranks must reduce the same parameters whatever their batch holds."""
    cfg = tiny()
    model = UnifiedTransformer(cfg).train()
    spec = LayoutSpec.from_model_config(cfg)
    batch = pack_rows([[layout_document([TextSegment(list(range(10, 30)))], spec)]], 24)
    loss = model.loss(batch)["loss"]
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    latent_only = [p for n, p in model.named_parameters()
                   if n.split(".")[0] in ("latent_in", "time_embed", "ada", "final_ada", "latent_out")
                   or n.endswith("ada_table")]
    assert len(latent_only) == 12 + cfg.n_layers and all(p.grad.abs().sum() == 0 for p in latent_only)
    with torch.no_grad():  # ... and the text path is exactly the plain Llama block, in eval mode too
        assert torch.equal(model.eval().loss(batch)["loss"], loss.detach())


def test_every_parameter_gets_a_gradient_from_a_batch_without_text_targets():
    cfg = tiny()
    model = UnifiedTransformer(cfg).train()
    batch = synthetic_batch(cfg, 1, 0, 4)
    model.loss(batch)["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_training_passes_ask_for_the_training_backend_and_inference_for_the_other():
    """`auto` picks flex on CUDA only for passes that train; sampling and evaluation (no gradient,
    or a KV cache) must say they are inference."""
    from model.generate import generate_text
    cfg = tiny()
    model = UnifiedTransformer(cfg)
    asked = []
    real = model.attention_backend
    model.attention_backend = lambda device, inference=False: asked.append(inference) or real(device, inference)
    batch = packed_mixed_batch(cfg)
    model.train().loss(batch)
    assert asked == [False]
    with torch.no_grad():
        model.eval().loss(batch)
    generate_text(model, [10, 11, 12], max_new_tokens=3)
    assert asked[1:] and all(asked[1:])
