"""Videos in: video2dataset-style webdataset shards of PyAV-written mp4s, decoded as a stream,
sampled to --fps, resized by the image policy and cut into clips."""
import json
import math
import subprocess
import sys

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


@pytest.mark.slow
@pytest.mark.distributed
def test_clips_through_a_wan_vae_train_with_images_and_text_on_two_ranks_and_sample_an_mp4(
        test_data, tiny_wan_vae, tiny_config, tmp_path):
    """The acceptance path: a video2dataset tar of PyAV mp4s (three sizes, 30 fps) at --fps 10
    --clip-frames 9 through a tiny AutoencoderKLWan gives 1 + 8/4 = 3 latent frames; photos through
    the same VAE are 1-frame images; 2 ranks under ZeRO-3 train on clips + photos + text, evaluation
    on; `pretrain.sample --kind video` writes an mp4 of the frames asked for, also past the 9 trained."""
    import av
    import webdataset as wds
    from data_pipelines.write_shards import write_shards
    from tests.launch import REPO, env, metrics, torchrun
    (tmp_path / "videos").mkdir()
    with wds.TarWriter(str(tmp_path / "videos" / "00000.tar")) as tar:
        for i, (seconds, w, h) in enumerate([(2, 64, 48), (3, 48, 64), (2, 64, 64)]):
            tar.write({"__key__": f"{i:09d}", "mp4": mp4(seconds, w, h), "txt": f"a white line moving right {i}".encode(),
                       "json": json.dumps({"key": f"{i:09d}", "status": "success"}).encode()})
    clips = tmp_path / "clips"
    r = write(["--source", "webdataset", "--input", tmp_path / "videos", "--tokenizer", test_data["tokenizer"],
               "--out", clips, "--encoder", "vae", "--vae", tiny_wan_vae, "--fps", 10, "--clip-frames", 9,
               "--clips-per-video", 0, "--max-pixels", 1024, "--seq-len", 100, "--batch", 18])
    assert r.returncode == 0, r.stderr[-3000:]
    m = load_manifest(clips)
    assert m.skipped == {}  # 3 latent frames fit --seq-len 100; 9 frames of the same size would not
    assert m.encoder["class"] == "AutoencoderKLWan" and m.encoder["temporal_factor"] == 4
    assert m.encoder["latent_frames"] == "1 + (T - 1) / 4" and m.num_samples == 2 + 3 + 2
    for _, segments in iter_shard_documents(clips):
        c, t, h, w = segments[1]["latent"].shape
        assert (c, t) == (4, 3) and h * w * 16 <= 1024
    photos = tmp_path / "photos"
    write_shards("photos", str(photos), str(test_data["tokenizer"]), encoder="vae", vae=str(tiny_wan_vae),
                 samples_per_shard=8, num_samples=16, crop=32, progress=False)
    assert load_manifest(photos).latent_shapes["image"] == [4, 8, 8]
    run = tmp_path / "run"
    datasets = f"[{{path: {clips}, weight: 0.4}}, {{path: {photos}, weight: 0.3}}, {{path: {test_data['text']}, weight: 0.3}}]"
    r = torchrun(2, ["--config", str(tiny_config), f"run.dir={run}", "wandb.mode=disabled", "train.log_interval=1",
                     "train.max_steps=6", "train.zero_stage=3", "data.num_workers=2", f"data.datasets={datasets}",
                     "model.latent_channels=4", "model.patch_size=2", "train.sample_quality=''", "train.sample_kind=video",
                     "train.eval_interval=3",
                     "train.eval_batches=1", f"data.eval_datasets=[{{path: {test_data['text']}}}]"], timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    logged = metrics(run)
    assert all(math.isfinite(logged[s]["loss"]) for s in range(1, 7))
    assert sum("diffusion_loss" in logged[s] and "lm_loss" in logged[s] for s in range(1, 7)) >= 3
    with av.open(str(run / "samples" / "step_00000006.gif")) as container:  # evaluation sampled clips
        assert len(list(container.decode(video=0))) == 9 and "eval/lm_loss" in logged[3]
    for frames in (9, 13):  # 13 frames: 4 latent frames, one more than any clip trained on
        out = tmp_path / f"sample{frames}.mp4"
        s = subprocess.run([sys.executable, "-m", "pretrain.sample", "--model", str(run), "--kind", "video",
                            "--prompt", "a white line moving right", "--n", "2", "--steps", "2", "--frames",
                            str(frames), "--out", str(out)], cwd=REPO, env=env(), capture_output=True, text=True)
        assert s.returncode == 0, s.stderr[-3000:]
        with av.open(str(out)) as container:
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            rate = container.streams.video[0].average_rate
        assert len(decoded) == frames and rate == 10  # at the fps the clips were cut at
    s = subprocess.run([sys.executable, "-m", "pretrain.sample", "--model", str(run), "--kind", "video",
                        "--frames", "10", "--out", str(tmp_path / "x.mp4")], cwd=REPO, env=env(),
                       capture_output=True, text=True)
    assert s.returncode == 2 and s.stderr.strip().splitlines()[-1] == (
        "error: --frames: 10 frames: an encoder of temporal factor 4 takes 1 + 4k frames (9 or 13)")


def test_a_jsonl_video_is_streamed_sampled_to_the_fps_and_cut_to_its_middle_clip(test_data, tmp_path):
    """The user's jsonl documents: a 3 s 30 fps mp4 at --fps 10 --clip-frames 9 is the middle clip
    of 9 frames (every third frame); without the flags it is every frame, as written."""
    from data_pipelines.write_shards import write_shards
    (tmp_path / "bar.mp4").write_bytes(mp4(3, 48, 16))
    (tmp_path / "docs.jsonl").write_text(json.dumps({"segments": [{"text": "a bar"}, {"video": "bar.mp4"}]}))
    common = dict(input=[str(tmp_path / "docs.jsonl")], progress=False, samples_per_shard=4)
    write_shards("jsonl", str(tmp_path / "clip"), str(test_data["tokenizer"]), fps=10, clip_frames=9, **common)
    (_, segments), = iter_shard_documents(tmp_path / "clip")
    frames = (segments[1]["latent"].astype(np.float32).transpose(1, 2, 3, 0) + 1) / 2  # pixels: T,H,W,3
    start = 3 * ((30 - 9) // 2)  # the middle clip of the 30 sampled frames
    assert frames.shape == (9, 16, 48, 3) and [column(f) for f in frames] == [x % 48 for x in range(start, start + 27, 3)]
    write_shards("jsonl", str(tmp_path / "all"), str(test_data["tokenizer"]), **common)
    (_, segments), = iter_shard_documents(tmp_path / "all")
    assert segments[1]["latent"].shape == (3, 90, 16, 48)
    r = write(["--source", "jsonl", "--input", tmp_path / "docs.jsonl", "--tokenizer", test_data["tokenizer"],
               "--out", tmp_path / "x", "--clip-frames", 9, "--fps", 2])  # 6 frames at 2 fps: no clip of 9
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        f"error: too_short: {tmp_path / 'bar.mp4'}: 6 frames at 2 fps, fewer than --clip-frames 9")


def test_acdit_frame_blocks_are_latent_frames(test_data, tiny_wan_vae, tmp_path):
    """9 frames through a Wan VAE are 3 latent frames; ACDiT with one latent frame a block lays a clip
    out as 3 blocks (noised units), at time positions 0, 1, 2 after the caption."""
    import webdataset as wds
    from data_pipelines.loader import PackedLoader
    from tests.data_fixtures import data_config, model_config
    (tmp_path / "v").mkdir()
    with wds.TarWriter(str(tmp_path / "v" / "00000.tar")) as tar:
        tar.write({"__key__": "000000000", "mp4": mp4(1, 64, 64), "txt": b"a white line moving right"})
    r = write(["--source", "webdataset", "--input", tmp_path / "v", "--tokenizer", test_data["tokenizer"],
               "--out", tmp_path / "clips", "--encoder", "vae", "--vae", tiny_wan_vae, "--fps", 10, "--clip-frames", 9,
               "--max-pixels", 1024, "--layout", "acdit", "--block-size", 16, "--seq-len", 256])
    assert r.returncode == 0, r.stderr[-3000:]
    (_, segments), = iter_shard_documents(tmp_path / "clips")
    assert segments[1]["latent"].shape == (4, 3, 8, 8)  # 4x4 tokens a latent frame at patch 2
    cfg = model_config(latent_channels=4, mode="acdit", block_size=16)
    batch = next(iter(PackedLoader(data_config(tmp_path / "clips", num_workers=0), cfg, 1)))
    noised = batch.noisy[0]
    assert batch.unit[0][noised].unique().numel() == 3
    t = batch.pos[0][noised][:, 0]
    assert (t - t.min()).unique().tolist() == [0, 1, 2] and ((t - t.min()).bincount() == 16).all()


def test_images_through_a_video_vae_need_no_clip_flag_and_the_default_clip_fits_the_vae(
        test_data, tiny_wan_vae, tmp_path):
    """Without --clip-frames a clip is 16 frames, or the fewest above that the VAE takes (Wan: 17);
    an image-only folder through a Wan VAE is written without any video flag."""
    from PIL import Image
    (tmp_path / "media").mkdir()
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(tmp_path / "media" / f"{i}.png")
        (tmp_path / "media" / f"{i}.txt").write_text(f"a grey square {i}")
    r = write(["--source", "files", "--input", tmp_path / "media", "--tokenizer", test_data["tokenizer"],
               "--out", tmp_path / "o", "--encoder", "vae", "--vae", tiny_wan_vae, "--image-size", 32])
    assert r.returncode == 0, r.stderr[-3000:]
    m = load_manifest(tmp_path / "o")
    assert m.num_samples == 2 and m.latent_shapes["image"] == [4, 8, 8] and m.video["clip_frames"] == 17
    bad = write(["--source", "files", "--input", tmp_path / "media", "--tokenizer", test_data["tokenizer"],
                 "--out", tmp_path / "x", "--clip-frames", 0])
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == "error: --clip-frames 0: must be at least 1"
