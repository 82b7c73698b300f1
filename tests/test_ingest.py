"""Real image data in: img2dataset's own webdataset shards and pyarrow parquet tables, extracted by
`write_shards` split over tasks, resumed after a kill, merged, and trained on by 2 ranks."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_pipelines.ingest.inputs import ReadOptions, list_units, read_unit
from data_pipelines.ingest.resolution import ResolutionPolicy, Skip
from data_pipelines.ingest.tasks import task_split
from data_pipelines.shards import iter_shard_documents, load_manifest
from data_pipelines.transport.fault_server import FaultServer
from pretrain.distributed import free_port
from tests.img2dataset_data import SIZES, _wait_for_port, download_with_img2dataset, make_images
from tests.launch import REPO, env, metrics, torchrun

IMAGES = 30  # + 2 too small for --min-size, + 4 that img2dataset drops (2 undecodable, 2 missing)
SIZING = ["--max-pixels", "576", "--min-size", "20", "--patch-size", "2", "--seq-len", "256",
          "--max-bad-fraction", "0.2"]  # the 2 small photos are 11% of the samples of the task that has them


@pytest.fixture(scope="module")
def laion(tmp_path_factory):
    """img2dataset's shards of IMAGES photos of 5 aspect ratios, 8 URLs a shard, and its summed stats."""
    root = tmp_path_factory.mktemp("img2dataset")
    images = make_images(root / "www", IMAGES)
    stats = download_with_img2dataset(root / "www", images, root / "shards", per_shard=8)
    return root / "shards", stats


def write(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_pipelines.write_shards", "--no-progress", *map(str, args)],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=600, **kw)


def extract_args(source_input, out, test_data, vae=None, *extra):
    encoder = ["--encoder", "vae", "--vae", vae] if vae else ["--encoder", "pixels"]
    return ["--source", "webdataset", "--input", source_input, "--tokenizer", test_data["tokenizer"], "--out", out,
            *encoder, *SIZING, *extra]


def shard_bytes(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


# ---------------------------------------------------------------- the acceptance path

@pytest.mark.slow
@pytest.mark.distributed
def test_img2dataset_shards_split_over_two_tasks_merge_and_train_two_ranks_under_zero3(
        laion, test_data, tiny_vae, tiny_config, tmp_path):
    shards, stats = laion
    assert stats["successes"] == IMAGES + 2 and stats["failed_to_download"] + stats["failed_to_resize"] == 4
    out = tmp_path / "latents"
    for task in (0, 1):
        r = write(extract_args(shards, out, test_data, tiny_vae, "--tasks", 2, "--task", task))
        assert r.returncode == 0, r.stderr[-3000:]
    assert "merge_shards" in write(extract_args(shards, tmp_path / "x", test_data, tiny_vae, "--tasks", 2,
                                                "--task", 1)).stdout  # a task that finishes first says so
    m = load_manifest(out)
    assert m.num_samples + sum(m.skipped.values()) == stats["successes"]
    assert m.skipped == {"too_small": 2}
    assert m.encoder["type"] == "vae" and m.resolution["max_pixels"] == 576 and m.resolution["multiple"] == 4
    # `merge_shards` joins the parts into the same manifest the last task wrote
    merged = (out / "manifest.json").read_bytes()
    (out / "manifest.json").unlink()
    merge = [sys.executable, "-m", "data_pipelines.merge_shards", str(out)]
    r = subprocess.run(merge, cwd=REPO, env=env(), capture_output=True, text=True)
    assert r.returncode == 2 and "more than --max-bad-fraction 0.01" in r.stderr  # judged over every task
    r = subprocess.run([*merge, "--max-bad-fraction", "0.2"], cwd=REPO, env=env(), capture_output=True, text=True)
    assert r.returncode == 0 and (out / "manifest.json").read_bytes() == merged, r.stderr
    # one task writes the same shard set
    one = tmp_path / "one-task"
    assert write(extract_args(shards, one, test_data, tiny_vae)).returncode == 0
    assert load_manifest(one).fingerprint == m.fingerprint and shard_bytes(one) == shard_bytes(out)
    # 2 ranks, ZeRO-3, 2 workers each, photos + text in the batches, evaluation with samples on
    run = tmp_path / "run"
    r = torchrun(2, ["--config", str(tiny_config), f"run.dir={run}", "wandb.mode=disabled", "train.log_interval=1",
                     "train.max_steps=6", "train.zero_stage=3", "data.num_workers=2", f"data.datasets.0.path={out}",
                     "model.latent_channels=4", "model.patch_size=2", "train.sample_quality=''", "train.eval_interval=3",
                     "train.eval_batches=1", f"data.eval_datasets=[{{path: {test_data['text']}}}]"], timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    logged = metrics(run)
    assert all(math.isfinite(logged[s]["diffusion_loss"]) for s in range(1, 7) if "diffusion_loss" in logged[s])
    assert sum("diffusion_loss" in logged[s] and "lm_loss" in logged[s] for s in range(1, 7)) >= 3
    assert (run / "samples" / "step_00000006.png").is_file() and "eval/lm_loss" in logged[3]


def test_the_same_shards_over_http_give_the_manifest_of_the_folder(laion, test_data, tmp_path):
    """A plain file server's folder listing, a brace-expanded URL list through the fault server (its
    first answer to every shard request is a dropped connection, retried), and a pipe: command."""
    shards, _ = laion
    local = tmp_path / "local"
    assert write(extract_args(shards, local, test_data)).returncode == 0
    fingerprint = load_manifest(local).fingerprint
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=shards,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port)
        r = write(extract_args(f"http://127.0.0.1:{port}/", tmp_path / "listed", test_data))
        assert r.returncode == 0, r.stderr[-3000:]
    finally:
        server.kill()
    assert load_manifest(tmp_path / "listed").fingerprint == fingerprint
    last = len(list(shards.glob("*.tar"))) - 1
    with FaultServer(shards, {"*.tar": {"drop": True, "times": 1}}) as fault:
        r = write(extract_args(fault.url(f"{{00000..{last:05d}}}.tar"), tmp_path / "braces", test_data))
        assert r.returncode == 0, r.stderr[-3000:]
        assert sum(q["fault"] == "drop" for q in fault.requests()) == last + 1
    assert load_manifest(tmp_path / "braces").fingerprint == fingerprint
    r = write(extract_args(f"pipe:cat {shards}/{{00000..{last:05d}}}.tar", tmp_path / "pipe", test_data))
    assert r.returncode == 0 and load_manifest(tmp_path / "pipe").fingerprint == fingerprint, r.stderr[-2000:]


@pytest.mark.slow
def test_a_killed_task_reruns_to_byte_identical_output_without_rewriting_finished_shards(
        laion, test_data, tiny_vae, tmp_path):
    """Task 1 of 2 owns input shards 1 and 3; the server stalls shard 3's first request, the task is
    SIGKILLed (workers and all) once shard 1 is recorded, and the same command is run again; then an
    uninterrupted extraction from the same URLs, to compare."""
    shards, _ = laion
    with FaultServer(shards, {"00003.tar": {"stall": None, "times": 1}}) as fault:
        last = len(list(shards.glob("*.tar"))) - 1
        source = fault.url(f"{{00000..{last:05d}}}.tar")
        killed = tmp_path / "killed"
        args = extract_args(source, killed, test_data, tiny_vae, "--tasks", 2, "--task", 1)
        proc = subprocess.Popen([sys.executable, "-m", "data_pipelines.write_shards", "--no-progress", *map(str, args)],
                                cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        part = killed / "parts" / "part-00001-of-00002.json"
        deadline = time.monotonic() + 120
        while not (part.is_file() and "1" in json.loads(part.read_text())["done"] and fault.requests("00003.tar")):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # shard 1 recorded, shard 3 stalled in its download
        proc.wait()
        assert not (killed / "shard-000003.tar").exists() and (killed / "shard-000001.tar").exists()
        before = (killed / "shard-000001.tar").stat().st_mtime_ns
        time.sleep(0.05)
        r = write(args)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "1 finished shards kept" in r.stdout
        assert write(extract_args(source, killed, test_data, tiny_vae, "--tasks", 2, "--task", 0)).returncode == 0
        whole = tmp_path / "whole"
        for task in (0, 1):
            assert write(extract_args(source, whole, test_data, tiny_vae, "--tasks", 2, "--task", task)).returncode == 0
        assert [q["fault"] for q in fault.requests("00003.tar")].count("stall") == 1
    assert (killed / "shard-000001.tar").stat().st_mtime_ns == before
    assert shard_bytes(killed) == shard_bytes(whole) and len(shard_bytes(whole)) == last + 1
    assert (killed / "manifest.json").read_bytes() == (whole / "manifest.json").read_bytes()


def test_max_pixels_keeps_aspect_ratios_and_documents_of_several_shapes_share_a_batch(laion, test_data, tmp_path):
    from data_pipelines.loader import PackedLoader
    from tests.data_fixtures import data_config, model_config
    shards, _ = laion
    out = tmp_path / "latents"
    assert write(extract_args(shards, out, test_data)).returncode == 0
    m = load_manifest(out)
    shapes = {tuple(map(int, s.split("x"))) for s in m.shape_counts["image"]}
    expected = {(3, *ResolutionPolicy(max_pixels=576, multiple=2).target_size(w, h)[::-1]) for w, h in SIZES}
    assert shapes == expected and len(shapes) == 5
    assert all(h * w <= 576 for _, h, w in shapes)
    for _, segments in iter_shard_documents(out):
        c, h, w = segments[1]["latent"].shape
        assert (c, h, w) in shapes
    # One reader and a batch larger than the set: every document lands in the first batch, whichever
    # shards img2dataset's parallel download put each photo in.
    loader = PackedLoader(data_config(out, num_workers=0), model_config(latent_channels=3), 64)
    batch = next(iter(loader))
    rows, cols = np.nonzero((batch.modality != 0).numpy())
    per_doc = Counter(zip(rows.tolist(), batch.doc.numpy()[rows, cols].tolist()))
    assert len(per_doc) == m.num_samples  # latent tokens per document: other shapes have other counts
    assert len(set(per_doc.values())) == len({h * w for _, h, w in shapes}) > 1


def test_no_document_is_written_that_the_loader_would_skip(laion, test_data, tmp_path):
    """--seq-len 156: the larger photos make documents of more tokens, skipped at write time; the
    loader, at data.seq_len=156, then skips none and packs every document written."""
    from data_pipelines.loader import PackedLoader
    from tests.data_fixtures import data_config, model_config
    shards, _ = laion
    out = tmp_path / "short"
    r = write(extract_args(shards, out, test_data, None, "--seq-len", 156, "--max-bad-fraction", 1))
    assert r.returncode == 0, r.stderr[-3000:]
    m = load_manifest(out)
    assert m.skipped["too_long"] > 0 and m.num_samples > 0 and "makes" in r.stderr
    loader = PackedLoader(data_config(out, seq_len=156, num_workers=0), model_config(latent_channels=3), 2,
                          rank=0, world_size=1)
    documents = sum(len(set(row[row >= 0].tolist())) for batch in loader for row in batch.doc)  # ids per row
    assert loader.counters()["oversize"] == 0 and documents >= m.num_samples


def test_tasks_without_units_and_a_rerun_with_another_number_of_tasks(laion, test_data, tmp_path):
    """5 input shards: task 7 of 8 owns none, ends at once and waits for the others; task 0 of 2 then
    writes shards 0, 2, 4, and a rerun as one task keeps them, writes 1 and 3, and merges every part."""
    shards, _ = laion
    out = tmp_path / "o"
    r = write(extract_args(shards, out, test_data, None, "--tasks", 8, "--task", 7))
    assert r.returncode == 0 and "other tasks are unfinished" in r.stdout, r.stderr[-2000:]
    assert write(extract_args(shards, out, test_data, None, "--tasks", 2, "--task", 0)).returncode == 0
    r = write(extract_args(shards, out, test_data))
    assert r.returncode == 0 and "3 finished shards kept, 2 written now" in r.stdout, r.stdout + r.stderr[-2000:]
    alone = tmp_path / "alone"
    assert write(extract_args(shards, alone, test_data)).returncode == 0
    assert (out / "manifest.json").read_bytes() == (alone / "manifest.json").read_bytes()
    assert len(list((out / "parts").glob("*.json"))) == 3 and not list(out.glob("*.tmp"))


def test_acdit_blocks_tile_every_image_and_the_loader_takes_them(laion, test_data, tmp_path):
    from data_pipelines.loader import DataError, PackedLoader
    from tests.data_fixtures import data_config, model_config
    shards, _ = laion
    out = tmp_path / "acdit"
    r = write(extract_args(shards, out, test_data, None, "--layout", "acdit", "--block-size", 4, "--seq-len", 512))
    assert r.returncode == 0, r.stderr[-2000:]
    shapes = [tuple(map(int, k.split("x"))) for k in load_manifest(out).shape_counts["image"]]
    assert len(shapes) > 2 and all(h % 4 == 0 and w % 4 == 0 for _, h, w in shapes)  # 2x2 blocks of 2x2 patches
    acdit = model_config(latent_channels=3, mode="acdit", block_size=4)
    loader = PackedLoader(data_config(out, seq_len=512, num_workers=0), acdit, 2, rank=0, world_size=1)
    assert sum(1 for _ in loader) > 0 and loader.counters()["oversize"] == 0
    with pytest.raises(DataError, match="sized for patch_size 2, model.patch_size is 4"):
        PackedLoader(data_config(out, num_workers=0), model_config(latent_channels=3, patch_size=4), 2)


def test_a_finished_shard_that_changed_on_disk_is_written_again(laion, test_data, tmp_path):
    shards, _ = laion
    out = tmp_path / "o"
    assert write(extract_args(shards, out, test_data)).returncode == 0
    before = shard_bytes(out)
    kept = (out / "shard-000000.tar").stat().st_mtime_ns
    with open(out / "shard-000003.tar", "r+b") as f:  # one flipped byte
        f.seek(700)
        byte = f.read(1)
        f.seek(700)
        f.write(bytes([byte[0] ^ 1]))
    r = write(extract_args(shards, out, test_data))
    assert r.returncode == 0 and "4 finished shards kept, 1 written now" in r.stdout, r.stdout + r.stderr[-2000:]
    assert shard_bytes(out) == before and (out / "shard-000000.tar").stat().st_mtime_ns == kept


def test_a_parquet_table_of_image_bytes_gives_the_latents_of_the_same_images(laion, test_data, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from data_pipelines.tar_index import TarShard
    shards, _ = laion
    images, captions = [], []
    for tar in sorted(shards.glob("*.tar")):
        with open(tar, "rb") as f:
            shard = TarShard(f, str(tar))
            for i in range(len(shard)):
                _, files = shard.sample(i)
                images.append(files["jpg"])
                captions.append(files["txt"].decode())
    images += [None, images[0]]
    captions += ["no image here", ""]
    table = pa.table({"image": pa.array(images, pa.binary()), "text": captions})
    pq.write_table(table, tmp_path / "photos.parquet", row_group_size=10)
    r = write(["--source", "parquet", "--input", tmp_path / "photos.parquet", "--image-column", "image",
               "--caption-column", "text", "--tokenizer", test_data["tokenizer"], "--out", tmp_path / "pq",
               "--encoder", "pixels", *SIZING])
    assert r.returncode == 0, r.stderr[-3000:]
    m = load_manifest(tmp_path / "pq")
    assert len(list_units("parquet", [str(tmp_path / "photos.parquet")])) == 4  # row groups
    assert m.num_samples == IMAGES and m.skipped == {"no_caption": 1, "no_image": 1, "too_small": 2}
    assert write(extract_args(shards, tmp_path / "wds", test_data)).returncode == 0
    def latents(out):
        return sorted((segs[0]["tokens"], segs[1]["latent"].tobytes()) for _, segs in iter_shard_documents(out))
    assert latents(tmp_path / "pq") == latents(tmp_path / "wds")


# ---------------------------------------------------------------- bad input

def _damaged_copy(shards: Path, to: Path) -> Path:
    """img2dataset's shards, with: an undecodable image and a sample without caption added to shard 0,
    shard 2 cut in its middle, between two members (a truncated tar)."""
    import io
    import tarfile
    shutil.copytree(shards, to)
    with tarfile.open(to / "00000.tar", "a") as tar:
        for name, data in (("bad0001.jpg", b"\xff\xd8\xff garbage"), ("bad0001.txt", b"broken"),
                           ("nocap01.jpg", _any_jpg(shards))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(to / "00002.tar") as tar:  # cut between two members: only the missing end marker tells
        boundary = [m.offset for m in tar.getmembers()][len(tar.getmembers()) // 2]
    raw = (to / "00002.tar").read_bytes()
    (to / "00002.tar").write_bytes(raw[:boundary])
    return to


def _any_jpg(shards: Path) -> bytes:
    from data_pipelines.tar_index import TarShard
    with open(shards / "00001.tar", "rb") as f:
        return TarShard(f, "x").sample(0)[1]["jpg"]


def test_bad_samples_are_skipped_counted_and_logged_and_a_flood_is_one_line_error(laion, test_data, tmp_path):
    shards, _ = laion
    bad = _damaged_copy(shards, tmp_path / "bad")
    r = write(extract_args(bad, tmp_path / "out", test_data))
    assert r.returncode == 0, r.stderr[-3000:]
    m = load_manifest(tmp_path / "out")
    assert m.skipped == {"no_caption": 1, "too_small": 2, "truncated_tar": 1, "undecodable": 1}
    assert f"{bad / '00000.tar'}:bad0001: undecodable" in r.stderr
    assert f"{bad / '00000.tar'}: no_caption: nocap01" in r.stderr and "truncated" in r.stderr
    # the default --max-bad-fraction: one line, and the shards finished before it stay recorded
    r = write(extract_args(bad, tmp_path / "strict", test_data, None, "--workers", "0", "--max-bad-fraction", "0.01"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "--max-bad-fraction 0.01" in r.stderr
    part = json.loads((tmp_path / "strict" / "parts" / "part-00000-of-00001.json").read_text())
    assert len(part["done"]) == 5 and (tmp_path / "strict" / "shard-000000.tar").is_file()  # judged at the end


def test_a_missing_input_shard_is_one_line_naming_it(laion, test_data, tmp_path):
    shards, _ = laion
    with FaultServer(shards, {"00001.tar": {"status": 404}}) as fault:
        r = write(extract_args(fault.url("{00000..00002}.tar"), tmp_path / "o", test_data))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {fault.url('00001.tar')}: HTTP 404")
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--image-size", "31"], "--image-size 31: must be a positive multiple of 2"),
    (["--image-size", "32", "--max-pixels", "100"], "--image-size or --max-pixels, not both"),
    (["--tasks", "2", "--task", "2"], "--task 2 --tasks 2"),
    (["--samples-per-shard", "10"], "one output shard per input unit"),
])
def test_bad_flags_are_one_line_errors(laion, test_data, tmp_path, args, message):
    shards, _ = laion
    r = write(["--source", "webdataset", "--input", shards, "--tokenizer", test_data["tokenizer"], "--out",
               tmp_path / "o", "--encoder", "pixels", *args])
    assert r.returncode == 2 and message in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]


def test_a_rerun_with_other_settings_is_refused(laion, test_data, tmp_path):
    shards, _ = laion
    args = extract_args(shards, tmp_path / "o", test_data, None, "--tasks", 2, "--task", 0)
    r = write(args)
    assert r.returncode == 0, r.stderr
    r = write([*args, "--max-tokens", "100"])
    assert r.returncode == 2 and "its recipe differs" in r.stderr


# ---------------------------------------------------------------- the parts

def test_resolution_policy_sizes():
    fit = ResolutionPolicy(max_pixels=256 * 256, multiple=16)
    assert fit.target_size(1024, 768) == (288, 208)  # 4:3 kept to within a multiple of 16
    assert fit.target_size(768, 1024) == (208, 288)
    assert fit.target_size(1920, 1080) == (336, 192)
    assert fit.target_size(200, 100) == (192, 96)  # never scaled up
    w, h = fit.target_size(10000, 10)  # a thin strip: still within the budget
    assert h == 16 and w * h <= 256 * 256
    assert ResolutionPolicy(image_size=64, multiple=16).target_size(300, 100) == (64, 64)


def test_resolution_policy_on_image_bytes():
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.full((90, 160, 3), 200, np.uint8)).save(buf, format="JPEG")
    data = buf.getvalue()
    assert ResolutionPolicy(image_size=32, multiple=4).apply(data).shape == (32, 32, 3)
    assert ResolutionPolicy(max_pixels=1024, multiple=4).apply(data).shape == (24, 40, 3)
    assert ResolutionPolicy(max_pixels=10 ** 6, multiple=4).apply(data).shape == (88, 160, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned: a viewer shows it 90 x 160
    buf = io.BytesIO()
    Image.fromarray(np.full((90, 160, 3), 200, np.uint8)).save(buf, format="JPEG", exif=exif.tobytes())
    assert ResolutionPolicy(max_pixels=10 ** 6, multiple=4).apply(buf.getvalue()).shape == (160, 88, 3)
    with pytest.raises(Skip) as e:
        ResolutionPolicy(min_size=100).apply(data)
    assert e.value.reason == "too_small"
    with pytest.raises(Skip) as e:
        ResolutionPolicy().apply(data[:40])
    assert e.value.reason == "undecodable"


@pytest.mark.parametrize("environ, tasks, expected", [
    ({}, None, (0, 1)),
    ({"SLURM_ARRAY_TASK_ID": "42", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "17"}, 64, (42, 64)),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "8"}, None, (1, 8)),
    ({"RANK": "5", "WORLD_SIZE": "6"}, None, (5, 6)),
])
def test_the_task_comes_from_the_launcher(environ, tasks, expected):
    """A job array resubmitted for indices 17 and 42 of 64 keeps the split of the whole extraction."""
    assert task_split(tasks, environ=environ) == expected
    assert task_split(3, 1, environ=environ) == (1, 3)


def test_a_job_array_without_tasks_is_refused():
    with pytest.raises(ValueError, match="give --tasks N"):
        task_split(environ={"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"})


def test_input_units_from_folders_braces_and_row_groups(laion, tmp_path):
    shards, _ = laion
    tars = sorted(str(p) for p in shards.glob("*.tar"))
    assert [u.where for u in list_units("webdataset", [str(shards)])] == tars
    braces = f"{shards}/{{00001..00002}}.tar"
    assert [u.where for u in list_units("webdataset", [braces])] == tars[1:3]
    with pytest.raises(ValueError, match="name the shards"):
        list_units("webdataset", ["pipe:cat /x/{shard}"])
    records = list(read_unit(list_units("webdataset", [tars[0]])[0], ReadOptions()))
    assert all(r.caption.startswith("a photo of") for r in records) and len(records) == 7  # + 1 undecodable URL
    by_json = list(read_unit(list_units("webdataset", [tars[0]])[0], ReadOptions(caption_key="caption")))
    assert [r.caption for r in by_json] == [r.caption for r in records]


def test_a_unit_of_many_shapes_holds_back_a_bounded_number_of_images_and_writes_the_same_bytes(tmp_path):
    from data_pipelines.encoders import PixelEncoder
    from data_pipelines.ingest.extract import PENDING_BATCHES, UnitWriter
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (4 + 2 * (i % 12), 6, 3), dtype=np.uint8) for i in range(120)]  # 12 shapes
    entries = []
    for run in ("a", "b"):
        w = UnitWriter(tmp_path / run, 0, PixelEncoder(3), batch=8)
        held = 0
        for i, image in enumerate(images):
            w.add(f"k{i:03d}", "a caption", [20, 21], image)
            held = max(held, sum(map(len, w.groups.values())))
        assert held <= PENDING_BATCHES * 8
        entries.append(w.finish())
    assert entries[0]["samples"] == 120 and entries[0] == entries[1]
