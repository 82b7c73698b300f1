"""Latent extraction: images/s of `write_shards --encoder vae` against a bare `vae.encode` loop, and
the extraction's peak memory by input size.

    python bench/extract_throughput.py [--images 96] [--batch 16] [--workers 2] [--size 256]
                                       [--memory 1000 10000]
    python bench/extract_throughput.py --video    # a minute of 720p cut into clips: time and memory

Throughput: a randomly initialised AutoencoderKL with Stable Diffusion's layout (4 blocks of
128/256/512/512 channels, 2 layers each, 4 latent channels) saved to a local folder; `--images`
JPEG photos (crops of scikit-image's pictures, 320x240 and other sizes) in img2dataset's layout
(KEY.jpg, KEY.txt, KEY.json), 32 a shard. The bare loop encodes the same images, decoded, resized
and stacked beforehand (not timed), at the same batch size, in one process. The extraction is the
whole command as a user runs it (DataLoader workers decode and resize to `--size`, the main process
encodes), timed from its start to its manifest, the VAE's loading included.

Memory: the same command with the pixels encoder over `--memory` counts of 64x64 images (500 a
shard); peak resident memory summed over the command's processes (main and workers), sampled
every 50 ms.
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def sd_layout_vae(path: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=2, norm_num_groups=32, sample_size=256, scaling_factor=0.18215).save_pretrained(path)
    return path


def write_img2dataset_shards(out: Path, count: int, per_shard: int, size: tuple[int, int]) -> None:
    """`count` JPEG photos as img2dataset lays out its webdataset shards."""
    import skimage.data
    import webdataset as wds
    from PIL import Image
    pictures = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    for s in range(0, count, per_shard):
        with wds.TarWriter(str(out / f"{s // per_shard:05d}.tar")) as tar:
            for i in range(s, min(count, s + per_shard)):
                pic = pictures[i % len(pictures)]
                y, x = rng.integers(0, 60, 2)
                buf = io.BytesIO()
                Image.fromarray(pic[y:, x:]).resize(size).save(buf, format="JPEG", quality=90)
                tar.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "txt": f"a photo number {i}".encode(),
                           "json": json.dumps({"key": f"{i:09d}", "width": size[0], "height": size[1]}).encode()})


def minute_of_720p(out: Path) -> None:
    """A webdataset shard holding 60 s of 1280x720 at 30 fps (PyAV, H.264): a bar moving right."""
    import webdataset as wds
    from data_pipelines.sources import moving_bar_mp4
    out.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(out / "00000.tar")) as tar:
        tar.write({"__key__": "000000000", "mp4": moving_bar_mp4(60, 1280, 720, bar=64, step=8, fast=True),
                   "txt": b"a white bar moving right"})


def tokenizer(path: Path) -> Path:
    from data_pipelines.tokenizer import train_tokenizer
    words = [f"a photo number {i} of something" for i in range(2000)]
    train_tokenizer(words, path, vocab_size=300)
    return path


def bare_loop(vae_dir: Path, shards: Path, size: int, batch: int) -> tuple[float, int]:
    """(images/s, images) of vae.encode over pre-decoded tensors."""
    import torch
    from diffusers import AutoencoderKL
    from data_pipelines.ingest.inputs import ReadOptions, list_units, read_unit
    from data_pipelines.ingest.resolution import ResolutionPolicy
    from data_pipelines.ingest.tasks import task_device
    policy = ResolutionPolicy(image_size=size, multiple=8)
    images = [policy.apply(r.media) for u in list_units("webdataset", [str(shards)])
              for r in read_unit(u, ReadOptions())]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    device = task_device() or "cpu"  # where write_shards encodes
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).to(device).eval()
    x = x.to(device)
    with torch.no_grad():
        vae.encode(x[:2]).latent_dist.mode()  # warm-up
        start = time.perf_counter()
        for i in range(0, len(x), batch):
            vae.encode(x[i:i + batch]).latent_dist.mode().cpu()  # (the copy back, as write_shards does)
        return len(x) / (time.perf_counter() - start), len(x)


class TreePeak:
    """Peak of the summed resident memory of a process and its descendants."""

    def __init__(self, pid: int):
        import psutil
        self.root, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        import psutil
        while not self._stop.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)

    def stop(self) -> float:
        self._stop.set()
        self.thread.join()
        return self.peak / 2 ** 20


def extraction(args: list, shards: Path, out: Path, tok: Path) -> tuple[float, float]:
    """(seconds, peak MB over its processes) of one write_shards command."""
    cmd = [sys.executable, "-m", "data_pipelines.write_shards", "--source", "webdataset", "--input", str(shards),
           "--tokenizer", str(tok), "--out", str(out), "--no-progress", *map(str, args)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = TreePeak(proc.pid)
    stdout, stderr = proc.communicate()
    seconds, mb = time.perf_counter() - start, peak.stop()
    if proc.returncode:
        raise SystemExit(f"write_shards failed: {stderr.strip().splitlines()[-1]}")
    return seconds, mb


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--memory", type=int, nargs="*", default=[1000, 10000])
    p.add_argument("--video", action="store_true", help="only: a minute of 720p cut into clips, time and memory")
    a = p.parse_args()
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = tokenizer(tmp / "tok.model")
        if a.video:
            minute_of_720p(tmp / "minute")
            print(f"## Video extraction: 60 s of 1280x720 at 30 fps -> clips of 16 frames at 10 fps, at most "
                  f"65,536 pixels (pixels encoder, {a.workers} workers)\n")
            print("| what | seconds | peak resident MB (all processes) |\n|---|---:|---:|")
            for batch in (32, 8):
                seconds, mb = extraction(["--encoder", "pixels", "--fps", 10, "--clip-frames", 16,
                                          "--clips-per-video", 0, "--max-pixels", 65536, "--seq-len", 10 ** 6,
                                          "--batch", batch,
                                          "--workers", a.workers], tmp / "minute", tmp / f"clips-{batch}", tok)
                print(f"| 37 clips, `--batch {batch}` (frames) | {seconds:.1f} | {mb:.0f} |")
            return
        vae = sd_layout_vae(tmp / "sd-vae")
        write_img2dataset_shards(tmp / "photos", a.images, 32, (320, 240))
        bare, n = bare_loop(vae, tmp / "photos", a.size, a.batch)
        seconds, mb = extraction(["--encoder", "vae", "--vae", vae, "--image-size", a.size, "--patch-size", 2,
                                  "--seq-len", 4096, "--batch", a.batch, "--workers", a.workers],
                                 tmp / "photos", tmp / "latents", tok)
        print(f"## Extraction throughput ({torch.get_num_threads()} torch threads, SD-layout VAE, {a.size}x{a.size}, "
              f"batch {a.batch}, {n} images)\n")
        print("| what | images/s | ratio to the bare loop |\n|---|---:|---:|")
        print(f"| bare `vae.encode` loop over pre-decoded tensors | {bare:.2f} | 1.00 |")
        print(f"| `write_shards --encoder vae --workers {a.workers}` (whole command) | {n / seconds:.2f} | "
              f"{n / seconds / bare:.2f} |")
        if a.memory:
            print(f"\n## Extraction peak memory (pixels encoder, 64x64, main + {a.workers} workers)\n")
            print("| images | seconds | peak resident MB (all processes) |\n|---:|---:|---:|")
            for count in a.memory:
                shards = tmp / f"small-{count}"
                write_img2dataset_shards(shards, count, 500, (64, 64))
                seconds, mb = extraction(["--encoder", "pixels", "--image-size", 64, "--seq-len", 4096,
                                          "--workers", a.workers],
                                         shards, tmp / f"small-latents-{count}", tok)
                print(f"| {count} | {seconds:.1f} | {mb:.0f} |")


if __name__ == "__main__":
    main()
