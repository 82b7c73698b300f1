"""to-release from 2-rank ZeRO-1/2/3 checkpoints (fp32 and bf16 training): the release folders load
with from_pretrained and hold the live trainer's weights and EMA; sharded output loads the same;
bad checkpoints give one-line errors and leave nothing at OUT."""
import json
import os
import re
import socket
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.launch import REPO, env
from pretrain.distributed import free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
RUNS = {}


def trained(tiny_config, tmp_path_factory, stage, precision, ranks=2):
    """A run of 3 steps with an EMA: its checkpoint and the trainer's live state at the end."""
    if (stage, precision, ranks) not in RUNS:
        run = tmp_path_factory.mktemp(f"zero{stage}-{precision}-{ranks}") / "run"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
               str(free_port()),
               "-m", "tests.live_weights", "--config", str(tiny_config), f"run.dir={run}", "wandb.mode=disabled",
               f"train.zero_stage={stage}", f"train.precision={precision}", "train.max_steps=3", "data.num_workers=0",
               "train.ema_decay=0.5", "train.ema_warmup=false", "checkpoint.interval=100"]
        r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        RUNS[stage, precision, ranks] = run
    return RUNS[stage, precision, ranks]


def outputs(model, batch):
    with torch.no_grad():
        out = model(batch)
        return model.lm_head(out.hidden), out.latent_pred


@pytest.mark.parametrize("stage,precision,ranks", [(1, "fp32", 2), (1, "bf16", 2), (2, "fp32", 2), (2, "bf16", 2),
                                                   (3, "fp32", 2), (3, "bf16", 2), (2, "fp32", 3), (1, "bf16", 3)])
def test_release_holds_the_live_weights_and_ema(tiny_config, tmp_path_factory, tmp_path, stage, precision, ranks):
    """3 ranks: ZeRO-2 saves the last rank's partition without its alignment padding, DeepSpeed's
    BF16_Optimizer (ZeRO-1 in bf16) with it."""
    from model.transformer import UnifiedTransformer
    from model.weights import INDEX_FILE
    from pretrain.convert import to_release
    from tests.test_model import packed_mixed_batch
    run = trained(tiny_config, tmp_path_factory, stage, precision, ranks)
    live = torch.load(run / "live.pt")
    if ranks == 3:
        from pretrain.checkpoint.reader import CheckpointReader
        reader = CheckpointReader(run / "checkpoints/step_00000003")
        trimmed = any(n < size for n, size in zip(reader.saved[-1], reader.part_sizes))
        assert trimmed == (stage == 2)
    if ranks == 3 and stage == 2:  # DeepSpeed's zero_to_fp32 refuses BF16_Optimizer files
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        theirs = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag="step_00000003")
        ours = reader.state_dict()
        assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    ema = UnifiedTransformer.from_pretrained(to_release(run, tmp_path / "ema"))  # the run's latest, EMA
    raw_dir = to_release(run / "checkpoints" / "step_00000003", tmp_path / "raw", ema=False, max_shard_size="200KB")
    raw = UnifiedTransformer.from_pretrained(raw_dir)
    for model, want in ((ema, live["ema"]), (raw, live["weights"])):
        got = model.state_dict()
        assert set(want) == set(got) and all(torch.equal(got[k], want[k]) for k in want)
        reference = UnifiedTransformer.from_state_dict(model.cfg, want).eval()
        batch = packed_mixed_batch(model.cfg)
        for a, b in zip(outputs(model, batch), outputs(reference, batch)):
            assert torch.equal(a, b)
    assert sum(float((live["ema"][k] - live["weights"][k]).norm()) for k in live["ema"]) > 1e-3  # a real EMA
    assert (raw_dir / INDEX_FILE).is_file() and len(list(raw_dir.glob("model-*-of-*.safetensors"))) > 1
    assert "weights: raw" in (raw_dir / "README.md").read_text() and "step: 3" in (raw_dir / "README.md").read_text()
    if precision == "bf16":  # a bf16 release of a bf16 run: the fp32 EMA rounded once
        half = UnifiedTransformer.from_pretrained(to_release(run, tmp_path / "bf16", dtype="bf16"))
        got = half.state_dict()
        assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], live["ema"][k].bfloat16()) for k in got)
        batch = packed_mixed_batch(ema.cfg)
        logits, _ = outputs(half.float(), batch)
        want, _ = outputs(ema, batch)
        assert (logits - want).abs().max() < 0.05 * want.abs().max()


@pytest.fixture
def broken(tiny_config, tmp_path_factory, tmp_path):
    ckpt = tmp_path / "step_00000003"
    shutil.copytree(trained(tiny_config, tmp_path_factory, 3, "fp32") / "checkpoints/step_00000003", ckpt)
    return ckpt


def assert_fails_naming(ckpt, out, what, capsys, *flags):
    from pretrain.convert import main
    assert main(["to-release", str(ckpt), str(out), *flags]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "B/s]" not in line]  # not progress
    assert len(err) == 1 and what in err[0], err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp*"))


def test_a_truncated_rank_file_is_named_and_nothing_is_left_at_out(broken, tmp_path, capsys):
    rank1 = next(broken.glob("*zero_pp_rank_1_*optim_states.pt"))
    rank1.write_bytes(rank1.read_bytes()[: rank1.stat().st_size // 2])
    assert_fails_naming(broken, tmp_path / "out", f"{rank1}: truncated", capsys)


def test_a_missing_rank_file_or_no_checkpoint_is_named(broken, tmp_path, capsys):
    assert_fails_naming(tmp_path / "nothing", tmp_path / "out", "not a release folder, run directory or checkpoint",
                        capsys)
    (broken / "rank_00001.pt").rename(tmp_path / "aside.pt")  # rank 1's EMA partition
    assert_fails_naming(broken, tmp_path / "out", "rank_00001.pt: missing", capsys)
    (tmp_path / "aside.pt").rename(broken / "rank_00001.pt")
    next(broken.glob("*zero_pp_rank_1_*optim_states.pt")).unlink()
    assert_fails_naming(broken, tmp_path / "out", "rank file of rank 1 missing", capsys)


def test_a_shape_mismatch_names_the_parameter(broken, tmp_path, capsys):
    import json
    config = json.loads((broken / "config.json").read_text())
    config["model"]["ffn_dim"] = 64  # the checkpoint's weights are another size
    (broken / "config.json").write_text(json.dumps(config))
    assert_fails_naming(broken, tmp_path / "out", "blocks.0.ffn.w1.weight: shape", capsys)


def test_the_encoder_recorded_is_that_of_the_first_set_with_latents():
    from data_pipelines.shards import Manifest
    from pretrain.export.release import info_from_manifests
    text = Manifest("t", (), 1, "", {"type": "pixels", "channels": 1}, 1, {}, {"path": "tok.model"})
    photos = Manifest("p", (), 1, "", {"type": "vae", "path": "vae"}, 4, {"image": [4, 8, 8]}, {"path": "tok.model"})
    info, tokenizer = info_from_manifests([text, photos])
    assert info["encoder"]["type"] == "vae" and info["latent_shapes"] == {"image": [4, 8, 8]}
    assert str(tokenizer) == "tok.model"


def line_has_meaning(readme: str, row: str) -> bool:
    line = next(line for line in readme.splitlines() if line.startswith(f"| `{row}`"))
    return bool(line.rstrip(" |").rsplit("|", 1)[1].strip())


def to_release_cli(ckpt, out, *flags, cwd):
    return subprocess.run([sys.executable, "-m", "pretrain.convert", "to-release", str(ckpt), str(out), *flags],
                          cwd=cwd, env=env(), capture_output=True, text=True, timeout=300)


def test_a_release_from_another_directory_after_the_shards_moved_is_complete_and_samples(tiny_config,
                                                                                         tmp_path_factory, tmp_path):
    """Each checkpoint carries its tokenizer and its data record, so to-release needs neither the shards
    nor the directory the run was started in; without the tokenizer it refuses, one line."""
    from data_pipelines.shards import load_manifest
    from data_pipelines.tokenizer import fingerprint_of
    run = trained(tiny_config, tmp_path_factory, 1, "fp32")
    ckpt = tmp_path / "step_00000003"
    shutil.copytree(run / "checkpoints/step_00000003", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    manifests = [load_manifest(d["path"]) for d in config["data"]["datasets"]]
    for d in config["data"]["datasets"]:  # the shards moved away
        d["path"] = str(tmp_path / "moved" / Path(d["path"]).name)
    (ckpt / "config.json").write_text(json.dumps(config))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = to_release_cli(ckpt, "release", cwd=elsewhere)
    assert r.returncode == 0, r.stderr[-2000:]
    release = elsewhere / "release"
    assert fingerprint_of((release / "tokenizer.model").read_bytes()) == manifests[0].tokenizer["fingerprint"]
    info = json.loads((release / "release.json").read_text())
    assert info["encoder"] == next(m.encoder for m in manifests if m.latent_shapes)
    assert info["latent_shapes"] == {"image": next(m.latent_shapes["image"] for m in manifests if m.latent_shapes)}
    # its README shows how to read the weights with safetensors alone, and what every tensor is
    text = (release / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    r = subprocess.run([sys.executable, "-I", "-c", "import torch\n" + code + "torch.save(weights, 'plain.pt')\n"],
                       cwd=release, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    from model.weights import load_weights
    plain, ours = torch.load(release / "plain.pt"), load_weights(release)
    assert set(plain) == set(ours) and all(torch.equal(plain[k], ours[k]) for k in ours)
    rows = [line.split("`")[1] for line in text.splitlines() if line.startswith("| `")]
    patterns = {r: re.escape(re.sub(r"\{0\.\.\d+\}", "N", r)).replace("N", r"\d+") for r in rows}
    assert all(any(re.fullmatch(patterns[r], name) and line_has_meaning(text, r) for r in rows)
               for name in ours if not name.endswith("bias")), rows
    (release / "plain.pt").unlink()
    for kind, out in (("text", "words.txt"), ("image", "digits.png")):
        s = subprocess.run([sys.executable, "-m", "pretrain.sample", "--model", "release", "--kind", kind,
                            "--prompt", "a seven", "--n", "2", "--steps", "2", "--max-new-tokens", "4", "--out", out],
                           cwd=elsewhere, env=env(), capture_output=True, text=True, timeout=300)
        assert s.returncode == 0 and (elsewhere / out).stat().st_size > 0, s.stderr[-2000:]

    (ckpt / "tokenizer.model").write_bytes(b"not the run's tokenizer")
    r = to_release_cli(ckpt, "other", cwd=elsewhere)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "is not the run's tokenizer" in r.stderr and "--no-tokenizer" in r.stderr
    (ckpt / "tokenizer.model").unlink()
    r = to_release_cli(ckpt, "other", cwd=elsewhere)
    assert r.returncode == 2 and "carries no tokenizer file (tokenizer.model or tokenizer.json)" in r.stderr and "--no-tokenizer" in r.stderr, r.stderr
    assert not (elsewhere / "other").exists()
    r = to_release_cli(ckpt, "other", "--no-tokenizer", cwd=elsewhere)
    assert r.returncode == 0 and not (elsewhere / "other" / "tokenizer.model").exists(), r.stderr[-2000:]


@pytest.mark.parametrize("weights", ["raw", "ema"])
def test_garbage_inside_a_rank_files_fp32_values_is_refused_naming_the_file(broken, tmp_path, capsys, weights):
    """4 KiB of random bytes written over rank 1's master weights (in its optimizer file) or its EMA
    shadow (rank_00001.pt): torch.load checks no checksum, the reader checks the values."""
    if weights == "raw":
        rank1 = next(broken.glob("*zero_pp_rank_1_*optim_states.pt"))
        state = torch.load(rank1, mmap=True, weights_only=False)["optimizer_state_dict"]
        flat = state[next(k for k in state if "fp32" in k and "flat" in k)][0]
    else:
        rank1 = broken / "rank_00001.pt"
        flat = torch.load(rank1, mmap=True, weights_only=False)["ema"]["shadow"][0]
    content = bytearray(rank1.read_bytes())
    start = content.find(flat[:64].numpy().tobytes())
    assert start > 0 and flat.numel() * 4 > 8192
    content[start + 4096:start + 8192] = torch.randint(0, 256, (4096,), dtype=torch.uint8,
                                                       generator=torch.Generator().manual_seed(0)).numpy().tobytes()
    rank1.write_bytes(bytes(content))
    assert_fails_naming(broken, tmp_path / "out", f"{rank1}: corrupt", capsys, *(["--raw"] if weights == "raw" else []))


def test_an_interrupted_conversion_leaves_nothing_and_a_killed_ones_folder_is_removed_by_the_next(
        broken, tmp_path, capsys, monkeypatch):
    from pretrain import convert
    from pretrain.export import release
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a conversion killed with SIGKILL left its staged folder behind
    stale = tmp_path / f".out.tmp-{socket.gethostname()}-{dead.pid}"
    (stale / "half").mkdir(parents=True)
    live = tmp_path / f".out.tmp-{socket.gethostname()}-{os.getppid()}"
    live.mkdir()  # one of a process still running (its conversion may be under way): kept
    write_weights = release.write_weights

    def interrupted(directory, *args, **kwargs):
        write_weights(directory, *args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(release, "write_weights", interrupted)
    assert convert.main(["to-release", str(broken), str(out)]) == 130
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "B/s]" not in line]  # not progress
    assert err == [f"error: interrupted (SIGINT): nothing written at {out}"]
    assert not out.exists() and not stale.exists() and live.is_dir()
    assert sorted(p.name for p in tmp_path.glob(".out.tmp-*")) == [live.name]
    monkeypatch.setattr(release, "write_weights", write_weights)
    assert convert.main(["to-release", str(broken), str(out)]) == 0 and (out / "release.json").is_file()


def test_a_conversion_killed_with_sigkill_is_cleaned_up_by_the_next(broken, tmp_path):
    """A real SIGKILL while to-release writes (held after its weights are in the staged folder): the
    folder stays behind; the next run removes it and writes OUT whole."""
    import signal
    import time
    out = tmp_path / "out"
    held = ("import sys, time\nimport pretrain.export.release as r\nwrite = r.write_weights\n"
            "def held(*a, **k):\n    write(*a, **k)\n    print('written', flush=True)\n    time.sleep(600)\n"
            "r.write_weights = held\nfrom pretrain.convert import main\nsys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.Popen([sys.executable, "-c", held, "to-release", str(broken), str(out)], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert "written\n" in iter(proc.stdout.readline, "")  # DeepSpeed may print a line first
        staged = list(tmp_path.glob(".out.tmp-*"))
        assert len(staged) == 1 and list(staged[0].glob("*.safetensors"))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    time.sleep(0.1)
    assert staged[0].is_dir() and not out.exists()  # what a killed conversion leaves
    r = subprocess.run([sys.executable, "-m", "pretrain.convert", "to-release", str(broken), str(out)], cwd=REPO,
                       env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not list(tmp_path.glob(".out.tmp-*")) and (out / "release.json").is_file()
    from model.transformer import UnifiedTransformer
    assert UnifiedTransformer.from_pretrained(out).cfg.vocab_size > 0
