"""Clips of a video, decoded as a stream: at most one clip's frames are ever held.

Frames are decoded by PyAV one at a time and sampled to `fps` (the frame shown at each sample time
k / fps; the native rate when `fps` is None). Each kept frame is resized by the image resolution
policy (data_pipelines.ingest.resolution), and frames are cut into clips of `clip_frames`:
`clips_per_video` K > 0 takes K clips evenly spaced over the video (fewer when K clips of that
length do not fit without overlapping), K = 0 every non-overlapping clip from the start.

A video PyAV cannot open or decode is `Skip("undecodable")`, one with no frame `Skip("empty_video")`,
one shorter than a clip `Skip("too_short")`.
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

from data_pipelines.ingest.resolution import ResolutionPolicy, Skip, resize_cover

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi")


@dataclass(frozen=True)
class ClipPolicy:
    fps: Optional[float] = None  # sample frames at this rate (None: the video's own)
    clip_frames: Optional[int] = None  # frames per clip (None: 16, or the encoder's next count above it)
    clips_per_video: int = 1     # K evenly spaced clips; 0 = every non-overlapping clip

    def __post_init__(self):
        if self.clip_frames is not None and self.clip_frames < 1:
            raise ValueError(f"--clip-frames {self.clip_frames}: must be at least 1")
        if self.clips_per_video < 0:
            raise ValueError(f"--clips-per-video {self.clips_per_video}: must be >= 0 (0 = all)")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"--fps {self.fps}: must be positive")

    def describe(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def clip_starts(self, frames: int) -> list[int]:
        """First sampled frame of each clip of a video of `frames` sampled frames."""
        n = frames // self.clip_frames  # clips that fit without overlapping
        if n == 0:
            return []
        if self.clips_per_video == 0:
            return [j * self.clip_frames for j in range(n)]
        k = min(self.clips_per_video, n)
        if k == 1:
            return [(frames - self.clip_frames) // 2]
        room = frames - self.clip_frames
        return [j * room // (k - 1) for j in range(k)]


def iter_clips(video: Union[bytes, str, Path], clips: ClipPolicy, resolution: ResolutionPolicy,
               name: str = "video") -> Iterator[np.ndarray]:
    """T,H,W,3 uint8 clips of an encoded video (its bytes or a path), in order; Skip for a video
    that gives none."""
    import av
    try:
        container = av.open(io.BytesIO(video) if isinstance(video, (bytes, bytearray)) else str(video))
    except Exception as e:  # PyAV raises its own error types (InvalidDataError, ...) for bad input
        raise Skip("undecodable", f"{name}: {type(e).__name__}: {e}") from None
    with container:
        if not container.streams.video:
            raise Skip("undecodable", f"{name}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        native = stream.average_rate or stream.guessed_rate or Fraction(30)
        rate = Fraction(clips.fps).limit_denominator(1001) if clips.fps else Fraction(native)
        total = _sampled_frames(container, stream, rate)
        starts = None  # every clip from the start (all of them, or the first K when the length is unknown)
        if clips.clips_per_video and total is not None:
            starts = clips.clip_starts(total)
            if not starts:
                raise Skip("too_short", f"{name}: {total} frames at {float(rate):g} fps, fewer than "
                                        f"--clip-frames {clips.clip_frames}")
        yield from _cut(_sampled(container, stream, native, rate, name), starts, clips, resolution, name)


def _sampled_frames(container, stream, rate: Fraction) -> Optional[int]:
    """How many frames sampling at `rate` gives, from the container's duration (None if unknown)."""
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / 1e6
    else:
        return None
    return int(seconds * rate + 1e-6)


def _sampled(container, stream, native: Fraction, rate: Fraction, name: str):
    """(sample index, frame) at each time k / rate: the frame shown then (a frame may be repeated or skipped)."""
    half = 0.5 / float(native)
    start, k = None, 0
    try:
        for frame in container.decode(stream):
            t = frame.time if frame.time is not None else 0.0
            start = t if start is None else start
            while k / float(rate) <= t - start + half:
                yield k, frame
                k += 1
    except Exception as e:  # a corrupt packet mid-stream: what was decoded stands, the rest is lost
        if k == 0:
            raise Skip("undecodable", f"{name}: {type(e).__name__}: {e}") from None
    if start is None:
        raise Skip("empty_video", f"{name}: no frame decoded")


def _cut(frames, starts: Optional[list[int]], clips: ClipPolicy, resolution: ResolutionPolicy, name: str):
    """Clips of the sampled frames: those starting at `starts`, or every clip_frames from the start."""
    f, made, clip, begun, size = clips.clip_frames, 0, [], False, None
    for k, frame in frames:
        if not begun:
            begun = k % f == 0 if starts is None else (made < len(starts) and k == starts[made])
            if not begun:
                continue
        image = frame.to_image()
        if size is None:
            if min(image.size) < max(resolution.min_size, 1):
                raise Skip("too_small", f"{name}: {image.width}x{image.height} below --min-size {resolution.min_size}")
            size = resolution.target_size(*image.size)
        clip.append(np.asarray(resize_cover(image, *size)))
        if len(clip) == f:
            yield np.stack(clip)
            made, clip, begun = made + 1, [], False
            if made == (len(starts) if starts is not None else clips.clips_per_video or -1):
                return
    if made == 0:
        raise Skip("too_short", f"{name}: fewer than --clip-frames {f} frames")
