"""2-rank training (2 DataLoader workers each) reading its shards over HTTP from a fault-injecting server:
a shard that is missing, stalls or holds another shard's bytes stops every rank within a bounded time
with one line naming it, and leaves no process behind; a stall that clears is retried, counted in the
metrics, and the run finishes; an outage leaves the batches as they were from the folder."""
import json
import os
import time
import uuid

import pytest

from data_pipelines.transport.fault_server import FaultServer
from tests.launch import metrics, torchrun
from tests.test_remote import first_shard, intruder_tar

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
FAST = ["data.retry_backoff=0.2", "data.retry_backoff_max=1", "data.min_read_speed=0"]


def processes_with(marker: str) -> list[int]:
    """Pids of the processes whose environment holds `marker` (every process a run started inherits it)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def train(tiny_config, run_dir, server, extra, workers=2):
    """2 ranks x `workers` workers reading digits and text from `server`; (result, seconds it took,
    pids of the run left a moment after it ended)."""
    marker = f"MONOFUSION_TEST_RUN={uuid.uuid4().hex}"
    args = ["--config", str(tiny_config), "wandb.mode=disabled", f"run.dir={run_dir}", f"data.num_workers={workers}",
            f"data.datasets.0.path={server.url('digits')}", f"data.datasets.1.path={server.url('text')}",
            "train.log_interval=1", "train.log_samples=true", *FAST, *extra]
    r = torchrun(2, args, extra_env=dict([marker.split("=")]), timeout=600)
    end = time.time()
    left = processes_with(marker)
    for _ in range(20):  # a process may take a moment to be reaped
        if not left:
            break
        time.sleep(0.25)
        left = processes_with(marker)
    return r, end, left


def assert_clean_stop(r, end, left, server, name, reason):
    """Both ranks failed; exactly one error line names the shard (with `reason`), the other rank's names
    the failed rank; no worker traceback; nothing left; the stop came within 90 s of the first request
    for the shard."""
    out = r.stdout + r.stderr
    url = server.url(name)
    assert r.returncode != 0 and out.count("exitcode") >= 1
    named = [line for line in out.splitlines() if url in line and line.startswith("error")]
    assert len(named) == 1 and reason in named[0], out[-4000:]
    assert any(line.startswith("error (rank") and "could not read its data" in line for line in out.splitlines())
    assert "Caught DataError" not in out and "worker process" not in out
    assert left == [], f"processes of the run left: {left}"
    assert end - server.requests(name)[0]["t"] < 90


def test_a_shard_missing_forever_stops_both_ranks_with_one_line(tiny_config, www, tmp_path):
    name = first_shard(www, slot=0, slots=4, in_flight=1)  # read by exactly one slot (9 shards, 4 slots)
    with FaultServer(www, {name: {"status": 404}}) as server:
        r, end, left = train(tiny_config, tmp_path / "run", server, ["train.max_steps=40", "data.shards_in_flight=1"])
        assert len(server.requests(name)) == 2  # one check, no retries beyond it
    assert_clean_stop(r, end, left, server, name, "HTTP 404")


def test_a_stalled_shard_is_retried_then_stops_both_ranks(tiny_config, www, tmp_path):
    name = first_shard(www, slot=1, slots=4, in_flight=1)
    with FaultServer(www, {name: {"stall": None}}) as server:
        r, end, left = train(tiny_config, tmp_path / "run", server,
                             ["train.max_steps=40", "data.shards_in_flight=1", "data.read_timeout=5",
                              "data.retry_budget=12"])
        assert len(server.requests(name)) >= 2
    assert_clean_stop(r, end, left, server, name, "no byte for 5 s (data.read_timeout)")


def test_a_shard_with_another_shards_bytes_stops_the_run_and_is_never_trained_on(tiny_config, www, tmp_path):
    """Under ZeRO-3, the shard served as a valid tar of other samples: it fails its sha256 twice, the
    run stops, and none of those samples reached a batch."""
    name = first_shard(www, slot=2, slots=4, in_flight=1)
    intruders = intruder_tar(www, name)
    run = tmp_path / "run"
    with FaultServer(www, {name: {"swap": "intruder.tar"}}) as server:
        r, end, left = train(tiny_config, run, server,
                             ["train.max_steps=40", "data.shards_in_flight=1", "train.zero_stage=3"])
    trained = [k for rank in (0, 1) if (run / f"samples_rank{rank}.jsonl").exists()
               for line in (run / f"samples_rank{rank}.jsonl").read_text().splitlines()
               for row in json.loads(line)["docs"] for k in row]
    assert trained and not intruders & set(trained)
    assert_clean_stop(r, end, left, server, name, "sha256")


def test_a_stall_that_clears_is_retried_counted_and_the_run_finishes(tiny_config, www, tmp_path):
    """The first 10 s of requests for a shard get headers and then nothing; read_timeout=5. Evaluation
    on (held-out text over HTTP too)."""
    name = first_shard(www, slot=0, slots=4, in_flight=1)
    run = tmp_path / "run"
    with FaultServer(www, {name: {"stall": None, "for": 10}}) as server:
        r, _, left = train(tiny_config, run, server,
                           ["train.max_steps=6", "data.shards_in_flight=1", "data.read_timeout=5",
                            f"data.eval_datasets=[{{path: {server.url('text')}}}]", "train.eval_interval=3",
                            "train.eval_batches=2"])
        requests = server.requests(name)
    assert r.returncode == 0, r.stderr[-4000:]
    assert left == []
    stalled = [q for q in requests if q["fault"] == "stall"]
    last = metrics(run)[6]
    assert stalled and last["data/stalls"] == len(stalled) and last["data/retries"] == len(stalled)
    assert "eval/lm_loss" in metrics(run)[3]


def test_two_ranks_train_over_http_through_an_outage_like_from_the_folder(tiny_config, www, tmp_path):
    """The same documents in the same batches and the same losses from the folder and over HTTP with
    every shard request dropped for the first 3 s: the readers retry (logged with the URL)."""
    from tests.launch import torchrun as launch
    common = ["--config", str(tiny_config), "wandb.mode=disabled", "train.max_steps=6", "train.log_interval=1",
              "data.num_workers=1", "train.log_samples=true", *FAST]
    runs = {}
    with FaultServer(www, {"*.tar": {"drop": True, "for": 3}}) as server:
        for where, paths in (("folder", [www / "digits", www / "text"]),
                             ("http", [server.url("digits"), server.url("text")])):
            runs[where] = tmp_path / where
            r = launch(2, [*common, f"run.dir={runs[where]}", f"data.datasets.0.path={paths[0]}",
                           f"data.datasets.1.path={paths[1]}"])
            assert r.returncode == 0, r.stderr[-3000:]
        dropped = [q for q in server.requests() if q["fault"] == "drop"]
    assert dropped and "retry 1 in" in r.stderr and server.url("") in r.stderr
    a, b = metrics(runs["folder"]), metrics(runs["http"])
    assert all(a[s]["loss"] == b[s]["loss"] for s in range(1, 7))
    assert b[6]["data/retries"] >= 1

    def documents(run):
        return [json.loads(line)["docs"] for rank in (0, 1) for line in
                (run / f"samples_rank{rank}.jsonl").read_text().splitlines()]
    assert documents(runs["folder"]) == documents(runs["http"])
    whole = [key for batch in documents(runs["folder"]) for row in batch for key in row if "@" not in key]
    assert whole and len(whole) == len(set(whole))  # no document with latents came twice


def test_a_killed_launcher_leaves_no_process_even_with_a_worker_stalled_in_a_read(tiny_config, www, tmp_path):
    """SIGKILL torchrun while a worker waits on a stalled shard: the ranks exit (they watch their
    launcher), their workers die with them (prctl), and nothing of the run remains."""
    import signal
    import subprocess
    import sys
    from pretrain.distributed import free_port
    from tests.launch import REPO, env
    name = first_shard(www, slot=1, slots=4, in_flight=1)
    marker = f"MONOFUSION_TEST_RUN={uuid.uuid4().hex}"
    with FaultServer(www, {name: {"stall": None}}) as server:
        args = ["--config", str(tiny_config), "wandb.mode=disabled", f"run.dir={tmp_path / 'run'}",
                "data.num_workers=2", "data.shards_in_flight=1", f"data.datasets.0.path={server.url('digits')}",
                f"data.datasets.1.path={server.url('text')}", "train.max_steps=40"]
        launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                     "--master-port", str(free_port()), "-m", "pretrain.train", *args], cwd=REPO,
                                    env=env(**dict([marker.split("=")])), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        try:
            for _ in range(240):
                if server.requests(name):
                    break
                time.sleep(0.25)
            assert server.requests(name), "the run never asked for the stalled shard"
            time.sleep(1)
            assert len(processes_with(marker)) >= 6  # torchrun, 2 ranks, 2 x 2 workers
            launcher.send_signal(signal.SIGKILL)
            launcher.wait()
            for _ in range(60):
                if not processes_with(marker):
                    break
                time.sleep(0.25)
            assert processes_with(marker) == []
        finally:
            for pid in processes_with(marker):
                os.kill(pid, signal.SIGKILL)
