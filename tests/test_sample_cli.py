"""The sample CLI on a model trained for a few steps: PNG, GIF, release folders, clear errors."""
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from data_pipelines.write_shards import write_shards
from pretrain.export.release import load_for_sampling
from tests.launch import REPO, cleanup_shm, env, train_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_run(test_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    write_shards("moving_digits", str(root / "video"), str(test_data["tokenizer"]), channels=1, samples_per_shard=8,
                 num_samples=8, frames=4, canvas=16, progress=False)
    cfg = (REPO / "configs/tiny-cpu.yaml").read_text().replace("runs/demo/data/digits-heldout", str(test_data["digits"])) \
        .replace("runs/demo/data/digits", str(test_data["digits"])) \
        .replace("runs/demo/data/text", str(root / "video")).replace("vocab_size: 2000", "vocab_size: 1000")
    (root / "tiny.yaml").write_text(cfg)
    run = root / "run"
    r = train_cli(["--config", str(root / "tiny.yaml"), f"run.dir={run}", "train.max_steps=4", "wandb.mode=disabled",
                   "data.num_workers=0", "data.seq_len=512", "model.max_seq_len=600"])
    assert r.returncode == 0, r.stderr[-3000:]
    yield run
    cleanup_shm()


def sample_cli(*args):
    return subprocess.run([sys.executable, "-m", "pretrain.sample", *map(str, args)], cwd=REPO, env=env(),
                          capture_output=True, text=True)


def grid_tiles(png, n: int, h: int, w: int, pad: int = 2, cols: int = None) -> list:
    """The n tiles (h x w, RGB) of a grid written by pretrain.images.save_image_grid."""
    import math
    import numpy as np
    cols = cols or math.ceil(math.sqrt(n))
    with Image.open(png) as im:
        grid = np.asarray(im.convert("RGB"))
    k = grid.shape[1] // (cols * (w + pad) + pad)  # the upscale factor
    grid = grid[::k, ::k]
    return [grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w]
            for r, q in (divmod(i, cols) for i in range(n))]


@pytest.mark.parametrize("where", ["run", "step", "release"])
def test_cli_writes_a_png_grid_from_a_run_a_checkpoint_or_a_release(trained_run, tmp_path, where):
    from pretrain.convert import to_release
    model = {"run": trained_run, "step": trained_run / "checkpoints/step_00000004",
             "release": tmp_path / "release"}[where]
    if where == "release":
        to_release(trained_run / "checkpoints/step_00000004", model)
    out = tmp_path / "digits.png"
    r = sample_cli("--model", model, "--prompt", "a handwritten digit seven", "--out", out, "--n", 4,
                   "--steps", 3, "--cfg", 2.0)
    assert r.returncode == 0, r.stderr[-3000:]
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] >= 256 and im.size[0] == im.size[1]
    tiles = grid_tiles(out, 4, 8, 8)
    for t in tiles:  # a NaN decodes to a black tile, a dead model to a flat one
        assert t.max() > 0 and t.std() > 0
    assert len({t.tobytes() for t in tiles}) == 4  # four different samples


def test_cli_writes_a_gif_for_video(trained_run, tmp_path):
    out = tmp_path / "clip.gif"
    r = sample_cli("--model", trained_run, "--prompt", "digit three moving up and left", "--kind", "video",
                   "--out", out, "--n", 2, "--steps", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    with Image.open(out) as im:
        assert im.format == "GIF" and im.n_frames == 4


def test_release_folder_samples_like_the_run(trained_run, tmp_path):
    from pretrain.convert import to_release
    release = to_release(trained_run / "checkpoints/step_00000004", tmp_path / "release")
    assert {p.name for p in release.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.model",
                                                   "release.json", "README.md"}
    a, b = load_for_sampling(release), load_for_sampling(trained_run)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert a.info["provenance"]["weights"] == "ema" and a.info["latent_shapes"]["image"] == [1, 8, 8]
    r = sample_cli("--model", release, "--prompt", "a handwritten digit", "--kind", "text", "--max-new-tokens", 5)
    assert r.returncode == 0 and r.stdout.startswith("a handwritten digit"), r.stderr[-2000:]


def test_prompt_longer_than_the_context_is_a_clear_error(trained_run, tmp_path):
    long_prompt = " ".join(str(i) for i in range(1000))  # well over 600 tokens
    r = sample_cli("--model", trained_run, "--prompt", long_prompt, "--out", tmp_path / "x.png", "--n", 1)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "max_seq_len=600" in errors[0]


def test_a_kind_the_model_was_not_trained_on_is_a_clear_error(trained_run, tmp_path, test_data):
    from pretrain.convert import to_release
    release = to_release(trained_run / "checkpoints/step_00000004", tmp_path / "release")
    import json
    info = json.loads((release / "release.json").read_text())
    del info["latent_shapes"]["video"]
    (release / "release.json").write_text(json.dumps(info))
    r = sample_cli("--model", release, "--prompt", "x", "--kind", "video", "--out", tmp_path / "v.gif")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "not trained on video" in errors[0] and "image" in errors[0]


def test_the_ema_of_a_short_run_follows_training_not_the_initialisation(trained_run):
    """EMA warmup: after 4 steps at decay 0.99 the EMA sits near the trained weights; without the
    warmup it would still be ~96% the initialisation."""
    from model.transformer import UnifiedTransformer
    ema, raw = load_for_sampling(trained_run).model, load_for_sampling(trained_run, ema=False).model
    torch.manual_seed(0)  # run.seed: the trainer's initialisation
    init = UnifiedTransformer(raw.cfg).state_dict()
    e, r = ema.state_dict(), raw.state_dict()
    to_raw = sum(float((e[k] - r[k]).norm()) for k in r if r[k].is_floating_point())
    to_init = sum(float((e[k] - init[k]).norm()) for k in r if r[k].is_floating_point())
    assert to_raw < 0.5 * to_init


def test_quality_cli_writes_a_row_per_digit_and_the_scores_of_its_samples(trained_run, tmp_path):
    """The scores describe the grid a user looks at: each PNG tile (decoded from the image, not the
    CLI's own arrays) read by the judge, whose readings of real digits are checked against their
    labels in tests/test_quality.py; overall and per digit, as the JSON and the console say."""
    import numpy as np
    from pretrain.quality import digit_classifier
    r = subprocess.run([sys.executable, "-m", "pretrain.quality", "--model", str(trained_run), "--per-digit", "3",
                        "--steps", "2", "--out", str(tmp_path / "digits.png"), "--json", str(tmp_path / "s.json")],
                       cwd=REPO, env=env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    tiles = grid_tiles(tmp_path / "digits.png", 30, 8, 8, cols=3)  # 3 a row: row d holds digit d's samples
    shown = np.stack([t[..., 0] / 255.0 for t in tiles])
    read = digit_classifier().predict(shown)
    wanted = np.repeat(np.arange(10), 3)
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["digit_accuracy"] == pytest.approx(float((read == wanted).mean()), abs=1 / 30 + 1e-9)
    for d in range(10):
        assert scores[f"digit_accuracy_{d}"] == pytest.approx(float((read[wanted == d] == d).mean()), abs=1 / 3 + 1e-9)
    assert f"{scores['digit_accuracy']:.1%} of 30 samples" in r.stdout
    saved = np.load(tmp_path / "digits.npz")  # the arrays kept beside the grid are the grid's images
    assert saved["wanted"].tolist() == wanted.tolist()
    assert np.allclose(shown, saved["images"], atol=1 / 255 + 1e-6)