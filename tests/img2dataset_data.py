"""Image-caption data as users bring it: photos of several sizes and aspect ratios (crops of
scikit-image's bundled pictures), served on 127.0.0.1 and downloaded by img2dataset itself into
webdataset shards; a few URLs are undecodable files or 404s, which img2dataset drops."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pretrain.distributed import free_port
from tests.launch import REPO

VENV = Path(os.environ.get("IMG2DATASET_VENV", REPO / ".venv-img2dataset"))
SIZES = [(48, 64), (64, 36), (40, 40), (64, 48), (36, 64)]  # (width, height): 3:4, 16:9, 1:1, 4:3, 9:16
SMALL = (16, 16)  # below the tests' --min-size


def img2dataset_bin() -> Path:
    """img2dataset in its own venv (`make test` builds it; built here when missing)."""
    exe = VENV / "bin" / "img2dataset"
    if not exe.exists():
        subprocess.run(["python3", "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "img2dataset==1.47.0"], check=True)
    return exe


def make_images(www: Path, count: int, small: int = 2, seed: int = 0) -> list[tuple[str, str]]:
    """`count` photos (every size of SIZES in turn, every third a PNG) plus `small` tiny ones, under
    www/img; returns [(file name, caption)]."""
    import skimage.data
    from PIL import Image
    rng = np.random.default_rng(seed)
    pictures = {"astronaut": skimage.data.astronaut(), "coffee": skimage.data.coffee(),
                "chelsea": skimage.data.chelsea(), "rocket": skimage.data.rocket()}
    names = sorted(pictures)
    (www / "img").mkdir(parents=True, exist_ok=True)
    made = []
    for i in range(count + small):
        w, h = SIZES[i % len(SIZES)] if i < count else SMALL
        name = names[i % len(names)]
        pic = pictures[name]
        y, x = rng.integers(0, 100, 2)
        im = Image.fromarray(pic[y:, x:]).resize((w, h), Image.Resampling.BILINEAR)
        file = f"img/{i:04d}.{'png' if i % 3 == 0 else 'jpg'}"
        im.save(www / file)
        made.append((file, f"a photo of a {name} number {i}"))
    return made


def download_with_img2dataset(www: Path, images: list[tuple[str, str]], out: Path, per_shard: int = 8) -> dict:
    """Serve `www` on 127.0.0.1 and let img2dataset download `images`, two undecodable files and two 404s
    (interleaved) into webdataset shards in `out`; returns the summed `_stats.json` counts."""
    (www / "img" / "broken-a.jpg").write_bytes(b"\xff\xd8\xff" + b"not a jpeg" * 20)
    (www / "img" / "broken-b.png").write_bytes(b"\x89PNG\r\n" + os.urandom(300))
    extra = [("img/broken-a.jpg", "broken a"), ("img/missing-a.jpg", "missing a"),
             ("img/broken-b.png", "broken b"), ("img/missing-b.png", "missing b")]
    rows = list(images)
    for k, item in enumerate(extra):
        rows.insert((k + 1) * len(images) // (len(extra) + 1), item)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=www,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port)
        urls = out.parent / f"{out.name}-urls.csv"
        with open(urls, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["url", "caption"])
            w.writerows((f"http://127.0.0.1:{port}/{file}", caption) for file, caption in rows)
        subprocess.run([str(img2dataset_bin()), "--url_list", str(urls), "--input_format", "csv", "--url_col", "url",
                        "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(out),
                        "--resize_mode", "no", "--processes_count", "1", "--thread_count", "4",
                        "--number_sample_per_shard", str(per_shard), "--retries", "0"],
                       check=True, capture_output=True, text=True, timeout=300)
    finally:
        server.kill()
        server.wait()
    totals: dict = {}
    for stats in sorted(out.glob("*_stats.json")):
        for k, v in json.loads(stats.read_text()).items():
            if isinstance(v, int):
                totals[k] = totals.get(k, 0) + v
    return totals


def _wait_for_port(port: int) -> None:
    import socket
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"http.server on port {port} did not start")
