"""Slurm pieces that need no cluster: time limits, sweeps, master ports, the requeue decision."""
import pytest

from pretrain import job_history
from slurm.job import master_port
from slurm.submit import minutes, point_name, sweep_points


def test_slurm_time_formats():
    assert [minutes(t) for t in ("10", "1:30", "2:00:00", "1-02:30:00", "1-2", "0:59")] == [10, 2, 120, 1590, 1560, 1]
    with pytest.raises(ValueError, match="--time"):
        minutes("ten")


def test_sweep_grid_gives_one_run_per_point():
    points = sweep_points(["train.lr=1e-3,3e-4", "model.dim=64,128"])
    assert points[0] == ["train.lr=1e-3", "model.dim=64"] and len(points) == 4
    assert len({point_name(p) for p in points}) == 4 and sweep_points([]) == [[]]
    with pytest.raises(ValueError, match="--sweep"):
        sweep_points(["train.lr"])


def test_master_port_is_shared_by_every_task_and_below_the_ephemeral_range():
    ports = {master_port(str(j)) for j in range(1, 2000)}
    assert all(15000 <= p < 32768 for p in ports) and len(ports) > 1800
    assert master_port("4242") == master_port("4242") and master_port("773") != master_port("774")


def test_should_requeue_reads_this_jobs_last_attempt(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert job_history.should_requeue(tmp_path, 3) == ("end", "the trainer recorded no start for this job "
                                                               "(it failed before training)")
    job_history.record(tmp_path, "start", 0, ranks=2)
    job_history.record(tmp_path, "end", 12, reason="signal SIGUSR1")
    decision, why = job_history.should_requeue(tmp_path, 3)
    assert decision == "requeue" and "step 12" in why
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")  # the cap
    job_history.record(tmp_path, "start", 12, ranks=2)
    job_history.record(tmp_path, "end", 20, reason="signal SIGUSR1")
    assert job_history.should_requeue(tmp_path, 3)[0] == "cap"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    job_history.record(tmp_path, "start", 20, ranks=2)
    job_history.record(tmp_path, "end", 30, reason="signal SIGTERM")  # scancel: no requeue
    assert job_history.should_requeue(tmp_path, 3) == ("end", "the run ended: signal SIGTERM")
    assert [a["reason"] for a in job_history.attempts(tmp_path)] == ["signal SIGUSR1", "signal SIGUSR1", "signal SIGTERM"]
