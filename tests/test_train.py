"""DeepSpeed training on 2 CPU ranks: exact resume for ZeRO 1/2/3, crash-safe checkpoints, SIGTERM."""
import os
import shutil
import signal
import time

import pytest
import torch

from pretrain.checkpoint import read_latest
from tests.launch import error_line, metrics, resume_probe, spawn_ranks, torchrun, train_cli

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def args(cfg, run_dir, *extra):
    return ["--config", str(cfg), f"run.dir={run_dir}", "train.log_interval=1", "wandb.mode=disabled",
            "data.num_workers=1", *extra]


def consolidated(ckpt_dir, ema=False):
    from pretrain.checkpoint.reader import CheckpointReader
    return CheckpointReader(ckpt_dir).state_dict(ema)


SAMPLING = ["train.eval_interval=4", "train.sample_quality=digits"]  # tiny-cpu's ten digit captions; and at max_steps


def assert_same_run_from(a, b, steps, ckpt):
    """Runs a and b logged the same losses at `steps` and wrote the same weights and EMA in `ckpt`."""
    ma, mb = metrics(a), metrics(b)
    assert sorted(mb) == list(steps)
    for step in steps:
        for key in ("loss", "lm_loss", "diffusion_loss"):
            assert abs(ma[step][key] - mb[step][key]) <= 1e-6, (step, key, ma[step][key], mb[step][key])
    wa, wb = consolidated(a / "checkpoints" / ckpt), consolidated(b / "checkpoints" / ckpt)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ea, eb = consolidated(a / "checkpoints" / ckpt, ema=True), consolidated(b / "checkpoints" / ckpt, ema=True)
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    return wa, ea


@pytest.mark.parametrize("stage,precision", [(1, "fp32"), (3, "fp32"), (3, "bf16")])
def test_resume_reproduces_losses_weights_and_ema(tiny_config, tmp_path, stage, precision):
    """ZeRO-2 (tiny-cpu's stage) resumes bit-exactly three times in tests/test_slurm.py, and goes
    through a universal checkpoint in the 2 -> 1 rank test below. bf16 is the GPU's precision: DeepSpeed's bf16 path (bf16 weights, fp32 masters) runs on CPU too
    (ZeRO-1 in bf16, DeepSpeed's BF16_Optimizer, goes through the 2 -> 1 rank test below).
    A resume through a universal checkpoint on the same ranks is exact too (weight decay on, which
    differs between the optimizer's two parameter groups). Only the straight run samples digit grids
    from the EMA at evaluations: the runs being equal shows that sampling leaves training untouched."""
    from pretrain.convert import to_universal
    common = [f"train.zero_stage={stage}", f"train.precision={precision}", "train.max_steps=6",
              "checkpoint.interval=3", "checkpoint.keep=100", "train.weight_decay=0.1"]
    straight, resumed, universal = tmp_path / "straight", tmp_path / "resumed", tmp_path / "universal"
    r = torchrun(2, args(tiny_config, straight, *common, *SAMPLING))
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (straight / "samples").iterdir()) == ["step_00000004.png", "step_00000006.png"]
    (resumed / "checkpoints").mkdir(parents=True)  # resume from the step-3 checkpoint in a new process
    shutil.copytree(straight / "checkpoints/step_00000003", resumed / "checkpoints/step_00000003")
    (resumed / "checkpoints/latest").write_text("step_00000003\n")
    r = torchrun(2, args(tiny_config, resumed, *common))
    assert r.returncode == 0, r.stderr[-3000:]
    weights, ema = assert_same_run_from(straight, resumed, (4, 5, 6), "step_00000006")
    if not (stage == 1 and precision == "bf16"):  # DeepSpeed's own consolidation reads these files too
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        theirs = get_fp32_state_dict_from_zero_checkpoint(str(straight / "checkpoints"), tag="step_00000006")
        assert all(torch.equal(theirs[k], weights[k]) for k in theirs)
    # the EMA is a real, lagging average: it differs from the weights it follows
    assert sum(float((ema[k] - weights[k]).detach().norm()) for k in weights) > 1e-3
    ckpt = to_universal(straight / "checkpoints/step_00000003", tmp_path / "step_00000003_universal")
    r = torchrun(2, ["--resume", str(ckpt), *args(tiny_config, universal, *common)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run_from(straight, universal, (4, 5, 6), "step_00000006")


def test_stop_at_ends_an_invocation_on_the_full_schedule_and_a_resume_goes_on(tiny_config, tmp_path):
    """train.stop_at: the run stops as a preemption would (checkpointed, the schedule of max_steps
    unchanged, not annealed to its end), and `--resume auto` continues to max_steps."""
    from model.config_system import load_config
    from pretrain.config import ExperimentConfig
    from pretrain.schedule import lr_factor
    run = tmp_path / "run"
    common = ["train.max_steps=4", "train.warmup_steps=1", "checkpoint.interval=100", "data.num_workers=0"]
    r = train_cli(args(tiny_config, run, *common, "train.stop_at=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(metrics(run)) == [1, 2] and read_latest(run / "checkpoints") == "step_00000002"
    r = train_cli(args(tiny_config, run, *common, "train.stop_at=2"))  # already there: nothing to do
    assert r.returncode == 0 and sorted(metrics(run)) == [1, 2]
    r = train_cli(args(tiny_config, run, *common))
    assert r.returncode == 0, r.stderr[-3000:]
    m = metrics(run)
    assert sorted(m) == [1, 2, 3, 4] and read_latest(run / "checkpoints") == "step_00000004"
    cfg = load_config(ExperimentConfig, tiny_config, common)
    lr = [cfg.train.lr * lr_factor(step, cfg.train) for step in (1, 2, 3, 4)]  # logged after the step: the next one's
    assert [m[step]["lr"] for step in (1, 2, 3, 4)] == pytest.approx(lr)


@pytest.mark.gpu
def test_one_gpu_run_in_bf16_with_compiled_flex_blocks_resumes(tiny_config, tmp_path):
    """The GPU path end to end: NCCL, bf16, FlexAttention (auto), compiled blocks, pinned batches."""
    common = ["train.max_steps=6", "checkpoint.interval=3", "train.compile=true", "data.num_workers=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    r = torchrun(1, args(tiny_config, straight, *common), timeout=900)
    assert r.returncode == 0 and "on cuda" in r.stderr + r.stdout, r.stderr[-3000:]
    shutil.copytree(straight / "checkpoints/step_00000003", resumed / "checkpoints/step_00000003")
    (resumed / "checkpoints/latest").write_text("step_00000003\n")
    r = torchrun(1, args(tiny_config, resumed, *common), timeout=900)
    assert r.returncode == 0 and "from step 3" in r.stderr + r.stdout, r.stderr[-3000:]
    a, b = metrics(straight), metrics(resumed)
    for step in (4, 5, 6):  # bf16 kernels need not be bitwise deterministic: close, not equal
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-2 * a[step]["loss"], (step, a[step], b[step])
    assert a[6]["loss"] < a[1]["loss"] and a[6]["mfu"] is not None


def test_zero3_with_compiled_blocks_trains_like_eager_without_a_recompile_storm(tiny_config, tmp_path):
    """ZeRO-3 hooks stay outside the compiled block forward (blocks are ZeRO-3 leaf modules)."""
    losses = {}
    for compiled in (False, True):
        run = tmp_path / f"compiled-{compiled}"
        r = torchrun(1, args(tiny_config, run, "train.max_steps=3", "train.zero_stage=3", f"train.compile={compiled}",
                             "data.num_workers=0"), extra_env={"TORCH_LOGS": "recompiles"})
        assert r.returncode == 0, r.stderr[-3000:]
        assert "recompile_limit" not in r.stderr and r.stderr.count("Recompiling function") <= 2, r.stderr[-3000:]
        losses[compiled] = [metrics(run)[s]["loss"] for s in (1, 2, 3)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_crash_while_writing_a_checkpoint_leaves_the_previous_one_loadable(tiny_config, tmp_path):
    run = tmp_path / "run"
    common = ["train.max_steps=6", "checkpoint.interval=3"]
    r = torchrun(2, args(tiny_config, run, *common), extra_env={"MONOFUSION_FAULT": "checkpoint-write@6"})
    assert r.returncode != 0
    assert read_latest(run / "checkpoints") == "step_00000003"
    assert (run / "checkpoints/step_00000006.tmp").is_dir() and not (run / "checkpoints/step_00000006").exists()
    r = torchrun(2, args(tiny_config, run, *common))  # --resume auto picks step 3 up
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_latest(run / "checkpoints") == "step_00000006"
    assert not list((run / "checkpoints").glob("*.tmp"))
    assert "from step 3" in r.stderr + r.stdout
    # roll back to step 3 and crash while its step 6 replaces the old step 6: step 3 is `latest` again
    r = torchrun(2, args(tiny_config, run, *common, f"--resume={run}/checkpoints/step_00000003"),
                 extra_env={"MONOFUSION_FAULT": "checkpoint-replace@6"})
    assert r.returncode != 0
    assert read_latest(run / "checkpoints") == "step_00000003"
    r = torchrun(2, args(tiny_config, run, *common))
    assert r.returncode == 0 and "from step 3" in r.stderr + r.stdout, r.stderr[-3000:]
    assert read_latest(run / "checkpoints") == "step_00000006"
    # a resume whose config gives the weights other shapes is one line naming the key, before any loading
    r = train_cli(args(tiny_config, run, "train.max_steps=9", "model.ffn_dim=96"))
    assert r.returncode == 2 and "model.ffn_dim is" in error_line(r), r.stderr[-2000:]


def test_sigterm_checkpoints_exits_0_and_resumes(tiny_config, tmp_path):
    run = tmp_path / "run"
    procs = spawn_ranks(2, args(tiny_config, run, "train.max_steps=100000", "checkpoint.interval=100000"), tmp_path)
    try:
        deadline = time.time() + 180
        while max(metrics(run), default=0) < 3:
            assert time.time() < deadline and all(p.poll() is None for p in procs), (tmp_path / "rank0.log").read_text()
            time.sleep(0.5)
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)  # the rank and its DataLoader workers, as Slurm does
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill() if p.poll() is None else None
    assert codes == [0, 0], (tmp_path / "rank0.log").read_text()[-3000:]
    tag = read_latest(run / "checkpoints")
    stopped = int(tag.split("_")[1])
    assert stopped >= 3
    r = torchrun(2, args(tiny_config, run, f"train.max_steps={stopped + 2}"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert max(metrics(run)) == stopped + 2


def test_unknown_config_key_is_a_one_line_error(tiny_config):
    r = train_cli(["--config", str(tiny_config), "train.max_stepz=3"])
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "train.max_stepz" in r.stderr and str(tiny_config) in r.stderr


def test_srun_tasks_without_a_torch_distributed_environment_are_refused(tiny_config, tmp_path):
    """Slurm's srun -n 2 python -m pretrain.train would otherwise start two separate runs in one run.dir."""
    r = train_cli(args(tiny_config, tmp_path / "run"), SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="1")  # no RANK
    assert r.returncode == 2 and "srun started 2 tasks" in error_line(r), r.stderr[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bad", ["--resume={tmp}/no-checkpoint", "data.datasets.0.path={tmp}/no-shards"])
def test_missing_checkpoint_or_shards_is_an_error_naming_the_path(tiny_config, tmp_path, bad):
    bad = bad.format(tmp=tmp_path)
    r = train_cli(args(tiny_config, tmp_path / "run", bad))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert error_line(r).startswith("error:") and bad.split("=", 1)[1] in error_line(r)


def test_a_missing_tokenizer_stops_a_run_that_samples_grids_before_its_first_step(test_data, tiny_config, tmp_path):
    import json
    from data_pipelines.shards import fingerprint
    shards = tmp_path / "digits"
    shutil.copytree(test_data["digits"], shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["tokenizer"]["path"] = str(tmp_path / "moved.model")
    manifest["fingerprint"] = fingerprint(manifest)
    (shards / "manifest.json").write_text(json.dumps(manifest))
    r = train_cli(args(tiny_config, tmp_path / "run", f"data.datasets.0.path={shards}", "train.eval_interval=5",
                       "train.sample_prompts=[a digit]"))
    assert r.returncode == 2, r.stderr[-2000:]
    assert error_line(r) == f"error: {tmp_path / 'moved.model'}: tokenizer model not found"
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_wandb_offline_leaves_a_run_with_the_metrics(tiny_config, test_data, tmp_path):
    run = tmp_path / "run"
    held_out = f"data.eval_datasets=[{{path: {test_data['digits']}}}]"
    r = torchrun(1, ["--config", str(tiny_config), f"run.dir={run}", "train.max_steps=4", "train.log_interval=2",
                     "wandb.mode=offline", "data.num_workers=0", "train.eval_interval=2", "train.eval_batches=2",
                     held_out, "train.sample_prompts=[a handwritten digit one, a handwritten digit two]",
                     "train.sample_steps=2"])
    assert r.returncode == 0, r.stderr[-3000:]
    logs = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1 and b"diffusion_loss" in logs[0].read_bytes() and b"eval/lm_loss" in logs[0].read_bytes()
    m = metrics(run)
    assert sorted(m) == [2, 4]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_00000002.png", "step_00000004.png"]
    assert b"samples" in logs[0].read_bytes() and list((run / "wandb").glob("offline-run-*/files/media/images/*"))
    assert m[2]["eval/diffusion_loss"] > 0 and m[4]["eval/lm_loss"] > 0


def sample_log(run_dir, steps):
    """Counter of document keys (text: token ranges) seen in the given steps, over all ranks."""
    import collections
    import json
    seen = collections.Counter()
    for f in run_dir.glob("samples_rank*.jsonl"):
        for rec in map(json.loads, f.read_text().splitlines()):
            if rec["step"] in steps:
                seen.update(k for row in rec["docs"] for k in row)
    return seen


@pytest.mark.parametrize("stage,precision", [(2, "fp32"), (1, "bf16")])
def test_two_ranks_to_universal_to_one_rank(tiny_config, tmp_path, stage, precision):
    """2 ranks x 1 worker -> universal -> 1 rank x 2 workers with twice the accumulation: the same
    reader slots and the same global batches, so the run goes on as the straight one did (which alone
    samples grids at evaluations)."""
    from pretrain.convert import to_universal
    a, b = tmp_path / "a", tmp_path / "b"
    # no EMA warmup: a slow EMA shows whether it went through the conversion (below)
    common = ["train.max_steps=8", "checkpoint.interval=4", "checkpoint.keep=100", "train.log_samples=true",
              "train.ema_warmup=false", f"train.precision={precision}", f"train.zero_stage={stage}"]
    r = torchrun(2, args(tiny_config, a, *common, *SAMPLING))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sample/digit_accuracy" in metrics(a)[8]
    universal = to_universal(a / "checkpoints/step_00000004", tmp_path / "step_00000004_universal")
    assert (universal / "ema_fp32.pt").is_file() and (universal / "config.json").is_file()
    from model.transformer import UnifiedTransformer
    from pretrain.convert import to_release
    # a release of the universal checkpoint holds the tensors of the ZeRO checkpoint, as the live engine
    # gathers them after loading it (DeepSpeed's safe_get_full_*: not this project's checkpoint reader)
    live = resume_probe(2, tiny_config, a / "checkpoints/step_00000004", tmp_path / "live.pt", *common,
                        f"run.dir={tmp_path / 'probe'}", "data.num_workers=0")
    for ema in (True, False):
        release = UnifiedTransformer.from_pretrained(to_release(universal, tmp_path / f"release-{ema}", ema=ema))
        want = live["ema" if ema else "weights"]
        got = release.state_dict()
        assert want.keys() <= got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    r = torchrun(1, ["--resume", str(universal), *args(tiny_config, b, *common, "train.grad_accum=2",
                                                       "data.num_workers=2")])
    assert r.returncode == 0, r.stderr[-3000:]
    ma, mb = metrics(a), metrics(b)
    assert sorted(mb) == [5, 6, 7, 8]
    tol = 1e-4 if precision == "fp32" else 2e-2  # only the order of the gradient sums differs
    for step in (5, 6, 7, 8):
        assert abs(ma[step]["loss"] - mb[step]["loss"]) < tol * ma[step]["loss"], (step, ma[step], mb[step])
    # nothing seen before the conversion is seen again, nothing is skipped: the documents (text: token
    # ranges) of the whole run are those of the straight run, each once
    before, after, straight = sample_log(a, {1, 2, 3, 4}), sample_log(b, {5, 6, 7, 8}), sample_log(a, set(range(9)))
    assert before and after and max(before.values()) == 1 and max(after.values()) == 1
    assert before + after == straight
    # the EMA went through the conversion: after 4 more steps it is still near run a's EMA
    ema_a, ema_b = consolidated(a / "checkpoints/step_00000008", True), consolidated(b / "checkpoints/step_00000008", True)
    weights_a = consolidated(a / "checkpoints/step_00000008")
    gap = sum(float((ema_a[k] - ema_b[k]).norm()) for k in ema_a)
    drift = sum(float((ema_a[k] - weights_a[k]).detach().norm()) for k in ema_a)
    assert gap < 0.05 * drift
