"""Image-to-text: image-first documents (layout, mask, losses, mixing), captioning through the KV
cache, the caption CLI and the held-out split."""
import numpy as np
import pytest
import torch

from data_pipelines.documents import build_document
from model.attention import attention_mask
from model.generate import caption_document, caption_latents
from model.layout import LayoutSpec, pack_rows
from model.packed_batch import TEXT
from model.special_tokens import BOI, BOS, EOI, EOS, LATENT
from model.transformer import UnifiedTransformer
from tests.test_model import randomize, tiny

CAPTION = [20, 21]
SAMPLE = [{"tokens": CAPTION}, {"latent": np.arange(16, dtype=np.float16).reshape(1, 4, 4)}]  # 2x2 tokens at patch 2


def mask_of(doc) -> torch.Tensor:
    batch = pack_rows([[doc]], len(doc))
    return attention_mask(batch.doc, batch.unit, batch.noisy)[0].int()


def hand_mask(image_rows: str) -> torch.Tensor:
    """<bos> <boi> 4 image tokens <eoi> 20 21 <eos>: causal everywhere, the image tokens see each other
    as `image_rows` says ("full": bidirectional, one unit; "causal": blocks of one token)."""
    m = torch.tril(torch.ones(10, 10, dtype=torch.int))
    if image_rows == "full":
        m[2:6, 2:6] = 1
    return m


@pytest.mark.parametrize("mode,block_size,image_rows", [("monoformer", 0, "full"), ("acdit", 1, "causal"),
                                                         ("acdit", 4, "full")])
def test_an_image_first_document_lets_the_caption_see_the_whole_clean_image_and_the_image_nothing_after(
        mode, block_size, image_rows):
    spec = LayoutSpec(mode=mode, patch_size=2, block_size=block_size)
    doc = build_document(SAMPLE, spec, "generate", drop_caption=True, add_bos_eos=True, image_first=True)
    assert doc.tokens.tolist() == [BOS, BOI] + [LATENT] * 4 + [EOI] + CAPTION + [EOS]
    assert not doc.noisy.any() and not doc.latent_loss.any()  # the clean copy only: no diffusion loss
    assert torch.equal(doc.latents, torch.from_numpy(SAMPLE[1]["latent"]).float().reshape(1, 2, 2, 2, 2)
                       .permute(1, 3, 0, 2, 4).reshape(4, 4))  # the image itself (patchified), not noise
    # the caption is the target ("dropped" captions stay: in image-first documents they are what is learnt)
    assert doc.text_loss.tolist() == [True, False, False, False, False, False, True, True, True, False]
    assert torch.equal(mask_of(doc), hand_mask(image_rows))


def test_without_image_first_the_caption_comes_first_and_the_image_is_generated():
    spec = LayoutSpec(mode="monoformer", patch_size=2)
    doc = build_document(SAMPLE, spec, "generate", drop_caption=False, add_bos_eos=True, image_first=False)
    assert doc.tokens.tolist() == [BOS] + CAPTION + [BOI] + [LATENT] * 4 + [EOI, EOS]
    assert doc.latent_loss.sum() == 4
    m = mask_of(doc)
    assert m[8, 4:8].sum() == 0 and m[4:8, :4].all()  # <eoi> does not see the noised image (MonoFormer: later text sees clean copies)


def test_image_first_moves_only_captioned_latents_and_needs_bos_eos():
    from data_pipelines.config import DataConfig, DatasetConfig
    from model.config_system import ConfigError
    spec = LayoutSpec(mode="monoformer", patch_size=2)
    lat = {"latent": np.zeros((1, 4, 4), np.float16)}
    doc = build_document([{"tokens": [30]}, {"tokens": CAPTION}, lat, lat], spec, "generate", False, True, True)
    # text, then the captioned image clean and its caption, then the uncaptioned image still generated
    assert doc.tokens.tolist() == [BOS, 30, BOI] + [LATENT] * 4 + [EOI] + CAPTION + [BOI] + [LATENT] * 4 + [EOI, EOS]
    assert doc.latent_loss.sum() == 4 and doc.latent_loss[-6:-2].all()
    with pytest.raises(ConfigError, match="add_bos_eos: image_first needs it"):
        DataConfig(datasets=[DatasetConfig(path="d", image_first=0.5)], add_bos_eos=False)


def test_captioning_lays_the_image_out_as_training_does():
    for spec in (LayoutSpec("monoformer", 2, 0), LayoutSpec("acdit", 2, 1)):
        train = build_document(SAMPLE, spec, "generate", False, True, image_first=True)
        sample = caption_document(torch.from_numpy(SAMPLE[1]["latent"]).float(), CAPTION + [EOS], spec)
        for field in ("tokens", "modality", "unit", "noisy", "pos", "text_loss", "latent_loss", "latents"):
            assert torch.equal(getattr(train, field), getattr(sample, field)), field


@pytest.mark.parametrize("mode,block_size", [("monoformer", 0), ("acdit", 4), ("acdit", 1)])
def test_captions_through_the_cache_equal_full_forward_passes(mode, block_size):
    torch.manual_seed(0)
    model = randomize(UnifiedTransformer(tiny(mode=mode, block_size=block_size, latent_channels=1))).eval()
    latents = torch.randn(6, 1, 8, 8)
    greedy = caption_latents(model, latents, 12, stop=())
    assert greedy == caption_latents(model, latents, 12, stop=(), use_cache=False)
    assert len({tuple(c) for c in greedy}) > 1  # the caption depends on the image
    # rows stop at their own time; tokens drawn after a row's stop do not change the others
    stop = greedy[0][3]
    stopped = caption_latents(model, latents, 12, stop=(stop,))
    assert stopped == caption_latents(model, latents, 12, stop=(stop,), use_cache=False)
    assert [c[:c.index(stop)] if stop in c else c for c in greedy] == stopped
    sampled = caption_latents(model, latents, 12, temperature=1.0, top_p=0.9, seed=3, stop=())
    assert sampled == caption_latents(model, latents, 12, temperature=1.0, top_p=0.9, seed=3, stop=(), use_cache=False)
    # a row's sampled caption does not depend on the rows beside it
    assert caption_latents(model, latents[2:3], 12, temperature=1.0, top_p=0.9, stop=(), seeds=[5])[0] == sampled[2]


def test_image_first_documents_are_mixed_in_by_probability(test_data):
    """A dataset's `image_first` decides per sample (stateless, the same on every read): about that
    share of its documents comes image first, the rest as text-to-image documents."""
    from data_pipelines.loader import PackedLoader
    from tests.data_fixtures import data_config, model_config

    def shares(p):
        cfg = data_config(test_data["digits"], num_workers=0, caption_dropout=0.0)
        cfg.datasets[0].image_first = p
        first = total = 0
        for batch in PackedLoader(cfg, model_config(), 4, 0, 1):
            for row in range(batch.tokens.shape[0]):
                for d in batch.doc[row].unique().tolist():
                    if d < 0:
                        continue
                    at = batch.doc[row] == d
                    clean = (batch.modality[row][at] != TEXT) & ~batch.noisy[row][at]
                    toks = batch.tokens[row][at].tolist()
                    first += int(clean.any())
                    total += 1
                    boi = toks.index(BOI)
                    assert (boi == 1) == bool(clean.any())  # image first <=> nothing between <bos> and <boi>
                    assert (batch.text_loss[row][at].sum() > 1) or boi > 1
        return first / total, total

    assert shares(0.0) == (0.0, 1797)
    share, total = shares(0.5)
    assert total == 1797 and 0.45 < share < 0.55
    assert shares(1.0) == (1.0, 1797)
    assert shares(0.5) == (share, total)  # the same documents each time


def test_the_demo_keeps_the_last_300_digits_out_of_training_in_both_directions(tmp_path):
    from data_pipelines.demo_data import build
    from data_pipelines.shards import iter_shard_documents
    from data_pipelines.sources import digit_split
    from sklearn.datasets import load_digits
    assert list(digit_split("heldout")) == list(range(1497, 1797)) and list(digit_split("train")) == list(range(1497))
    info = build(tmp_path, text_docs=20, heldout_docs=4)
    assert info["digits"].num_samples == 1497 and info["digits-heldout"].num_samples == 300

    def images(name):  # the pixels encoder's latents back to sklearn's 0..16 levels
        return [tuple(np.rint((s[1]["latent"].astype(np.float32) + 1) * 8).astype(int).flatten())
                for _, s in iter_shard_documents(tmp_path / name)]
    real = load_digits().images.astype(int)
    assert images("digits-heldout") == [tuple(real[i].flatten()) for i in range(1497, 1797)]
    trained = set(images("digits"))
    assert len(trained) == 1497 and not trained & set(images("digits-heldout"))
    # a folder built before the split (all 1,797 digits) is rebuilt, not reused
    (tmp_path / "digits" / "shard-000009.tar").write_bytes(b"stale")
    manifest = (tmp_path / "digits" / "manifest.json")
    manifest.write_text(manifest.read_text().replace('"split": "train"', '"split": "all"'))
    build(tmp_path, text_docs=20, heldout_docs=4)
    assert not (tmp_path / "digits" / "shard-000009.tar").exists() and set(images("digits")) == trained


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [3, 1])
def test_two_ranks_train_both_directions_and_caption_held_out_digits_from_the_ema(tiny_config, test_data, tmp_path,
                                                                                  stage):
    """2 ranks, DataLoader workers on, digits both ways (image_first 0.5) beside text, evaluation on
    held-out digits and text: the logged caption accuracy is that of the captions the checkpoint's
    EMA gives afterwards, which the run wrote down."""
    import subprocess
    import sys
    from data_pipelines.write_shards import write_shards
    from pretrain.distributed import free_port
    from pretrain.evaluation.captioning import caption_latent_batches, caption_set, one_line, score_captions
    from pretrain.export.release import load_for_sampling
    from tests.launch import REPO, env, metrics
    common = dict(tokenizer=str(test_data["tokenizer"]), encoder="pixels", channels=1, progress=False)
    write_shards("digits", str(tmp_path / "held"), split="heldout", num_samples=24, samples_per_shard=12, **common)
    run = tmp_path / "run"
    datasets = (f"data.datasets=[{{path: {test_data['digits']}, weight: 0.9, image_first: 0.5}}, "
                f"{{path: {test_data['text']}, weight: 0.1}}]")
    held_out = (f"data.eval_datasets=[{{path: {tmp_path / 'held'}, image_first: 0.5}}, "
                f"{{path: {test_data['text']}}}]")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "pretrain.train", "--config", str(tiny_config), f"run.dir={run}", f"train.zero_stage={stage}",
           "train.max_steps=4", "train.log_interval=1", "train.eval_interval=2", "train.eval_batches=2",
           "data.num_workers=1", "wandb.mode=disabled", datasets, held_out, "train.sample_prompts=[]",
           "train.caption_quality=digits", "train.caption_samples=20", "train.caption_max_tokens=8",
           "train.ema_warmup=false", "train.ema_decay=0.5"]
    r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = metrics(run)
    for step in (2, 4):
        assert 0 < m[step]["eval/lm_loss"] < 20 and 0 < m[step]["eval/diffusion_loss"] < 20
        assert 0 <= m[step]["sample/caption_accuracy"] <= 1
    rows = (run / "samples" / "step_00000004.captions.tsv").read_text().splitlines()
    latents, ids = caption_set([str(tmp_path / "held")], 20)
    loaded = load_for_sampling(run)
    captions = caption_latent_batches(loaded, latents, 8)
    from data_pipelines.tokenizer import load_tokenizer
    references = [load_tokenizer(loaded.tokenizer).decode(x) for x in ids]
    assert rows == ["reference\tcaption"] + [f"{one_line(a)}\t{one_line(b)}" for a, b in zip(references, captions)]
    assert m[4]["sample/caption_accuracy"] == score_captions(captions, references)["caption_accuracy"]


@pytest.fixture(scope="module")
def captioner(test_data, tmp_path_factory):
    """A release of a small model trained (in this process) to caption one digit of each kind, as
    image-first documents built from the test shards."""
    from data_pipelines.encoders import PixelEncoder
    from data_pipelines.shards import iter_shard_documents
    from model.diffusion import Diffusion, assign_timesteps
    from pretrain.export.release import save_release
    from tests.data_fixtures import model_config
    docs = list(iter_shard_documents(test_data["digits"]))[:10]  # digits 0..9, in the source's order
    cfg = model_config(max_seq_len=64)
    spec = LayoutSpec.from_model_config(cfg)
    batch = pack_rows([[build_document(segs, spec, "generate", False, True, image_first=True)] for _, segs in docs], 32)
    torch.manual_seed(0)
    model = UnifiedTransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(150):
        g = torch.Generator().manual_seed(step)
        loss = model.loss(assign_timesteps(batch, Diffusion(cfg), g), generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("captioner") / "release"
    save_release(model.eval(), out, {"encoder": PixelEncoder(1).describe(), "latent_shapes": {"image": [1, 8, 8]}},
                 test_data["tokenizer"])
    return out


def digit_png(path, digit: int, side: int, mode: str = "L"):
    from PIL import Image
    from sklearn.datasets import load_digits
    if mode == "I;16":  # a 16-bit grey PNG
        pixels = (load_digits().images[digit] / 16.0 * 65535).round().astype(np.uint16).repeat(side // 8, 0)
        Image.fromarray(pixels.repeat(side // 8, 1)).save(path)
        return path
    pixels = (load_digits().images[digit] / 16.0 * 255).round().astype(np.uint8)
    Image.fromarray(pixels).resize((side, side), Image.Resampling.NEAREST).convert(mode).save(path)
    return path


@pytest.mark.slow
def test_caption_cli_prints_a_line_per_image_from_pngs_of_any_size(captioner, tmp_path):
    import subprocess
    import sys
    from data_pipelines.sources import DIGIT_NAMES
    from tests.launch import REPO, env
    files = [digit_png(tmp_path / f"d{d}.png", d, side, mode)
             for d, side, mode in [(0, 8, "L"), (3, 64, "L"), (7, 40, "RGB"), (9, 200, "L"), (5, 32, "I;16")]]
    r = subprocess.run([sys.executable, "-m", "pretrain.sample", "--model", str(captioner), "--kind", "caption",
                        *[a for f in files for a in ("--image", str(f))], "--max-new-tokens", "12"],
                       cwd=REPO, env=env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(f) for f in files]
    assert [line.split("\t")[1] for line in lines] == [f"a handwritten digit {DIGIT_NAMES[d]}" for d in (0, 3, 7, 9, 5)]
    r = subprocess.run([sys.executable, "-m", "pretrain.sample", "--model", str(captioner), "--kind", "caption",
                        "--image", str(tmp_path / "missing.png")], cwd=REPO, env=env(), capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error:") and "missing.png" in r.stderr


def test_caption_evaluation_that_could_not_run_stops_the_run_before_training(tiny_config, test_data, tmp_path):
    from data_pipelines.shards import load_manifest
    from model.config_system import ConfigError, load_config
    from pretrain.config import ExperimentConfig
    from pretrain.evaluation.in_loop import EvalSampler
    common = [f"run.dir={tmp_path}", "train.eval_interval=5", "train.caption_quality=digits", "train.sample_prompts=[]"]

    def sampler(*extra):
        cfg = load_config(ExperimentConfig, tiny_config, [*common, *extra])
        return EvalSampler(cfg, [load_manifest(d.path) for d in cfg.data.datasets])

    ok = sampler(f"data.eval_datasets=[{{path: {test_data['digits']}}}]", "train.caption_samples=7")
    assert ok.enabled and len(ok.caption_latents) == 7 and ok.caption_refs[0].startswith("a handwritten digit")
    with pytest.raises(ConfigError, match="eval_datasets hold no \\(caption, image\\) sample"):
        sampler(f"data.eval_datasets=[{{path: {test_data['text']}}}]")
    with pytest.raises(ConfigError, match="caption_max_tokens.*max_seq_len=64"):
        sampler(f"data.eval_datasets=[{{path: {test_data['digits']}}}]", "model.max_seq_len=64",
                "train.caption_max_tokens=60")
    with pytest.raises(ConfigError, match="caption_quality: 'pixels' is not one of digits|exact"):
        sampler("train.caption_quality=pixels")


@pytest.mark.slow
@pytest.mark.distributed
def test_a_held_out_set_rank_0_cannot_read_stops_every_rank_with_one_line(tiny_config, tmp_path):
    """Rank 0 alone reads the images to caption when the trainer is built: when it cannot, every rank
    stops at once (not at the process group's timeout), each with one error line."""
    import subprocess
    import sys
    from pretrain.distributed import free_port
    from tests.launch import REPO, env
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "pretrain.train", "--config", str(tiny_config), f"run.dir={tmp_path / 'run'}", "train.max_steps=2",
           "train.eval_interval=1", "train.caption_quality=digits", "wandb.mode=disabled", "data.num_workers=1",
           f"data.eval_datasets=[{{path: {tmp_path / 'nowhere'}}}]"]
    r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert r.returncode != 0 and len(errors) == 2, r.stderr[-3000:]
    assert any(e.startswith("error (rank 0): train.caption_quality=digits: data.eval_datasets:") and "nowhere" in e
               for e in errors)
    assert any(e.startswith("error (rank 1): stopping: rank 0") for e in errors)


@pytest.mark.slow
def test_quality_task_caption_scores_the_300_held_out_digits(captioner, tmp_path):
    import json
    import subprocess
    import sys
    from pretrain.evaluation.captioning import evaluate_heldout_captions, heldout_digits
    from pretrain.export.release import load_for_sampling
    from tests.launch import REPO, env
    r = subprocess.run([sys.executable, "-m", "pretrain.quality", "--model", str(captioner), "--task", "caption",
                        "--json", str(tmp_path / "q.json")], cwd=REPO, env=env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads((tmp_path / "q.json").read_text())
    want = evaluate_heldout_captions(load_for_sampling(captioner))
    assert got["captions"] == 300 and got["caption_accuracy"] == want["caption_accuracy"]
    assert f"image-to-text: {want['caption_accuracy']:.1%} of the 300 held-out digits" in r.stdout
    _, references = heldout_digits()
    assert [ref for ref, _ in got["examples"]] == references[:5]


def test_the_digit_judge_wants_the_one_digit_shown():
    from pretrain.evaluation.captioning import names_same_digit, score_captions
    ref = "a handwritten digit seven"
    assert names_same_digit("a handwritten digit seven", ref)
    assert not names_same_digit("a handwritten digit one", ref)
    assert not names_same_digit("a handwritten digit", ref)  # names none
    assert not names_same_digit("a handwritten digit seven or one", ref)  # hedges
    assert score_captions(["a handwritten digit seven", "seven", "one"], [ref] * 3)["caption_accuracy"] == 2 / 3
    with pytest.raises(ValueError, match="names no digit"):
        names_same_digit("seven", "a cat")
