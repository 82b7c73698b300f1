"""Shards read over HTTP (a fault-injecting server on 127.0.0.1, in a process of its own) and through
pipe: commands: the same batches as from the folder through outages, stalls and cut connections
(each retry seen by the server), and a clear DataError for what cannot be read or does not match."""
import io
import itertools
import os
import re
import time

import pytest
import torch

from data_pipelines.loader import PackedLoader
from data_pipelines.shards import load_manifest, open_shard
from data_pipelines.slot import DataError
from data_pipelines.transport.fault_server import FaultServer
from data_pipelines.transport.fetch import download
from data_pipelines.transport.policy import ReadPolicy, ReadStats, RemoteError, TooLarge
from tests.data_fixtures import data_config, model_config

FAST = dict(retry_backoff=0.05, retry_backoff_max=0.2, min_read_speed=0)  # a loaded machine is slow


def batches(paths, n=6, rank=0, world_size=2, loader_out=None, **kw):
    cfg = data_config(*paths, weights=[0.5, 0.5][:len(paths)], **{"num_workers": 0, **kw})
    loader = PackedLoader(cfg, model_config(), 2, rank=rank, world_size=world_size)
    out = []
    for batch in itertools.islice(loader, n):
        out.append((batch.tokens.clone(), batch.latents.clone(), [list(r) for r in loader.last_keys]))
    if loader_out is not None:
        loader_out.append(loader)
    return out


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2]
                                    for x, y in zip(a, b))


def first_shard(www, slot=0, slots=2, in_flight=4, dataset="digits"):
    """The path (under the served root) of a shard that `slot` (of `slots`) reads in its first group."""
    from data_pipelines.order import Dealing, DatasetOrder
    m = load_manifest(www / dataset)
    order = DatasetOrder(m.shard_sizes, 0, True, 2 * in_flight + 2)
    shards = Dealing(order, slots, 0, 1, in_flight).group_shards(slot, 0)
    return f"{dataset}/{m.shards[sorted(shards)[0]].name}"


def test_http_and_pipe_give_the_folder_batches(www):
    local = batches([www / "digits", www / "text"])
    with FaultServer(www) as server:
        assert same(batches([server.url("digits"), server.url("text")]), local)
    pipes = [f"pipe:cat {www / name}/{{shard}}" for name in ("digits", "text")]
    assert same(batches(pipes), local)


@pytest.mark.parametrize("fault", [{"drop": True, "times": 2}, {"status": 503, "times": 2},
                                   {"stall": None, "times": 1}])
def test_a_shard_outage_or_stall_is_retried_and_gives_the_same_batches(www, fault):
    """The first 2 requests (1 for a stall) of every shard fail: each shard is asked for again, the slot
    counts the retries (and stalls), and the batches of the rank's whole epoch equal the folder's."""
    local = batches([www / "digits", www / "text"], n=None)
    with FaultServer(www, {"*.tar": fault}) as server:
        loaders = []
        got = batches([server.url("digits"), server.url("text")], n=None, loader_out=loaders, read_timeout=1,
                      **FAST)
        tar_requests = [r for r in server.requests() if r["name"].endswith(".tar")]
    assert same(got, local)
    counts = loaders[0].counters()
    failed = [r for r in tar_requests if r["fault"]]
    assert failed and counts["retries"] == len(failed)
    assert counts["stalls"] == (len(failed) if "stall" in fault else 0)
    for r in failed:  # each failed request was followed by another for the same shard, served
        assert any(s["name"] == r["name"] and s["fault"] is None and s["t"] > r["t"] for s in tar_requests)


@pytest.mark.parametrize("ranges", [True, False])
def test_a_cut_connection_resumes_where_it_broke_off_or_skips_what_it_holds(www, ranges):
    """The connection of a shard is cut at byte 100000 once. A server that honours Range is asked for
    the rest from that byte (a resume); one that does not sends the whole file again and the bytes
    already held are skipped: either way exactly one retry and the folder's batches."""
    local = batches([www / "digits", www / "text"], n=3, world_size=1)
    name = first_shard(www, slots=1)
    with FaultServer(www, {name: {"cut": 100000, "times": 1}}, ranges=ranges) as server:
        loaders = []
        got = batches([server.url("digits"), server.url("text")], n=3, world_size=1, loader_out=loaders, **FAST)
        starts = [r["start"] for r in server.requests(name)]
    assert same(got, local)
    assert starts == ([0, 100000] if ranges else [0, 0])
    assert loaders[0].counters()["retries"] == 1 and loaders[0].counters()["resumes"] == int(ranges)


def test_a_pipe_that_breaks_off_is_read_again_without_repeating_bytes(tmp_path):
    """A command that dies half-way the first time: the retry skips the bytes already held."""
    data = os.urandom(300000)
    (tmp_path / "f").write_bytes(data)
    flag = tmp_path / "failed-once"
    cmd = (f"pipe:if [ -e {flag} ]; then cat {tmp_path / 'f'}; else touch {flag}; "
           f"head -c 100000 {tmp_path / 'f'}; echo broken >&2; exit 3; fi")
    out, stats = io.BytesIO(), ReadStats()
    download(cmd, out, ReadPolicy(backoff=0.01), stats, sleep=lambda s: None)
    assert out.getvalue() == data and stats.retries == 1


def test_a_stalled_pipe_is_aborted_and_its_command_killed(tmp_path):
    marker = f"{time.time_ns() % 10**6}.5"
    with pytest.raises(RemoteError, match=r"pipe:sleep .*no byte for 1 s.*data.retry_budget=1\)"):
        download(f"pipe:sleep {marker}", io.BytesIO(), ReadPolicy(read_timeout=1, retry_budget=1, backoff=0.01))
    leftover = [p for p in os.listdir("/proc") if p.isdigit() and marker in _cmdline(p)]
    assert leftover == []


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def test_a_missing_shard_is_a_data_error_after_one_check(www):
    name = first_shard(www)
    with FaultServer(www, {name: {"status": 404}}) as server:
        url = server.url(name)
        with pytest.raises(DataError, match=f"^{url}: HTTP 404, after a second check$"):
            batches([server.url("digits")], n=50, **FAST)
        assert len(server.requests(name)) == 2


def intruder_tar(www, name: str) -> set:
    """digits/intruder.tar: the samples of shard `name` (a path under www) under new keys; its keys."""
    import webdataset as wds
    m = load_manifest(www / "digits")
    shard = open_shard(m, [f"digits/{s.name}" for s in m.shards].index(name))
    keys = set()
    with wds.TarWriter(str(www / "digits" / "intruder.tar")) as out:
        for i in range(len(shard)):
            key, files = shard.sample(i)
            out.write({"__key__": f"intruder-{key}", **files})
            keys.add(f"intruder-{key}")
    shard.close()
    return keys


def test_a_shard_with_another_shards_bytes_is_never_read(www):
    """Served with a valid tar of other samples, it differs from the manifest's sha256: no sample of
    those bytes reaches a batch, and a DataError names the shard, after one re-read."""
    name = first_shard(www, slots=1, in_flight=1)
    intruders = intruder_tar(www, name)
    with FaultServer(www, {name: {"swap": "intruder.tar"}}) as server:
        loader = PackedLoader(data_config(server.url("digits"), num_workers=0, shards_in_flight=1, **FAST),
                              model_config(), 2)
        keys, error = [], None
        try:
            for _ in loader:
                keys += [k for row in loader.last_keys for k in row]
        except DataError as e:
            error = str(e)
        assert not intruders & set(keys)
        assert error is not None and re.match(f"^{re.escape(server.url(name))}: sha256 .* the manifest says ", error)
        assert len(server.requests(name)) == 2


def test_a_file_over_max_shard_bytes_over_http_is_refused_at_once(tmp_path):
    (tmp_path / "f").write_bytes(bytes(5 << 20))
    stats = ReadStats()
    with FaultServer(tmp_path) as server:
        with pytest.raises(TooLarge, match=f"{server.url('f')}: 5242880 bytes, larger than data.max_shard_bytes="):
            download(server.url("f"), io.BytesIO(), ReadPolicy(max_bytes=1 << 20), stats)
        assert len(server.requests("f")) == 1 and stats.retries == 0


def test_a_server_that_stays_down_is_an_error_naming_the_url_within_the_budget(tmp_path):
    server = FaultServer(tmp_path)
    url = server.url("digits")
    server.stop()
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match=f"{url}/manifest.json: .*Connection refused.*data.retry_budget=2\\)"):
        batches([url], retry_budget=2, **FAST)
    assert time.monotonic() - start < 10


def test_a_worker_error_stops_the_loader_and_ends_every_worker(www):
    """2 workers: one slot's first shard is missing, the other's stalls forever. The rank gets one
    DataError line (no worker traceback) and every worker is gone right after."""
    import multiprocessing
    missing, stalled = first_shard(www, slot=0), first_shard(www, slot=1)
    rules = {missing: {"status": 404}, stalled: {"stall": None}}
    with FaultServer(www, rules) as server:
        loader = PackedLoader(data_config(server.url("digits"), num_workers=2, **FAST), model_config(), 2,
                              world_size=1)
        start = time.monotonic()
        with pytest.raises(DataError) as err:
            for _ in loader:
                pass
        assert str(err.value).startswith(server.url(missing) + ": HTTP 404")
        assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
        assert multiprocessing.active_children() == [] and time.monotonic() - start < 30


def test_the_next_group_s_shard_is_downloaded_before_the_reader_needs_it(www):
    """One slot, one shard in flight: while the reader still draws on its first shard, the prefetch
    thread asks for the second; its samples then come from the download already made (no second
    request), and the batches equal the folder's."""
    from data_pipelines.order import DatasetOrder
    m = load_manifest(www / "digits")
    order = DatasetOrder(m.shard_sizes, 0, True, 4)
    first, second = (f"digits/{m.shards[int(s)].name}" for s in order.epoch(0)[0][:2])
    local = batches([www / "digits"], n=2, world_size=1, shards_in_flight=1)
    with FaultServer(www, {"*.tar": {"rate": 2e6}}) as server:
        loader = PackedLoader(data_config(server.url("digits"), num_workers=0, shards_in_flight=1), model_config(),
                              2)
        it = iter(loader)
        got = [next(it)]
        keys = {k for row in loader.last_keys for k in row}
        for _ in range(100):
            if server.requests(second):
                break
            time.sleep(0.1)
        asked = server.requests(second)
        first_keys = {k for k, _ in open_shard(m, [f"digits/{s.name}" for s in m.shards].index(first)).samples}
        assert asked and keys <= first_keys  # asked for while only the first shard had been read
        for batch in it:  # on through the second shard
            got.append(batch)
            if len(got) == 2 * 200 // 8:
                break
        assert len(server.requests(second)) == 1
        it.close()
    assert all(torch.equal(a.tokens, b[0]) for a, b in zip(got[:2], local))


def test_a_served_shard_that_holds_no_readable_sample_counts_its_samples_bad_and_is_fetched_once(www):
    """A shard whose bytes are garbage, but the manifest's own (written so): its samples are counted
    bad, every other document arrives, and each shard is downloaded once (prefetched or not)."""
    import hashlib
    import json
    from data_pipelines.shards import MANIFEST, fingerprint
    raw = json.loads((www / "digits" / MANIFEST).read_text())
    bad = raw["shards"][3]
    garbage = os.urandom(50000)
    (www / "digits" / bad["name"]).write_bytes(garbage)
    bad["sha256"] = hashlib.sha256(garbage).hexdigest()
    raw["fingerprint"] = fingerprint(raw)
    (www / "digits" / MANIFEST).write_text(json.dumps(raw))
    with FaultServer(www) as server:
        loader = PackedLoader(data_config(server.url("digits"), num_workers=0, max_bad_samples=10**6), model_config(),
                              2)
        keys = [k for _ in loader for row in loader.last_keys for k in row]
        tars = [r["name"] for r in server.requests() if r["name"].endswith(".tar")]
    assert loader.counters()["bad"] == bad["samples"] and len(keys) == len(set(keys)) == 1797 - bad["samples"]
    assert sorted(tars) == sorted(f"digits/{s['name']}" for s in raw["shards"])


def test_a_pipe_command_and_its_children_die_with_the_process_reading_it(tmp_path):
    """A reader process that dies (os._exit, as a SIGKILLed worker would) in the middle of a pipe:
    read takes the command's whole pipeline with it."""
    import subprocess
    import sys
    mark = f"{time.time_ns() % 10**6}.25"
    code = ("import os, time\nfrom data_pipelines.transport.sources import PipeSource\n"
            f"PipeSource('sleep {mark} | cat', 5)\ntime.sleep(1)\nos._exit(0)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    for _ in range(20):
        if not [p for p in os.listdir("/proc") if p.isdigit() and mark in _cmdline(p)]:
            break
        time.sleep(0.25)
    assert [_cmdline(p) for p in os.listdir("/proc") if p.isdigit() and mark in _cmdline(p)] == []


def test_a_shard_that_arrives_in_small_pieces_is_indexed_whole(www):
    """Every piece smaller than a file buffer: the spill file is flushed before it is indexed, so the
    last samples are not cut off (the sha256, taken from the pieces, would not notice)."""
    from data_pipelines.transport.fetch import download  # noqa: F401 (the path under test)
    m = load_manifest(www / "text")
    with FaultServer(www, {"*.tar": {"rate": 60000}}) as server:  # 3,000-byte pieces
        remote = load_manifest(server.url("text"))
        got = open_shard(remote, 0, ReadPolicy(min_speed=0))
    want = open_shard(m, 0)
    assert got.error is None and [k for k, _ in got.samples] == [k for k, _ in want.samples]
    assert [got.sample(i) for i in range(len(got))] == [want.sample(i) for i in range(len(want))]


def test_after_a_resume_on_another_layout_only_shards_with_samples_left_are_downloaded(www):
    """2 slots x 2 in flight read part of the epoch; resumed on 3 slots x 1 in flight, every shard the
    readers download (prefetched or not) gives them a sample: shards read whole before are not fetched."""
    with FaultServer(www) as server:
        url = server.url("digits")
        first = [PackedLoader(data_config(url, num_workers=0, shards_in_flight=2), model_config(), 2, rank=r,
                              world_size=2) for r in range(2)]
        for loader in first:
            it = iter(loader)
            for _ in range(30):
                next(it)
            it.close()
        state = PackedLoader.merge_states([loader.state_dict() for loader in first])
        before = len(server.requests())
        keys = set()
        for r in range(3):
            loader = PackedLoader(data_config(url, num_workers=0, shards_in_flight=1), model_config(), 2, rank=r,
                                  world_size=3)
            loader.load_state_dict(state)
            keys |= {k for _ in loader for row in loader.last_keys for k in row}
        fetched = {q["name"] for q in server.requests()[before:] if q["name"].endswith(".tar")}
    m = load_manifest(www / "digits")
    names = [f"digits/{s.name}" for s in m.shards]
    shard_keys = {n: {k for k, _ in open_shard(m, i).samples} for i, n in enumerate(names)}
    assert fetched and all(shard_keys[n] & keys for n in fetched)
    assert len(fetched) < len(names)  # some shards were read whole before the resume
