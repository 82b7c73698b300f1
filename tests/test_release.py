"""to-release from 2-rank ZeRO-1/2/3 checkpoints (fp32 and bf16 training): the release folders load
with from_pretrained and hold the live trainer's weights and EMA; sharded output loads the same;
bad checkpoints give one-line errors and leave nothing at OUT."""
import shutil
import subprocess
import sys

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


def assert_fails_naming(ckpt, out, what, capsys):
    from pretrain.convert import main
    assert main(["to-release", str(ckpt), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
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
    from pretrain.release import info_from_manifests
    text = Manifest("t", (), 1, "", {"type": "pixels", "channels": 1}, 1, {}, {"path": "tok.model"})
    photos = Manifest("p", (), 1, "", {"type": "vae", "path": "vae"}, 4, {"image": [4, 8, 8]}, {"path": "tok.model"})
    info, tokenizer = info_from_manifests([text, photos])
    assert info["encoder"]["type"] == "vae" and info["latent_shapes"] == {"image": [4, 8, 8]}
    assert str(tokenizer) == "tok.model"
