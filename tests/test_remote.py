"""Shards read from an HTTP server (the standard library's, on 127.0.0.1) and through pipe: commands:
the same batches as from the folder, retries through an outage, damaged shards counted as bad."""
import itertools
import shutil
import threading

import pytest
import torch

from data_pipelines import remote
from data_pipelines.remote import FolderServer
from data_pipelines.loader import PackedLoader
from tests.data_fixtures import data_config, model_config


@pytest.fixture
def served(test_data, tmp_path):
    """The test digits and text shard folders, copied under one root and served."""
    for name in ("digits", "text"):
        shutil.copytree(test_data[name], tmp_path / "www" / name)
    server = FolderServer(tmp_path / "www")
    yield server
    server.stop()


def batches(paths, n=6, rank=0, world_size=2, **kw):
    loader = PackedLoader(data_config(*paths, weights=[0.5, 0.5], num_workers=0, **kw), model_config(), 2,
                          rank=rank, world_size=world_size)
    out = []
    for batch in itertools.islice(loader, n):
        out.append((batch.tokens.clone(), batch.latents.clone(), [list(r) for r in loader.last_keys]))
    return out


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2]
                                    for x, y in zip(a, b))


def test_http_and_pipe_give_the_folder_batches(served, tmp_path):
    www = tmp_path / "www"
    local = batches([www / "digits", www / "text"])
    assert same(batches([served.url("digits"), served.url("text")]), local)
    pipes = [f"pipe:cat {www / name}/{{shard}}" for name in ("digits", "text")]
    assert same(batches(pipes), local)


def test_an_outage_is_retried_and_the_run_goes_on_with_the_same_batches(served, tmp_path):
    www = tmp_path / "www"
    local = batches([www / "digits", www / "text"], n=4)
    served.stop()
    threading.Timer(1.5, served.start).start()  # back on the same port after 1.5 s
    before = remote.RETRIES["count"]
    got = batches([served.url("digits"), served.url("text")], n=4, retry_backoff=0.5)
    assert remote.RETRIES["count"] > before and same(got, local)


def test_a_server_that_stays_down_is_an_error_naming_the_url(test_data, tmp_path):
    server = FolderServer(tmp_path)
    url = server.url("digits")
    server.stop()
    with pytest.raises(FileNotFoundError, match=f"{url}/manifest.json: unreadable after 1 retries \\(exit status 7\\)"):
        batches([url, url], read_retries=1, retry_backoff=0.01)


def test_a_shard_cut_short_on_the_server_is_retried_then_its_samples_are_counted_bad(served, tmp_path, caplog):
    from data_pipelines.shards import load_manifest
    m = load_manifest(tmp_path / "www" / "digits")
    tar = tmp_path / "www" / "digits" / m.shards[0].name
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    loader = PackedLoader(data_config(served.url("digits"), num_workers=0, read_retries=1, retry_backoff=0.01,
                                      max_bad_samples=10**6), model_config(), 2)
    list(loader)  # the whole epoch (data_config: one)
    assert loader.state_dict()["slots"]["0"]["bad"] > 0
    assert any("sha256 mismatch" in r.message and m.shards[0].name in r.message for r in caplog.records)


def test_read_bytes_resumes_after_a_broken_read_without_repeating_bytes(tmp_path):
    """A command that dies half-way the first time: the retry skips the bytes already held."""
    data = bytes(range(256)) * 1000
    (tmp_path / "f").write_bytes(data)
    flag = tmp_path / "failed-once"
    cmd = (f"pipe:if [ -e {flag} ]; then cat {tmp_path / 'f'}; else touch {flag}; "
           f"head -c 100000 {tmp_path / 'f'}; exit 3; fi")
    assert remote.read_bytes(cmd, retries=2, backoff=0, sleep=lambda s: None) == data
    with pytest.raises(ValueError, match="max_shard_bytes=1000"):
        remote.read_bytes(str(tmp_path / "f"), max_bytes=1000)


def test_a_file_over_max_shard_bytes_over_http_is_refused_at_once(tmp_path):
    (tmp_path / "f").write_bytes(bytes(5 << 20))
    server = FolderServer(tmp_path)
    before = remote.RETRIES["count"]
    try:
        with pytest.raises(ValueError, match=f"{server.url('f')}: larger than data.max_shard_bytes=1048576"):
            remote.read_bytes(server.url("f"), max_bytes=1 << 20, retries=2, backoff=0)
    finally:
        server.stop()
    assert remote.RETRIES["count"] == before  # too big is not a read error to retry


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_train_over_http_through_an_outage_like_from_the_folder(tiny_config, test_data, tmp_path):
    """2-rank runs read the same documents in the same batches (train.log_samples) and log the same
    losses from the folder and over HTTP, the server down for 3 s after its 4th shard request: the
    readers retry (logged with the URL) and no document is repeated or skipped."""
    import json
    from tests.launch import metrics, torchrun
    for name in ("digits", "text"):
        shutil.copytree(test_data[name], tmp_path / "www" / name)
    server = FolderServer(tmp_path / "www", outage=(4, 3.0))
    common = ["--config", str(tiny_config), "wandb.mode=disabled", "train.max_steps=6", "train.log_interval=1",
              "data.num_workers=1", "train.log_samples=true", "data.retry_backoff=1"]
    runs = {}
    for where, paths in (("folder", [tmp_path / "www" / "digits", tmp_path / "www" / "text"]),
                         ("http", [server.url("digits"), server.url("text")])):
        runs[where] = tmp_path / where
        r = torchrun(2, [*common, f"run.dir={runs[where]}", f"data.datasets.0.path={paths[0]}",
                         f"data.datasets.1.path={paths[1]}"])
        assert r.returncode == 0, r.stderr[-3000:]
    server.stop()
    assert server.tar_requests > 4 and "retry 1 of 5" in r.stderr and server.url("") in r.stderr
    a, b = metrics(runs["folder"]), metrics(runs["http"])
    assert all(a[s]["loss"] == b[s]["loss"] for s in range(1, 7))

    def documents(run):
        return [json.loads(line)["docs"] for rank in (0, 1) for line in
                (run / f"samples_rank{rank}.jsonl").read_text().splitlines()]
    assert documents(runs["folder"]) == documents(runs["http"])
    whole = [key for batch in documents(runs["folder"]) for row in batch for key in row if "@" not in key]
    assert whole and len(whole) == len(set(whole))  # no document with latents came twice
