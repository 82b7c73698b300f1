"""Training under a real Slurm (two nodes in network namespaces, tests/conftest.py): slurm.submit
(submitit) and slurm/train.sbatch jobs, two-node rendezvous, requeue on the time limit and on
preemption, scancel and a lost node."""
import re
import subprocess
import sys
import time

import pytest

from pretrain.checkpoint import read_latest
from pretrain.job_history import attempts
from tests.launch import REPO, env, metrics, torchrun

pytestmark = [pytest.mark.slurm, pytest.mark.distributed, pytest.mark.slow]
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def train_args(cfg, run_dir, *extra):
    return [f"run.dir={run_dir}", "train.log_interval=1", "wandb.mode=disabled", "data.num_workers=1", *extra]


def client_env(cluster) -> dict:
    return env(**cluster.env, MONOFUSION_PYTHON=sys.executable)


def submit(cluster, cfg, run_dir, *extra, options=()) -> str:
    """python -m slurm.submit ... -> the job id."""
    cmd = [sys.executable, "-m", "slurm.submit", "--config", str(cfg), *train_args(cfg, run_dir, *extra),
           "--partition", "debug", "--mem", "1G", *options]
    r = subprocess.run(cmd, cwd=REPO, env=client_env(cluster), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return re.search(r"submitted job ([0-9_]+)", r.stdout).group(1)


def sbatch(cluster, cfg, run_dir, *extra, options=()) -> str:
    cmd = ["sbatch", "--parsable", "--partition", "debug", "--mem", "1G", f"--output={run_dir}.out", *options,
           "slurm/train.sbatch", str(cfg), *train_args(cfg, run_dir, *extra)]
    r = subprocess.run(cmd, cwd=REPO, env=client_env(cluster), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def job_info(cluster, job_id) -> dict:
    r = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=client_env(cluster), capture_output=True,
                       text=True)
    return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)


def wait_done(cluster, job_id, timeout=300) -> dict:
    """Poll until the job ends -> its final `scontrol show job` fields."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(cluster, job_id)
        assert info, f"job {job_id} is unknown to Slurm"
        if info.get("JobState") in DONE:
            return info
        time.sleep(1)
    subprocess.run(["scancel", job_id], env=client_env(cluster))
    pytest.fail(f"job {job_id} did not end in {timeout}s: {job_info(cluster, job_id)}")


def task_logs(run_dir) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted((run_dir / "slurm").rglob("*_log.*")))


def test_dry_run_prints_the_sbatch_script(tiny_config, tmp_path):
    r = subprocess.run([sys.executable, "-m", "slurm.submit", "--config", str(tiny_config), f"run.dir={tmp_path}/r",
                        "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--time", "1-02:30:00",
                        "--signal-delay", "120", "--dry-run"], cwd=REPO, env=env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=1590", "#SBATCH --signal=USR2@120", "#SBATCH --requeue",
                 "--kill-on-bad-exit=1"):
        assert line in r.stdout, (line, r.stdout)
    assert not (tmp_path / "r").exists()  # nothing submitted, nothing written
    bad = subprocess.run([sys.executable, "-m", "slurm.submit", "--config", str(tiny_config), "train.max_stepz=3",
                          "--partition", "gpu", "--time", "10", "--dry-run"], cwd=REPO, env=env(),
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "train.max_stepz" in bad.stderr
    early = subprocess.run([sys.executable, "-m", "slurm.submit", "--config", str(tiny_config), "--partition", "gpu",
                            "--time", "1", "--signal-delay", "30", "--dry-run"], cwd=REPO, env=env(),
                           capture_output=True, text=True)
    assert early.returncode == 2 and "--signal-delay" in early.stderr  # it would come at the start


def test_a_two_node_sweep_trains_like_torchrun_under_zero2_and_zero3(slurm_cluster, tiny_config, test_data, tmp_path):
    """`--sweep train.zero_stage=2,3`: a job array, one run directory per value. Each run has one task
    on each of two nodes (two network namespaces: the ranks rendezvous over the bridge, as on two
    hosts) and evaluates; its losses are those of a 2-rank torchrun run of the same config."""
    held_out = f"data.eval_datasets=[{{path: {test_data['digits']}}}, {{path: {test_data['text']}}}]"
    common = ["train.max_steps=4", "checkpoint.interval=4", "train.eval_interval=2", "train.eval_batches=2", held_out]
    array = submit(slurm_cluster, tiny_config, tmp_path / "sweep", *common, options=[
        "--nodes", "2", "--tasks-per-node", "1", "--time", "5", "--sweep", "train.zero_stage=2,3"])
    for task, stage in enumerate((2, 3)):
        ref = tmp_path / f"torchrun{stage}"
        r = torchrun(2, ["--config", str(tiny_config), *train_args(tiny_config, ref, f"train.zero_stage={stage}",
                                                                   *common)])
        assert r.returncode == 0, r.stderr[-3000:]
        run = tmp_path / "sweep" / f"train.zero_stage={stage}"
        info = wait_done(slurm_cluster, f"{array.split('_')[0]}_{task}")
        assert info["JobState"] == "COMPLETED" and info["NodeList"] == "mfnode[1-2]", task_logs(tmp_path / "sweep")
        ms, mt = metrics(run), metrics(ref)
        assert sorted(ms) == [1, 2, 3, 4] and "eval/loss" in ms[2] and "eval/loss" in ms[4]
        for step in ms:
            keys = [k for k in mt[step] if "loss" in k]
            assert keys == [k for k in ms[step] if "loss" in k]
            assert [ms[step][k] for k in keys] == pytest.approx([mt[step][k] for k in keys], rel=1e-6), (stage, step)


def scontrol(cluster, *words) -> None:
    r = subprocess.run(["scontrol", *words], env=client_env(cluster), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def wait_for(predicate, what: str, timeout=180):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_time_limit_checkpoints_and_requeues_three_times_then_finishes_like_a_straight_run(
        slurm_cluster, tiny_config, tmp_path):
    """One slurm.submit job with a 1-minute limit: Slurm's time-limit signal (USR2, 20 s ahead; its
    30 s check sends it up to 30 s earlier: 10 to 40 s after the start) makes every rank
    checkpoint, and submitit requeues the job, three times; then its limit is raised and it
    finishes. Every step's loss equals a straight run's,
    submitted with plain sbatch (slurm/train.sbatch)."""
    run, straight = tmp_path / "requeued", tmp_path / "straight"
    common = ["train.max_steps=270", "checkpoint.interval=1000"]
    job = submit(slurm_cluster, tiny_config, run, *common,
                 options=["--tasks-per-node", "2", "--time", "1", "--signal-delay", "20", "--max-requeues", "3"])
    # the straight run: plain sbatch of slurm/train.sbatch, 2 tasks
    reference = sbatch(slurm_cluster, tiny_config, straight, *common, options=["--ntasks-per-node", "2", "--time", "15"])
    deadline, extended = time.time() + 600, False
    while True:
        info = job_info(slurm_cluster, job)
        if not extended and int(info["Restarts"]) >= 3:  # the fourth run may finish
            scontrol(slurm_cluster, "update", f"JobId={job}", "TimeLimit=15")
            extended = True
        if info["JobState"] in DONE or time.time() > deadline:
            break
        time.sleep(0.5)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "3", (info, task_logs(run))
    history = attempts(run)
    assert [a["restart"] for a in history] == [0, 1, 2, 3], history
    assert all(a["reason"] == "signal SIGUSR2" for a in history[:3]) and history[3]["reason"] == "finished", history
    for before, after in zip(history, history[1:]):  # each run made progress and the next resumed from it
        assert after["from_step"] == before["to_step"] > before["from_step"], history
    assert history[3]["to_step"] == 270
    assert wait_done(slurm_cluster, reference)["JobState"] == "COMPLETED", (tmp_path / "straight.out").read_text()[-3000:]
    assert read_latest(straight / "checkpoints") == "step_00000270"
    assert [(a["restart"], a["to_step"], a["reason"]) for a in attempts(straight)] == [(0, 270, "finished")]
    mr, ms = metrics(run), metrics(straight)
    assert sorted(mr) == sorted(ms) == list(range(1, 271))
    assert all(mr[s]["loss"] == ms[s]["loss"] for s in ms)  # bit-exact through three requeues
    assert [mr[a["from_step"] + 1].get("requeues") for a in history] == [0, 1, 2, 3]
    summary = subprocess.run([sys.executable, "-m", "pretrain.summary", str(run)], cwd=REPO, env=env(),
                             capture_output=True, text=True).stdout
    assert "3 requeue(s)" in summary and f"job {job:>8s} (requeue 3)" in summary, summary


def test_preemption_scancel_and_a_lost_node_leave_latest_loadable_and_the_run_resumes(slurm_cluster, tiny_config,
                                                                                     tmp_path):
    """A two-node job: `scontrol requeue` mid-step (what a preempting partition does: SIGTERM, then
    requeue) -> it checkpoints and resumes; scancel -> `latest` stays loadable and a resubmission
    resumes; then a node dies (its slurmd, step and task SIGKILLed): Slurm ends that run at once
    (no rank waits on the lost one), `latest` is loadable, and a resubmission resumes from it.
    (Jobs are requeueable, so Slurm also requeues one that lost a node; that path is the
    preemption's.)"""
    from pretrain.checkpoint.reader import CheckpointReader
    run = tmp_path / "run"
    common = ["train.max_steps=40", "checkpoint.interval=4"]
    two_nodes = ["--nodes", "2", "--tasks-per-node", "1", "--time", "10"]

    def latest_step():
        step = int(read_latest(run / "checkpoints").split("_")[1])
        assert CheckpointReader(run / "checkpoints" / f"step_{step:08d}").state_dict()  # loadable
        return step

    def reached(n):
        wait_for(lambda: max(metrics(run), default=0) >= n, f"step {n}")

    job = submit(slurm_cluster, tiny_config, run, *common, options=two_nodes)
    reached(5)
    scontrol(slurm_cluster, "requeue", job)
    wait_for(lambda: len(attempts(run)) == 2, "the requeued job to start again")
    preempted_at = attempts(run)[0]["to_step"]
    reached(preempted_at + 4)
    subprocess.run(["scancel", job], env=client_env(slurm_cluster), check=True)
    assert wait_done(slurm_cluster, job)["JobState"] == "CANCELLED"
    cancelled_at = latest_step()
    job = submit(slurm_cluster, tiny_config, run, *common, options=two_nodes)  # resumes from `latest`
    reached(cancelled_at + 4)
    try:
        assert slurm_cluster.kill_node("mfnode2") > 0
        # the run ends at once (rank 0 does not wait on its lost peer); the job, requeueable, goes
        # back to the queue, where it would wait for nodes: cancel it and resubmit instead
        wait_for(lambda: job_info(slurm_cluster, job)["Restarts"] == "1", "Slurm to requeue the job", 90)
        subprocess.run(["scancel", job], env=client_env(slurm_cluster), check=True)
        assert wait_done(slurm_cluster, job)["JobState"] == "CANCELLED"
        lost_at = latest_step()
    finally:
        slurm_cluster.start_node("mfnode2")
    slurm_cluster.wait_idle(90)
    job = submit(slurm_cluster, tiny_config, run, *common, options=two_nodes)
    info = wait_done(slurm_cluster, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", (info, task_logs(run))
    history = attempts(run)
    assert [a["from_step"] for a in history] == [0, preempted_at, cancelled_at, lost_at], history
    assert [a["reason"] for a in history] == ["signal SIGTERM", "signal SIGTERM", "running or killed", "finished"]
    assert preempted_at >= 5 and max(metrics(run)) == 40
