"""Videos in: video2dataset-style webdataset shards of PyAV-written mp4s, decoded as a stream,
sampled to --fps, resized by the image policy and cut into clips."""
import json

import numpy as np
import pytest

from data_pipelines.ingest.resolution import ResolutionPolicy, Skip
from data_pipelines.ingest.video import ClipPolicy, iter_clips
from data_pipelines.shards import iter_shard_documents, load_manifest
from data_pipelines.sources import moving_bar_mp4
from tests.test_ingest import write


def mp4(seconds: float, width: int, height: int, fps: int = 30) -> bytes:
    """A PyAV-written H.264 mp4 whose frame i has a white column at x = i (mod width)."""
    return moving_bar_mp4(seconds, width, height, fps)


def column(frame: np.ndarray) -> int:
    return int(frame.mean(axis=(0, 2)).argmax())


def test_frames_are_sampled_at_the_asked_rate_and_cut_into_clips():
    video = mp4(3, 96, 32)  # 90 frames at 30 fps
    keep = ResolutionPolicy(multiple=2)
    every = list(iter_clips(video, ClipPolicy(fps=10, clip_frames=9, clips_per_video=0), keep))
    assert len(every) == 3 and every[0].shape == (9, 32, 96, 3)  # 30 frames at 10 fps: 3 clips of 9
    assert [column(f) for f in every[0]] == list(range(0, 27, 3))  # every third frame
    assert [column(f) for f in every[1]] == list(range(27, 54, 3))
    one = list(iter_clips(video, ClipPolicy(fps=10, clip_frames=9, clips_per_video=1), keep))
    assert len(one) == 1 and column(one[0][0]) == 3 * ((30 - 9) // 2)  # the middle clip
    two = list(iter_clips(video, ClipPolicy(fps=10, clip_frames=9, clips_per_video=2), keep))
    assert [column(c[0]) for c in two] == [0, 63]  # the first and the last
    small = list(iter_clips(video, ClipPolicy(fps=10, clip_frames=9), ResolutionPolicy(max_pixels=768, multiple=4)))
    assert small[0].shape == (9, 16, 48, 3)


@pytest.mark.parametrize("data, reason", [(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200, "undecodable"),
                                          (mp4(0.5, 32, 32), "too_short")])
def test_a_bad_video_is_a_skip_with_its_reason(data, reason):
    with pytest.raises(Skip) as e:
        list(iter_clips(data, ClipPolicy(fps=10, clip_frames=9), ResolutionPolicy(multiple=2)))
    assert e.value.reason == reason


def test_video2dataset_shards_become_clip_latents_with_counted_skips(test_data, tmp_path):
    import webdataset as wds
    (tmp_path / "videos").mkdir()
    with wds.TarWriter(str(tmp_path / "videos" / "00000.tar")) as tar:
        for i, (seconds, w, h) in enumerate([(2, 64, 48), (3, 96, 54), (2.5, 48, 64)]):
            tar.write({"__key__": f"{i:09d}", "mp4": mp4(seconds, w, h), "txt": f"a moving line {i}".encode(),
                       "json": json.dumps({"key": f"{i:09d}", "duration": seconds}).encode()})
        tar.write({"__key__": "000000003", "mp4": b"not a video", "txt": b"broken"})
        tar.write({"__key__": "000000004", "mp4": mp4(0.4, 32, 32), "txt": b"too short"})
    r = write(["--source", "webdataset", "--input", tmp_path / "videos", "--tokenizer", test_data["tokenizer"],
               "--out", tmp_path / "clips", "--encoder", "pixels", "--fps", 10, "--clip-frames", 9,
               "--clips-per-video", 0, "--max-pixels", 1024, "--seq-len", 4096, "--max-bad-fraction", 0.5])
    assert r.returncode == 0, r.stderr[-3000:]
    m = load_manifest(tmp_path / "clips")
    assert m.skipped == {"too_short": 1, "undecodable": 1}
    assert m.num_samples == 2 + 3 + 2  # 20, 30 and 25 sampled frames: clips of 9
    assert m.video["fps"] == 10 and m.video["clip_frames"] == 9
    shapes = {tuple(map(int, s.split("x"))) for s in m.shape_counts["video"]}
    fit = ResolutionPolicy(max_pixels=1024, multiple=2)
    assert shapes == {(3, 9, *fit.target_size(w, h)[::-1]) for w, h in [(64, 48), (96, 54), (48, 64)]}
    docs = dict(iter_shard_documents(tmp_path / "clips"))
    assert sorted(docs) == ["000000000_000", "000000000_001", "000000001_000", "000000001_001", "000000001_002",
                            "000000002_000", "000000002_001"]
    assert all(d[1]["kind"] == "video" and d[1]["latent"].shape[1] == 9 for d in docs.values())


@pytest.mark.slow
def test_a_minute_of_720p_becomes_clips_in_under_2_gb(test_data, tmp_path):
    """60 s of 1280x720 at 30 fps (PyAV, H.264) in a webdataset shard, every clip of 16 frames at
    10 fps: the write_shards process (and its workers) peak under 2 GB resident."""
    import os
    import subprocess
    import sys

    import webdataset as wds
    from tests.launch import REPO, env
    (tmp_path / "in").mkdir()
    with wds.TarWriter(str(tmp_path / "in" / "00000.tar")) as tar:
        tar.write({"__key__": "000000000", "mp4": moving_bar_mp4(60, 1280, 720, bar=64, step=8, fast=True),
                   "txt": b"a white bar moving right"})
    cmd = [sys.executable, "-m", "data_pipelines.write_shards", "--no-progress", "--source", "webdataset", "--input",
           str(tmp_path / "in"), "--tokenizer", str(test_data["tokenizer"]), "--out", str(tmp_path / "out"),
           "--encoder", "pixels", "--fps", "10", "--clip-frames", "16", "--clips-per-video", "0",
           "--max-pixels", "65536", "--seq-len", "1000000"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, _, usage = os.wait4(proc.pid, 0)  # the peak of this child and of its workers
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    assert "37 samples written" in out, err[-2000:]
    assert load_manifest(tmp_path / "out").num_samples == 37  # 600 frames at 10 fps: 37 clips of 16
    assert usage.ru_maxrss < 2 * 1024 ** 2, f"peak {usage.ru_maxrss / 1024:.0f} MB"


def test_the_encoder_batch_counts_frames_so_clips_are_encoded_a_few_at_a_time(tmp_path):
    from data_pipelines.encoders import PixelEncoder
    from data_pipelines.ingest.extract import UnitWriter
    w = UnitWriter(tmp_path, 0, PixelEncoder(3), batch=32)
    clip = np.zeros((16, 8, 8, 3), np.uint8)
    w.add("a", "x", [20], clip)
    assert sum(map(len, w.groups.values())) == 1
    w.add("b", "x", [20], clip)  # 32 frames: one batch
    assert not w.groups and w.shard.samples == 2
    assert w.finish()["samples"] == 2


def test_a_folder_of_image_and_video_files_with_caption_files(test_data, tmp_path):
    from PIL import Image
    media = tmp_path / "media"
    (media / "b").mkdir(parents=True)
    for i, where in enumerate([media / "a.png", media / "b" / "a.png", media / "c.jpg"]):
        Image.fromarray(np.full((40, 60, 3), 40 * i, np.uint8)).save(where)
        if i < 2:
            where.with_suffix(".txt").write_text(f"a grey picture {i}")
    (media / "b" / "clip.mp4").write_bytes(mp4(2, 64, 48))
    (media / "b" / "clip.json").write_text(json.dumps({"caption": "a line moving right"}))
    (media / "b" / "clip.txt").write_text("a line moving right")
    r = write(["--source", "files", "--input", media, "--tokenizer", test_data["tokenizer"], "--out", tmp_path / "o",
               "--encoder", "pixels", "--fps", 10, "--clip-frames", 9, "--clips-per-video", 0, "--max-pixels", 1024,
               "--seq-len", 4096, "--max-bad-fraction", 0.5])
    assert r.returncode == 0, r.stderr[-3000:]
    m = load_manifest(tmp_path / "o")
    assert m.skipped == {"no_caption": 1} and f"{media / 'c.jpg'}: no_caption" in r.stderr
    docs = dict(iter_shard_documents(tmp_path / "o"))
    assert sorted(docs) == ["a", "b_a", "b_clip_000", "b_clip_001"]
    assert docs["b_clip_000"][1]["kind"] == "video" and docs["a"][1]["kind"] == "image"
