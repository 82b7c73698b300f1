"""What a cluster run hits on day one and one process does not show: the same gradient whatever the
ranks x micro-batches layout (loss normalisation, ZeRO's reduction order), the same modules on every
rank under ZeRO-3 (training and evaluation), the EMA after a resume, one run per run directory."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.distributed import free_port
from tests.launch import REPO, env, error_line, metrics, train_cli

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def probe_gradient(cfg, out: Path, ranks: int, micro_batch: int, accum: int, *extra, variants: dict = None):
    """The full gradient of one step over the 4 rows of tests/grad_probe.py on this layout. With
    `variants` ({name: overrides}), one launch probes each variant -> {name: result}."""
    outs = {name: out.parent / f"{out.stem}-{i}.pt" for i, name in enumerate(variants or {})}
    first = [*(variants or {}).values()][0] if variants else []
    if variants:
        out = outs[next(iter(variants))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
           str(free_port()), str(REPO / "tests/grad_probe.py"), str(cfg), str(out), "wandb.mode=disabled",
           "data.num_workers=0", f"train.micro_batch_size={micro_batch}", f"train.grad_accum={accum}", *extra,
           *first, f"run.dir={out.parent / out.stem}"]
    for name, overrides in list((variants or {}).items())[1:]:  # each after the common ones (the first's too)
        cmd += ["--variant", str(outs[name]), *overrides, f"run.dir={outs[name].parent / outs[name].stem}"]
    r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    if variants:
        return {name: torch.load(path) for name, path in outs.items()}
    return torch.load(out)["grads"]


def assert_same_gradient(got: dict, ref: dict, rtol: float = 1e-5) -> None:
    assert got.keys() == ref.keys()
    for name in ref:
        assert (got[name] - ref[name]).norm() <= rtol * ref[name].norm(), name


@pytest.fixture(scope="module")
def one_rank_probes(tiny_config, tmp_path_factory):
    """1 rank: 1 micro-batch holding the whole global batch (the reference), and 2 x 2 accumulated."""
    variants = {"reference": ["train.micro_batch_size=4", "train.grad_accum=1"],
                "accumulated": ["train.micro_batch_size=2", "train.grad_accum=2"]}
    return probe_gradient(tiny_config, tmp_path_factory.mktemp("ref") / "g.pt", 1, 4, 1, variants=variants)


@pytest.fixture(scope="module")
def reference_gradient(one_rank_probes):
    return one_rank_probes["reference"]["grads"]


def test_one_step_gradient_does_not_depend_on_accumulation_or_ranks(reference_gradient, one_rank_probes,
                                                                    two_rank_probes):
    """Rows with 1 to 150 text targets and 0 to 64 latent tokens: a token must weigh the same
    wherever it was packed (each loss / its count over the whole step, every micro-batch and rank)."""
    assert all(g.norm() > 0 for g in reference_gradient.values())  # every parameter is checked
    assert_same_gradient(one_rank_probes["accumulated"]["grads"], reference_gradient)
    assert_same_gradient(two_rank_probes["ranks"]["grads"], reference_gradient)


@pytest.fixture(scope="module")
def two_rank_probes(tiny_config, tmp_path_factory):
    """2 ranks x 2 micro-batches of 1 row, ZeRO-1/2/3 in fp32 and bf16, and 2 ranks x 1 micro-batch of
    2 rows: seven engines, one launch."""
    variants = {(stage, precision): [f"train.zero_stage={stage}", f"train.precision={precision}"]
                for stage in (1, 2, 3) for precision in ("fp32", "bf16")}
    variants["ranks"] = ["train.zero_stage=2", "train.precision=fp32", "train.micro_batch_size=2", "train.grad_accum=1"]
    return probe_gradient(tiny_config, tmp_path_factory.mktemp("probes") / "g.pt", 2, 1, 2, variants=variants)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_with_different_modalities_reduce_the_right_gradient(reference_gradient, two_rank_probes, stage):
    """2 ranks x 2 micro-batches: in the second, rank 0 holds text only and rank 1 one image and no
    text target. ZeRO-3 needs every module's forward on both ranks (lm_head, the latent modules);
    ZeRO-2 reduces gradients in the order autograd produces them, so both ranks must build the same
    graph; every parameter must get its gradient."""
    assert_same_gradient(two_rank_probes[stage, "fp32"]["grads"], reference_gradient)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_gradients_are_accumulated_and_reduced_in_fp32(reference_gradient, two_rank_probes, stage):
    """bf16 weights and activations, but DeepSpeed must not sum micro-steps and ranks in bf16 (its
    default): ZeRO-1 then runs DeepSpeed's BF16_Optimizer, ZeRO-2/3 their fp32 gradient buffers.
    The dtypes are those of the tensors DeepSpeed reduced (recorded at its comm calls), not its config.
    The gradient is the fp32 one up to bf16's precision."""
    got = two_rank_probes[stage, "bf16"]
    # the buffers the micro-steps were summed in, and every gradient the ranks exchanged in the step
    assert got["accumulation"] == "torch.float32" and got["communication"] == ["torch.float32"], got["communication"]
    assert two_rank_probes[stage, "fp32"]["communication"] == ["torch.float32"]
    total = sum(float(g.norm() ** 2) for g in reference_gradient.values()) ** 0.5
    error = sum(float((got["grads"][k].float() - g).norm() ** 2) for k, g in reference_gradient.items()) ** 0.5
    assert error < 0.05 * total


@pytest.mark.parametrize("stage,objective", [(2, "flow"), (3, "ddpm")])
def test_sharded_evaluation_over_mixed_held_out_data_samples_from_the_ema(tiny_config, test_data, tmp_path, stage,
                                                                          objective):
    """Held-out data dealt so that rank 0 gets a caption+image document and rank 1 text only, and
    the ranks hold different numbers of batches: every rank runs every module, the same number
    of times (else gloo reports a collective mismatch, or NCCL hangs). The evaluation's sample
    grid comes from the EMA: it is the grid sampled afterwards from the checkpoint's EMA, and its
    quality number is the classifier's reading of it."""
    from data_pipelines.write_shards import write_shards
    common = dict(tokenizer=str(test_data["tokenizer"]), encoder="pixels", channels=1, progress=False)
    write_shards("digits", str(tmp_path / "one_digit"), num_samples=1, **common)
    write_shards("text", str(tmp_path / "two_texts"), num_samples=3, input=[str(test_data["corpus"])],
                 max_chars=400, **common)
    held_out = f"data.eval_datasets=[{{path: {tmp_path / 'one_digit'}}}, {{path: {tmp_path / 'two_texts'}}}]"
    prompts = ["a handwritten digit one", "a handwritten digit two"]
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "pretrain.train", "--config", str(tiny_config), f"run.dir={run}", f"train.zero_stage={stage}",
           f"model.objective={objective}", "train.max_steps=2", "train.log_interval=1", "train.eval_interval=1", "train.eval_batches=0",
           "train.micro_batch_size=1", "data.num_workers=0", "wandb.mode=disabled", held_out,
           f"train.sample_prompts=[{', '.join(prompts)}]", "train.samples_per_prompt=3", "train.sample_steps=3",
           "train.sample_quality=digits", "train.ema_warmup=false", "train.ema_decay=0.5"]
    r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = metrics(run)
    for step in (1, 2):  # both modalities were evaluated
        assert 0 < m[step]["eval/lm_loss"] < 20 and 0 < m[step]["eval/diffusion_loss"] < 20
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_00000001.png", "step_00000002.png"]
    from pretrain.summary import summarize
    said = summarize(run)
    assert f"evaluation at step 2: eval/loss {m[2]['eval/loss']:.4g}" in said
    assert f"sample/digit_accuracy {m[2]['sample/digit_accuracy']:.4g}" in said
    # the same sampling, offline, from the step-2 checkpoint's EMA (consolidated from the rank files)
    from data_pipelines.encoders import load_encoder
    from data_pipelines.tokenizer import load_tokenizer
    from model.sample import sample_latents
    from pretrain.images import decode
    from pretrain.quality import score_digits
    from pretrain.export.release import load_for_sampling
    loaded = load_for_sampling(run)
    ids = [load_tokenizer(loaded.tokenizer).encode(p) for p in prompts for _ in range(3)]
    pixels = decode(load_encoder(loaded.info["encoder"]), sample_latents(
        loaded.model, ids, loaded.info["latent_shapes"]["image"], steps=3, cfg_scale=3.0, seed=0))
    expected = score_digits(prompts, pixels, 3)
    assert {k: m[2][f"sample/{k}"] for k in expected} == expected
    raw = load_for_sampling(run, ema=False)
    assert any(not torch.equal(a, b) for a, b in zip(raw.model.state_dict().values(),
                                                     loaded.model.state_dict().values()))  # the EMA lags
    assert_grid_shows(run / "samples" / "step_00000002.png", pixels, cols=3)


def assert_grid_shows(png: Path, pixels: torch.Tensor, cols: int) -> None:
    import numpy as np
    from PIL import Image
    from pretrain.images import tile, upscale
    got = np.asarray(Image.open(png).convert("RGB")).astype(int)
    want = upscale(tile(pixels, cols=cols)).astype(int)
    assert got.shape == want.shape and np.abs(got - want).max() <= 1


def train_args(cfg, run_dir, *extra):
    return ["--config", str(cfg), f"run.dir={run_dir}", "train.log_interval=1", "wandb.mode=disabled",
            "data.num_workers=1", *extra]


def test_a_resume_without_an_ema_starts_the_ema_from_the_loaded_weights(tiny_config, tmp_path):
    """A checkpoint of a run without an EMA: the resumed run's EMA must follow the loaded weights,
    not the random initialisation it was copied from before the checkpoint was loaded."""
    from pretrain.checkpoint.reader import CheckpointReader
    from tests.launch import torchrun
    run = tmp_path / "run"
    r = torchrun(2, train_args(tiny_config, run, "train.max_steps=3", "checkpoint.interval=3", "checkpoint.keep=100",
                               "train.ema_decay=0"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(2, train_args(tiny_config, run, "train.max_steps=4", "checkpoint.keep=100", "train.ema_decay=0.999",
                               "train.ema_warmup=false"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "has no EMA: the EMA starts from its weights" in r.stdout + r.stderr
    ckpt = run / "checkpoints"
    w3, w4 = (CheckpointReader(ckpt / t).state_dict() for t in ("step_00000003", "step_00000004"))
    ema = CheckpointReader(ckpt / "step_00000004").state_dict(ema=True)  # = 0.999 * w3 + 0.001 * w4
    gap = sum(float((ema[k] - w3[k]).detach().norm()) for k in w3)
    one_step = sum(float((w4[k] - w3[k]).detach().norm()) for k in w3)
    assert one_step > 0 and gap < 0.01 * one_step


def processes_with(marker: str) -> list[int]:
    """Pids of the processes whose command line holds `marker`."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def test_one_run_per_run_directory_and_no_rank_outlives_its_launcher(tiny_config, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "pretrain.train", *train_args(tiny_config, run, "train.max_steps=100000", "checkpoint.interval=100000")]
    # its output goes to a pipe, as under a test runner or a CI job: gone with the launcher's reader
    launcher = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while max(metrics(run), default=0) < 2:
            assert time.time() < deadline and launcher.poll() is None, launcher.stderr.read()[-3000:]
            time.sleep(0.5)
        holder = (run / "run.lock").read_text().split()
        assert holder[0].startswith("host=") and holder[1].startswith("pid=")
        # (a) a second run into the same directory is refused with one line naming the holder
        r = train_cli(train_args(tiny_config, run, "train.max_steps=1"))
        assert r.returncode == 2 and "is in use by" in error_line(r) and holder[1] in error_line(r), r.stderr[-2000:]
        # (b) kill -9 of the launcher alone: its ranks (own sessions) exit by themselves, without a checkpoint
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        launcher.stderr.close()  # the ranks' stderr is that pipe: a rank's last words now fail to write
        deadline = time.time() + 60
        while processes_with(str(run)):
            assert time.time() < deadline, f"ranks still running after the launcher died: {processes_with(str(run))}"
            time.sleep(0.5)
    finally:
        launcher.kill()
        for pid in processes_with(str(run)):
            os.kill(pid, signal.SIGKILL)
    assert not list((run / "checkpoints").glob("step_*"))
    # the lock the killed run left behind is taken over, and released at the end
    r = train_cli(train_args(tiny_config, run, "train.max_steps=1", "data.num_workers=0"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"took over the lock of {' '.join(holder[:2])}" in r.stdout + r.stderr
    assert (run / "run.lock").read_text() == ""
