"""Document sources. A document is an ordered list of raw segments:

    {"text": str} | {"image": float array H,W,C in [0, 1]} | {"video": T,H,W,C, float in [0, 1] or uint8}

Built-in sources use data that ships inside packages (scikit-learn digits, scikit-image
photos), generate it (moving digits), or read the user's files (text folders, jsonl).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from model.config_system import InputMissing

Document = list[dict]
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".jsonl")
PHOTO_CAPTIONS = {  # scikit-image's bundled pictures and what they show
    "astronaut": "an astronaut", "chelsea": "a cat", "coffee": "a cup of coffee", "rocket": "a rocket",
    "camera": "a man with a camera", "coins": "old coins", "moon": "the surface of the moon",
    "brick": "a brick wall", "grass": "grass", "gravel": "gravel", "clock": "a clock",
    "immunohistochemistry": "stained tissue", "hubble_deep_field": "galaxies in deep space",
    "colorwheel": "a color wheel", "text": "printed text", "page": "a page of a book",
}


def _to_hwc(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.float32)
    elif img.dtype == np.uint8:
        img = img.astype(np.float32) / 255.0
    img = img.astype(np.float32)
    if img.ndim == 2:
        img = img[..., None]
    return img[..., :3]


DIGIT_SPLITS = {"all": (0, 1797), "train": (0, 1497), "heldout": (1497, 1797)}  # the last 300: never trained on


def digit_split(split: str) -> range:
    """Indices of scikit-learn's digits in a split: `train` (0-1496), `heldout` (1497-1796, kept out of
    the demo's training sets in both directions, for evaluation) or `all`."""
    if split not in DIGIT_SPLITS:
        raise ValueError(f"split: {split!r} is not one of {'|'.join(DIGIT_SPLITS)}")
    return range(*DIGIT_SPLITS[split])


def digit_caption(label: int) -> str:
    return f"a handwritten digit {DIGIT_NAMES[label]}"


def digits(num_samples: int = 0, split: str = "all", seed: int = 0, **_) -> Iterator[Document]:
    """scikit-learn's bundled 8x8 digits of a split (`digit_split`), captioned 'a handwritten digit seven'."""
    from sklearn.datasets import load_digits
    data = load_digits()
    indices = digit_split(split)
    n = len(indices) if not num_samples else min(num_samples, len(indices))
    for i in indices[:n]:
        yield [{"text": digit_caption(data.target[i])}, {"image": (data.images[i] / 16.0)[..., None]}]


def photos(num_samples: int = 256, crop: int = 32, seed: int = 0, **_) -> Iterator[Document]:
    """Random `crop` x `crop` RGB crops of scikit-image's bundled photographs, captioned by picture."""
    import skimage.data
    rng = np.random.default_rng(seed)
    pictures = {name: _to_hwc(getattr(skimage.data, name)()) for name in PHOTO_CAPTIONS}
    pictures = {k: np.repeat(v, 3, axis=-1) if v.shape[-1] == 1 else v for k, v in pictures.items()}  # RGB
    names = sorted(pictures)
    for i in range(num_samples):
        name = names[i % len(names)]
        pic = pictures[name]
        scale = rng.integers(1, max(2, min(pic.shape[:2]) // (2 * crop)) + 1)  # zoom out by striding
        view = pic[::scale, ::scale]
        y = rng.integers(0, view.shape[0] - crop + 1)
        x = rng.integers(0, view.shape[1] - crop + 1)
        yield [{"text": f"a photo of {PHOTO_CAPTIONS[name]}"}, {"image": view[y:y + crop, x:x + crop].copy()}]


def moving_digits(num_samples: int = 256, frames: int = 16, canvas: int = 32, seed: int = 0, max_digits: int = 2,
                  **_) -> Iterator[Document]:
    """Generated video: 1 to `max_digits` 8x8 digits of the train split bouncing on a canvas, captioned
    with digits and direction."""
    from sklearn.datasets import load_digits
    data = load_digits()
    rng = np.random.default_rng(seed)
    size = 8
    train = digit_split("train")  # the held-out digits stay out of video too
    for _ in range(num_samples):
        count = int(rng.integers(1, max_digits + 1))
        picks = rng.integers(train.start, train.stop, count)
        video = np.zeros((frames, canvas, canvas, 1), np.float32)
        words = []
        for k in picks:
            y, x = rng.integers(0, canvas - size + 1, 2).astype(float)
            dy, dx = rng.choice([-2.0, -1.0, 1.0, 2.0], 2)
            words.append(f"{DIGIT_NAMES[data.target[k]]} moving {'down' if dy > 0 else 'up'} and "
                         f"{'right' if dx > 0 else 'left'}")
            for t in range(frames):
                yi, xi = int(y), int(x)
                video[t, yi:yi + size, xi:xi + size, 0] = np.maximum(
                    video[t, yi:yi + size, xi:xi + size, 0], data.images[k] / 16.0)
                y, x = y + dy, x + dx
                if not 0 <= y <= canvas - size:
                    dy, y = -dy, min(max(y, 0), canvas - size)
                if not 0 <= x <= canvas - size:
                    dx, x = -dx, min(max(x, 0), canvas - size)
        yield [{"text": "digit " + " and digit ".join(words)}, {"video": video}]


def moving_bar_mp4(seconds: float, width: int, height: int, fps: int = 30, bar: int = 1, step: int = 1,
                   fast: bool = False) -> bytes:
    """A generated H.264 mp4 (PyAV) whose frame i shows a white vertical bar `bar` pixels wide at
    x = i * step (mod the room), so its frames can be told apart after resizing. `fast`: x264's
    ultrafast preset (long clips)."""
    import io
    import av
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        options = {"preset": "ultrafast", "crf": "30"} if fast else {}
        stream = container.add_stream("libx264", rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        frame = np.zeros((height, width, 3), np.uint8)
        for i in range(round(seconds * fps)):
            frame[:] = 0
            x = i * step % (width - bar + 1)
            frame[:, x:x + bar] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def iter_text_files(inputs: Sequence[str | Path]) -> list[Path]:
    """Text files named, or found under the folders named (sorted)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise InputMissing(f"{path}: no such file or folder")
    return files


def _file_texts(path: Path) -> Iterator[str]:
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if line.strip():
                try:
                    yield json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{path}:{n}: not a JSON object with a 'text' field") from None
    else:
        yield path.read_text(errors="replace")


def text_lines(files: Sequence[Path]) -> Iterator[str]:
    """Non-empty lines of text files (for tokenizer training)."""
    for f in files:
        for text in _file_texts(f):
            yield from (line for line in text.splitlines() if line.strip())


def text(input: Sequence[str] = (), max_chars: int = 2000, num_samples: int = 0, skip: int = 0,
         **_) -> Iterator[Document]:
    """Text documents from files/folders: each file cut at paragraph breaks into pieces <= max_chars;
    the first `skip` pieces are passed over (a held-out split after a training set's pieces)."""
    count, seen = 0, 0
    for f in iter_text_files(input):
        for body in _file_texts(f):
            for piece in split_paragraphs(body, max_chars):
                seen += 1
                if seen <= skip:
                    continue
                yield [{"text": piece}]
                count += 1
                if num_samples and count >= num_samples:
                    return


def split_paragraphs(body: str, max_chars: int) -> Iterator[str]:
    """Greedy groups of paragraphs of at most `max_chars` characters (longer paragraphs are cut)."""
    piece = ""
    for para in body.split("\n\n"):
        para = para + "\n\n"
        while len(para) > max_chars:
            if piece:
                yield piece
                piece = ""
            yield para[:max_chars]
            para = para[max_chars:]
        if piece and len(piece) + len(para) > max_chars:
            yield piece
            piece = ""
        piece += para
    if piece.strip():
        yield piece


def load_image(path: Path) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        return _to_hwc(np.asarray(im.convert("RGB")))


def load_video(path: Path, fps: float | None = None, clip_frames: int | None = None) -> np.ndarray:
    """A video file (mp4, webm, ... through PyAV) or a folder of frame images -> T,H,W,C: a file is
    decoded as a stream (data_pipelines.ingest.video) into uint8 frames sampled to `fps` (default:
    its own rate); with `clip_frames`, only the middle clip of that many frames is kept (and held)."""
    if path.is_dir():
        frames = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not frames:
            raise ValueError(f"{path}: folder holds no .png/.jpg frames")
        return np.stack([load_image(p) for p in frames])
    from data_pipelines.ingest.resolution import ResolutionPolicy, Skip
    from data_pipelines.ingest.video import ClipPolicy, iter_clips
    policy = ClipPolicy(fps, clip_frames, 1) if clip_frames else ClipPolicy(fps, 1, 0)  # or every frame
    try:
        return np.concatenate(list(iter_clips(path, policy, ResolutionPolicy(), str(path))))
    except Skip as s:
        raise ValueError(str(s)) from None


def jsonl(input: Sequence[str] = (), num_samples: int = 0, fps: float | None = None, clip_frames: int | None = None,
          **_) -> Iterator[Document]:
    """The user's interleaved documents: {"segments": [{"text"}, {"image": "a.png"}, {"video": "c.mp4"}]};
    media paths are relative to the jsonl file; a video file is sampled to `fps` and, with
    `clip_frames`, cut to its middle clip (load_video); a folder of frames is taken whole."""
    count = 0
    for f in iter_text_files(input):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if not line.strip():
                continue
            where = f"{f}:{n}"
            try:
                segments = json.loads(line)["segments"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{where}: not a JSON object with a 'segments' list") from None
            doc = []
            for seg in segments:
                if "text" in seg:
                    doc.append({"text": str(seg["text"])})
                elif "image" in seg:
                    doc.append({"image": load_image(_media(f, seg["image"], where))})
                elif "video" in seg:
                    doc.append({"video": load_video(_media(f, seg["video"], where), fps, clip_frames)})
                else:
                    raise ValueError(f"{where}: segment {seg!r} has none of text|image|video")
            yield doc
            count += 1
            if num_samples and count >= num_samples:
                return


def _media(jsonl_file: Path, name: str, where: str) -> Path:
    path = (jsonl_file.parent / name)
    if not path.exists():
        raise InputMissing(f"{where}: {path} not found")
    return path


SOURCES: dict[str, Callable[..., Iterator[Document]]] = {
    "digits": digits, "photos": photos, "moving_digits": moving_digits, "text": text, "jsonl": jsonl,
}


def get_source(name: str) -> Callable[..., Iterator[Document]]:
    if name not in SOURCES:
        raise ValueError(f"source: {name!r} is not one of {'|'.join(SOURCES)}")
    return SOURCES[name]
