"""Checkpoints at scale: the writer (durable, in the background), kills during background saves,
universal resume with an EMA at any world size, changed settings on resume, lineage retention, and
the config checks made before anything starts."""
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from pretrain.checkpoint import LINEAGE_FILE, list_checkpoints, read_latest, read_lineage
from pretrain.checkpoint import write_process
from pretrain.checkpoint.writer import CheckpointWriteError, FileWriter, Snapshot
from tests.launch import REPO, env, error_line, metrics, resume_probe, spawn_ranks, torchrun, train_cli


def args(cfg, run_dir, *extra):
    return ["--config", str(cfg), f"run.dir={run_dir}", "train.log_interval=1", "wandb.mode=disabled",
            "data.num_workers=1", *extra]


# ---- the writer -------------------------------------------------------------------------------------
def test_the_writer_has_every_method_of_deepspeeds_checkpoint_engine():
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine
    wanted = {m for m in dir(CheckpointEngine) if not m.startswith("_")}
    assert wanted <= {m for m in dir(FileWriter) if not m.startswith("_")}


def test_a_snapshot_copies_views_compactly_into_the_same_buffers_each_save():
    flat = torch.arange(10.0)
    state = {"a": flat[2:5], "b": [flat[5:], 3], "tied": None}
    state["tied"] = state["a"]
    snap = Snapshot()
    first = snap.take(state, ("f",))
    assert first["a"].untyped_storage().nbytes() == 3 * 4  # the view alone, not the flat buffer
    assert first["tied"] is first["a"] and first["b"][1] == 3
    flat.add_(100)  # training goes on: the copy keeps the values of the save
    assert first["a"].tolist() == [2.0, 3.0, 4.0]
    second = snap.take(state, ("f",))
    assert second["a"].data_ptr() == first["a"].data_ptr() and second["a"].tolist() == [102.0, 103.0, 104.0]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_failed_write_drops_the_rest_but_not_the_commit_and_is_raised(tmp_path, asynchronous):
    writer = FileWriter(asynchronous)
    ran = []
    writer.put(tmp_path / "ok.pt", {"x": torch.ones(3)})
    writer.put(tmp_path / "missing-folder" / "bad.pt", {"x": torch.ones(3)})
    writer.then(lambda: ran.append("after"), "after")
    writer.then(lambda: ran.append(("commit", writer.failed)), "commit", always=True)
    with pytest.raises(CheckpointWriteError, match="bad.pt"):
        writer.wait()
    assert ran == [("commit", True)]
    assert torch.load(tmp_path / "ok.pt")["x"].tolist() == [1.0, 1.0, 1.0]
    writer.put(tmp_path / "next.pt", {"x": torch.zeros(1)})  # the next checkpoint is written again
    assert writer.wait() and (tmp_path / "next.pt").is_file()


def test_the_writer_process_writes_every_dtype_from_shared_buffers_and_outlives_no_failure(tmp_path, monkeypatch,
                                                                                          capfd):
    """Asynchronous files are written by a process of the rank's own from shared memory: the files
    load equal to the state at the save (every dtype, a view compactly, tied tensors once), a buffer
    whose shape changed is replaced, and a writer process that died fails its write with one line and
    is replaced by the next."""
    writer = FileWriter(asynchronous=True)
    flat = torch.arange(12.0)
    state = {"w": flat[4:8], "bf16": torch.randn(3, 5).to(torch.bfloat16), "ids": torch.arange(7),
             "mask": torch.tensor([True, False]), "empty": torch.zeros(0, 4), "step": 3, "name": "x"}
    state["tied"] = state["w"]
    writer.put(tmp_path / "a.pt", state)
    flat.add_(100)  # training goes on while the process writes
    assert writer.wait()
    loaded = torch.load(tmp_path / "a.pt")
    assert loaded["w"].tolist() == [4.0, 5.0, 6.0, 7.0] and loaded["w"].untyped_storage().nbytes() == 16
    assert loaded["tied"].data_ptr() == loaded["w"].data_ptr()
    for key in ("bf16", "ids", "mask", "empty"):
        assert loaded[key].dtype == state[key].dtype and torch.equal(loaded[key], state[key]), key
    assert (loaded["step"], loaded["name"]) == (3, "x")
    first = writer.process.proc.pid
    for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):  # Slurm signals every process of a step
        os.kill(first, sig)
    writer.put(tmp_path / "b.pt", {**state, "ids": torch.arange(9)})  # a new shape: a new buffer
    assert writer.wait() and torch.load(tmp_path / "b.pt")["ids"].tolist() == list(range(9))
    assert writer.process.proc.pid == first
    # killed while it writes (stopped first, so that the request is sent to it): this file fails
    os.kill(first, signal.SIGSTOP)
    sent, send = threading.Event(), write_process._send
    monkeypatch.setattr(write_process, "_send", lambda sock, msg, fds: (send(sock, msg, fds), sent.set()))
    writer.put(tmp_path / "c.pt", state)
    assert sent.wait(60)
    os.kill(first, signal.SIGKILL)
    with pytest.raises(CheckpointWriteError, match="c.pt.*writer process ended"):
        writer.wait()
    assert not (tmp_path / "c.pt").exists() or (tmp_path / "c.pt").stat().st_size == 0
    writer.put(tmp_path / "d.pt", state)  # the next save starts another process
    assert writer.wait() and torch.equal(torch.load(tmp_path / "d.pt")["bf16"], state["bf16"])
    second = writer.process.proc.pid
    assert second != first
    writer.process.proc.kill()  # killed between saves: replaced, with a warning
    writer.process.proc.wait()
    writer.put(tmp_path / "e.pt", state)
    assert writer.wait() and torch.load(tmp_path / "e.pt")["step"] == 3
    assert writer.process.proc.pid != second and "writer process ended (exit code -9)" in capfd.readouterr().err


def test_the_writer_process_dies_with_its_rank(tmp_path):
    """A rank killed with SIGKILL takes its writer process (and the snapshot's memory) with it."""
    script = ("import sys, time, torch\nfrom pretrain.checkpoint.writer import FileWriter\n"
              "w = FileWriter(asynchronous=True)\nw.put(sys.argv[1], {'x': torch.ones(1000)})\nw.wait()\n"
              "print(w.process.proc.pid, flush=True)\ntime.sleep(600)\n")
    rank = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "a.pt")], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, text=True)
    child = int(rank.stdout.readline())
    os.kill(child, signal.SIGSTOP)  # as if busy with a write: it would never read the end of its socket
    rank.kill()
    rank.wait()
    from slurm.cluster_slots import wait_gone
    assert wait_gone(child, 30), "the writer process outlived its rank"


# ---- bad settings: one line before anything starts -------------------------------------------------------
@pytest.mark.parametrize("override,key", [("checkpoint.interval=0", "checkpoint.interval"),
                                          ("checkpoint.keep=0", "checkpoint.keep"),
                                          ("train.log_interval=0", "train.log_interval"),
                                          ("train.eval_interval=-1", "train.eval_interval")])
def test_non_positive_intervals_are_refused_before_the_run_starts(tiny_config, tmp_path, override, key):
    r = train_cli(args(tiny_config, tmp_path / "run", override))
    assert r.returncode == 2, r.stderr[-2000:]
    assert key.split(".")[1] in error_line(r) and key.split(".")[0] in error_line(r), error_line(r)
    assert not (tmp_path / "run").exists()  # nothing started


def test_an_unexpected_error_shows_its_traceback_and_exits_1(tiny_config, tmp_path):
    """Only named bad inputs are one line with exit 2: a FileNotFoundError nobody raised on purpose
    (here from the first training step) is a bug and keeps its traceback."""
    script = ("import sys, pretrain.train as t\n"
              "def broken(self, batches):\n    open('/nonexistent/internal/file')\n"
              "t.Trainer.train_step = broken\n"
              "from pretrain.process import run_and_exit\nrun_and_exit(lambda: t.main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", script, *args(tiny_config, tmp_path / "run")], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" in r.stderr and "FileNotFoundError" in error_line(r), r.stderr[-2000:]


# ---- retention -----------------------------------------------------------------------------------------
def test_retention_prunes_only_the_checkpoints_of_this_runs_lineage(tiny_config, tmp_path):
    run = tmp_path / "run"
    ck = run / "checkpoints"
    common = ["checkpoint.interval=1", "checkpoint.keep=2", "data.num_workers=0"]
    assert train_cli(args(tiny_config, run, *common, "train.max_steps=5")).returncode == 0
    assert list_checkpoints(ck) == ["step_00000004", "step_00000005"]
    first = read_lineage(ck / "step_00000005")
    r = train_cli(["--resume", "none", *args(tiny_config, run, *common, "train.max_steps=3")])
    assert r.returncode == 0, r.stderr[-2000:]
    # a new run in the same directory keeps its own last two and leaves the earlier run's alone
    assert list_checkpoints(ck) == ["step_00000002", "step_00000003", "step_00000004", "step_00000005"]
    second = read_lineage(ck / "step_00000003")
    assert second != first and read_latest(ck) == "step_00000003"
    r = train_cli(args(tiny_config, run, *[c for c in common if "keep" not in c], "checkpoint.keep=1",
                       "train.max_steps=4"))
    assert r.returncode == 0, r.stderr[-2000:]
    # the resumed run continues the second lineage: steps 4 of the first run are replaced, 2 and 3 pruned
    assert read_lineage(ck / "step_00000004") == second and read_lineage(ck / "step_00000005") == first
    assert list_checkpoints(ck) == ["step_00000004", "step_00000005"]
    assert (ck / "step_00000004" / LINEAGE_FILE).is_file()


# ---- universal resume with an EMA at any size --------------------------------------------------------------
ODD = ["train.zero_stage=3", "model.patch_size=1", "train.ema_decay=0.9", "train.ema_warmup=false",
       "data.num_workers=0", "train.weight_decay=0.1"]  # patch 1: latent_out.bias has 1 value, the ranks cut it


def probe(tiny_config, tmp_path, ranks, resume, name, *extra):
    return resume_probe(ranks, tiny_config, resume, tmp_path / f"{name}.pt", "--moments", f"run.dir={tmp_path / name}",
                        *ODD, *extra)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("source,target", [(1, 2), (2, 3), (3, 2)])
def test_zero3_universal_resume_with_an_ema_at_any_world_size_equals_the_source(tiny_config, tmp_path, source,
                                                                                target):
    """Parameters whose sizes the rank counts do not divide: weights, Adam moments and EMA after a
    resume through a universal checkpoint on another number of ranks are the source's, bit for bit."""
    from pretrain.convert import to_universal
    run = tmp_path / "source"
    r = torchrun(source, args(tiny_config, run, *ODD, "train.max_steps=3", "checkpoint.interval=3"))
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = run / "checkpoints/step_00000003"
    universal = to_universal(ckpt, tmp_path / "step_00000003_universal")
    want = probe(tiny_config, tmp_path, source, ckpt, "direct")
    got = probe(tiny_config, tmp_path, target, universal, "universal")
    assert want["step"] == got["step"] == 3
    sizes = {name: t.numel() for name, t in want["weights"].items()}
    assert any(n % target for n in sizes.values()) and any(n % source for n in sizes.values()) == (source > 1)
    for part in ("weights", "ema", "exp_avg", "exp_avg_sq"):
        assert want[part].keys() == got[part].keys()
        bad = [k for k in want[part] if not torch.equal(want[part][k], got[part][k])]
        assert not bad, (part, bad[:5])
    assert not torch.equal(want["ema"]["latent_out.bias"], want["weights"]["latent_out.bias"])  # a real EMA


# ---- a changed setting on resume ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage,precision", [(1, "bf16"), (3, "fp32")])  # ZeRO-2 shares ZeRO-1's optimizer
def test_a_resume_applies_changed_optimizer_settings_on_the_direct_and_the_universal_path(tiny_config, tmp_path,
                                                                                          stage, precision):
    """ARCHITECTURE.md: on resume, train.lr, the schedule, weight decay, betas, eps and grad_clip are this
    run's, on every path (ZeRO-1 in bf16 is DeepSpeed's BF16_Optimizer), and the log names each change
    and the optimizer as it then is. Both paths then train the same steps alike."""
    from pretrain.convert import to_universal
    from pretrain.schedule import lr_factor
    from pretrain.config import TrainConfig
    base = [f"train.zero_stage={stage}", f"train.precision={precision}", "data.num_workers=0",
            "train.warmup_steps=2", "train.max_steps=6"]
    run = tmp_path / "source"
    r = torchrun(2, args(tiny_config, run, *base, "train.lr=0.004", "train.weight_decay=0.5", "train.stop_at=3",
                         "checkpoint.interval=3"))
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = run / "checkpoints/step_00000003"
    universal = to_universal(ckpt, tmp_path / "step_00000003_universal")
    changed = ["train.lr=0.001", "train.weight_decay=0.05", "train.beta1=0.8", "train.beta2=0.99", "train.eps=1e-6",
               "train.grad_clip=0.5"]
    schedule = TrainConfig(warmup_steps=2, max_steps=6)
    losses = {}
    for path, source in (("direct", ckpt), ("universal", universal)):
        target = tmp_path / path
        r = torchrun(2, ["--resume", str(source), *args(tiny_config, target, *base, *changed)])
        assert r.returncode == 0, r.stderr[-3000:]
        line = next(l for l in r.stdout.splitlines() + r.stderr.splitlines() if "resume: " in l)
        for change in ("train.lr 0.004 -> 0.001", "train.weight_decay 0.5 -> 0.05", "train.beta1 0.9 -> 0.8",
                       "train.beta2 0.95 -> 0.99", "train.eps 1e-08 -> 1e-06", "train.grad_clip 1.0 -> 0.5"):
            assert change in line, line
        # the optimizer as it is after the load: this run's values, read back from its param groups
        assert (f"lr={0.001 * lr_factor(3, schedule):.6g} weight_decay=0.05/0 betas=(0.8, 0.99) eps=1e-06 "
                "grad_clip=0.5") in line, line
        m = metrics(target)
        # logged after step 4: the lr of the next step, at this run's peak
        assert abs(m[4]["lr"] - 0.001 * lr_factor(4, schedule)) < 1e-12, m[4]
        losses[path] = [m[s]["loss"] for s in (4, 5, 6)]
    assert losses["direct"] == pytest.approx(losses["universal"], rel=1e-5 if precision == "fp32" else 1e-2)


# ---- kills during background saves ---------------------------------------------------------------------------
def kill_tree(procs) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the rank, its DataLoader workers and its writer thread
        except ProcessLookupError:
            pass
    for p in procs:
        p.wait()


@pytest.mark.slow
@pytest.mark.distributed
def test_kill_9_of_every_rank_during_background_saves_always_resumes_from_a_complete_checkpoint(tiny_config,
                                                                                               tmp_path):
    """A checkpoint every step, written in the background under ZeRO-3 with an EMA; every rank killed
    (-9) at a random moment, 8 times: each restart resumes from `latest`, which is always complete
    (every rank's files readable), and the run finishes."""
    from pretrain.checkpoint.reader import CheckpointReader
    run, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    common = args(tiny_config, run, "train.zero_stage=3", "train.ema_decay=0.9", "checkpoint.interval=1",
                  "checkpoint.keep=2", "checkpoint.async=true", "train.max_steps=400")
    rng, resumed_at = random.Random(0), []
    for trial in range(8):
        procs = spawn_ranks(2, common, logs)
        time.sleep(rng.uniform(5.0, 9.0))  # the ranks start in ~4 s, then save every step
        kill_tree(procs)
        latest = read_latest(run / "checkpoints")
        if latest is None:
            continue
        reader = CheckpointReader(run / "checkpoints" / latest)  # every rank's files there and readable
        reader.state_dict(), reader.state_dict(ema=True)
        assert not latest.endswith(".tmp") and (run / "checkpoints" / latest).is_dir()
        resumed_at.append(int(latest.split("_")[1]))
    assert len(resumed_at) >= 6, resumed_at
    assert resumed_at == sorted(resumed_at) and resumed_at[-1] > resumed_at[0], resumed_at  # it went on each time
    r = torchrun(2, [*common, "train.stop_at=" + str(resumed_at[-1] + 2)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"from step {resumed_at[-1]}" in r.stdout + r.stderr


# ---- DeepSpeed's JIT build lock ------------------------------------------------------------------------------
def test_a_build_lock_left_by_a_killed_build_is_removed_with_a_line_instead_of_hanging(tmp_path):
    """torch's FileBaton `lock` of the shared-memory op, as a build killed by kill -9 leaves it: the next
    process that loads the op says it removes it and goes on (before: it slept forever, silently)."""
    from pretrain.prebuild_ops import extensions_dir
    code = "from pretrain.prebuild_ops import load_cpu_ops; print(load_cpu_ops()[1])"
    first = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True,
                           timeout=600)
    assert "ready" in first.stdout, first.stdout + first.stderr
    batons = list(extensions_dir().glob("**/deepspeed_shm_comm"))
    assert len(batons) == 1, batons  # built inside this environment
    (batons[0] / "lock").touch()
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert "ready" in r.stdout and "removing a stale build lock" in r.stderr, r.stdout + r.stderr
    assert not (batons[0] / "lock").exists()


# ---- the run-directory lock across hosts ---------------------------------------------------------------------
def test_a_lock_of_another_host_is_taken_over_only_once_its_heartbeat_is_stale(tmp_path):
    """flock may not reach other hosts (Lustre localflock, NFS nolock): the lock file's heartbeat decides."""
    from pretrain.run_lock import LOCK_FILE, RunDirBusy, RunDirLock
    (tmp_path / LOCK_FILE).write_text(f"host=node-b pid=4242 since=2026-12-04T10:00:00 beat={time.time() - 20:.0f}\n")
    with pytest.raises(RunDirBusy, match="in use by host=node-b pid=4242"):
        RunDirLock(tmp_path, stale_after_s=300).acquire()
    (tmp_path / LOCK_FILE).write_text(f"host=node-b pid=4242 since=2026-12-04T10:00:00 beat={time.time() - 400:.0f}\n")
    lock = RunDirLock(tmp_path, heartbeat_s=0.2, stale_after_s=300).acquire()
    assert lock.previous.startswith("host=node-b pid=4242")
    first = (tmp_path / LOCK_FILE).read_text()
    time.sleep(1.5)
    assert (tmp_path / LOCK_FILE).read_text() != first  # it beats
    lock.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""


@pytest.mark.slow
@pytest.mark.distributed
def test_a_checkpoint_one_rank_cannot_write_is_published_by_no_rank_and_the_run_goes_on(tiny_config, tmp_path):
    """Rank 1's files of step 4 fail as on a full disk, in the background: the commit tells rank 0,
    no rank publishes step 4, each rank says so in one line, `latest` stays at step 2, and step 6
    (the run's end) is written and published as usual."""
    run = tmp_path / "run"
    r = torchrun(2, args(tiny_config, run, "train.max_steps=6", "checkpoint.interval=2", "checkpoint.keep=3",
                         "checkpoint.async=true"), extra_env={"MONOFUSION_FAULT": "checkpoint-enospc@4:1"})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [l for l in r.stderr.splitlines() if l.startswith("error (rank")]
    assert sorted(l.split(")")[0] for l in lines) == ["error (rank 0", "error (rank 1"], r.stderr[-3000:]
    assert any("No space left on device" in l for l in lines) and any("another rank" in l for l in lines), lines
    assert list_checkpoints(run / "checkpoints") == ["step_00000002", "step_00000006"]
    assert read_latest(run / "checkpoints") == "step_00000006" and sorted(metrics(run)) == [1, 2, 3, 4, 5, 6]
