"""Image- and video-caption data as the ecosystem writes it, cut into input units (each becomes one
output shard).

* `webdataset`: tar shards as img2dataset and video2dataset write them (`KEY.jpg|jpeg|png|webp` or
  `KEY.mp4|webm|mkv|mov|avi`, `KEY.txt`, `KEY.json`), given as a folder, files, a brace-expanded
  list (`DIR/{00000..00099}.tar`, also for URLs), an `http(s)://` folder whose index page links
  them, or a `pipe:` command template with a brace list (`pipe:aws s3 cp s3://b/{00000..00099}.tar -`,
  webdataset's convention). A unit is one tar; a remote tar is read through data_pipelines.transport
  (retried, resumed, spilled to disk) like a training shard.
* `files`: folders of image and video files, each captioned by the `.txt` (or a field of the `.json`)
  of its name; a unit is FILES_PER_UNIT files in name order, keys are paths under the folder.
* `parquet`: tables of image bytes + captions (pyarrow); a unit is one row group. An image cell is
  bytes or a struct with a `bytes` field (as Hugging Face datasets store images).

`read_unit` yields `Record`s in stored order and `Skip`s for samples that cannot be used.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin
from typing import Iterator, Optional, Union

from data_pipelines.ingest.resolution import Skip
from data_pipelines.ingest.video import VIDEO_EXTENSIONS
from data_pipelines.tar_index import TarShard
from data_pipelines.transport.fetch import download, download_bytes, spill_file
from data_pipelines.transport.locations import is_http, is_remote
from data_pipelines.transport.policy import ReadPolicy, RemoteError
from model.config_system import InputMissing

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
INGEST_SOURCES = ("webdataset", "parquet", "files")
FILES_PER_UNIT = 1000  # files source: media files per input unit (and so per output shard)


@dataclass(frozen=True)
class InputUnit:
    where: str                    # a path, URL or pipe: command (files: the folder keys are relative to)
    row_group: Optional[int] = None  # parquet
    files: tuple = ()             # files: the media files of this unit


@dataclass
class Record:
    key: str
    caption: str
    media: Union[bytes, str]  # an encoded image or video, or a video file's path
    kind: str = "image"  # image | video


@dataclass(frozen=True)
class ReadOptions:
    caption_key: Optional[str] = None  # webdataset: caption from this field of KEY.json (else KEY.txt)
    image_column: str = "jpg"          # parquet
    caption_column: str = "caption"    # parquet


def list_units(source: str, inputs: list[str], policy: Optional[ReadPolicy] = None) -> list[InputUnit]:
    """The input units of `inputs`, in a deterministic order (files sorted within a folder)."""
    if not inputs:
        raise ValueError(f"--input: the {source} source needs shards or tables to read")
    if source == "webdataset":
        return [InputUnit(w) for item in inputs for w in _expand(item, ".tar", policy)]
    if source == "parquet":
        import pyarrow.parquet as pq
        units = []
        for path in (w for item in inputs for w in _expand(item, ".parquet", policy)):
            if is_remote(path):
                raise ValueError(f"{path}: parquet tables are read from local files")
            try:
                groups = pq.ParquetFile(path).num_row_groups
            except Exception as e:  # pyarrow's ArrowInvalid for a file that is not parquet
                raise ValueError(f"{path}: not a parquet table ({e})") from None
            units += [InputUnit(path, g) for g in range(groups)]
        return units
    if source == "files":
        units = []
        for item in inputs:
            root = Path(item)
            if not root.exists():
                raise InputMissing(f"{root}: no such file or folder")
            found = sorted(p for p in (root.rglob("*") if root.is_dir() else [root]) if _media_kind(p))
            base = root if root.is_dir() else root.parent
            units += [InputUnit(str(base), files=tuple(str(p) for p in found[i:i + FILES_PER_UNIT]))
                      for i in range(0, len(found), FILES_PER_UNIT)]
        if not units:
            raise InputMissing(f"{' '.join(inputs)}: no {'|'.join(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)} files")
        return units
    raise ValueError(f"source: {source!r} is not one of {'|'.join(INGEST_SOURCES)}")


def _media_kind(path: Path) -> Optional[str]:
    ext = path.suffix.lower().lstrip(".")
    return "image" if ext in IMAGE_EXTENSIONS else "video" if ext in VIDEO_EXTENSIONS else None


def _expand(item: str, suffix: str, policy: Optional[ReadPolicy]) -> list[str]:
    import braceexpand
    names = list(braceexpand.braceexpand(item))
    if len(names) > 1 or names[0] != item:
        return names
    if item.startswith("pipe:"):
        raise ValueError(f"{item}: name the shards of a pipe: source with braces, e.g. {{00000..00099}}{suffix}")
    if is_http(item):
        return [item] if item.endswith(suffix) else _linked(item, suffix, policy)
    path = Path(item)
    if path.is_dir():
        found = sorted(str(p) for p in path.iterdir() if p.name.endswith(suffix))
        if not found:
            raise InputMissing(f"{path}: no *{suffix} files")
        return found
    if not path.is_file():
        raise InputMissing(f"{path}: no such file or folder")
    return [str(path)]


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs += [v for k, v in attrs if k == "href" and v]


def _linked(url: str, suffix: str, policy: Optional[ReadPolicy]) -> list[str]:
    """The `*suffix` files an HTTP folder's index page links to (a plain file server's listing)."""
    base = url.rstrip("/") + "/"
    try:  # retried like any remote read
        page = download_bytes(base, dataclasses.replace(policy or ReadPolicy(), max_bytes=1 << 28)).decode(
            "utf-8", "replace")
    except RemoteError as e:
        raise InputMissing(f"{e}; name the shards: {base}{{00000..00099}}{suffix}") from None
    links = _Links()
    links.feed(page)
    urls = {urljoin(base, h) for h in links.hrefs}
    found = sorted(u for u in urls if u.startswith(base) and u.endswith(suffix) and "/" not in u[len(base):])
    if not found:
        raise InputMissing(f"{base}: its index page links no *{suffix} file; name the shards: "
                                f"{base}{{00000..00099}}{suffix}")
    return found


def read_unit(unit: InputUnit, options: ReadOptions, policy: Optional[ReadPolicy] = None) \
        -> Iterator[Union[Record, Skip]]:
    """The unit's samples in stored order: a Record, or a Skip naming why a sample is unusable."""
    if unit.files:
        yield from _files(unit, options)
    elif unit.row_group is not None:
        yield from _parquet_rows(unit, options)
    else:
        yield from _tar_samples(unit, options, policy or ReadPolicy())


def _tar_samples(unit: InputUnit, options: ReadOptions, policy: ReadPolicy) -> Iterator[Union[Record, Skip]]:
    if is_remote(unit.where):
        file = spill_file(policy)
        try:
            download(unit.where, file, policy)
        except BaseException:
            file.close()
            raise
    else:
        file = open(unit.where, "rb")
    shard = TarShard(file, unit.where)
    try:
        # the damage of a truncated tar may have cut its last sample short: that one is not used
        for i in range(len(shard) - bool(shard.error)):
            key, files = shard.sample(i)
            yield _record(key, files, options)
        if shard.error:
            yield Skip("truncated_tar", f"{unit.where}: {shard.error} (the samples before it are kept)")
    finally:
        shard.close()


def _record(key: str, files: dict[str, bytes], options: ReadOptions) -> Union[Record, Skip]:
    kind, media = next(((kind, files[e]) for kind, extensions in (("image", IMAGE_EXTENSIONS),
                                                                   ("video", VIDEO_EXTENSIONS))
                        for e in extensions if e in files), (None, None))
    if media is None:
        return Skip("no_image", f"{key}: none of {'|'.join(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)} in {sorted(files)}")
    if options.caption_key:
        try:
            caption = json.loads(files["json"])[options.caption_key]
        except (KeyError, ValueError, TypeError):
            caption = None
    else:
        caption = files["txt"].decode("utf-8", "replace") if "txt" in files else None
    if not isinstance(caption, str) or not caption.strip():
        where = f"field {options.caption_key!r} of {key}.json" if options.caption_key else f"{key}.txt"
        return Skip("no_caption", f"{key}: no caption ({where})")
    return Record(_safe_key(key), caption.strip(), media, kind)


def _files(unit: InputUnit, options: ReadOptions) -> Iterator[Union[Record, Skip]]:
    """Media files, each captioned by the .txt (or a field of the .json) of its name."""
    for name in unit.files:
        path = Path(name)
        key = _safe_key(str(path.relative_to(unit.where).with_suffix("")))
        sidecars = {ext: path.with_suffix(f".{ext}") for ext in ("txt", "json")}
        files = {ext: side.read_bytes() for ext, side in sidecars.items() if side.is_file()}
        files[path.suffix.lower().lstrip(".")] = b""  # (the media is read below, or streamed from the file)
        rec = _record(key, files, options)
        if isinstance(rec, Skip):
            yield Skip(rec.reason, f"{path}: {rec}")
        elif _media_kind(path) == "video":
            yield Record(key, rec.caption, str(path), "video")  # decoded from the file as a stream
        else:
            yield Record(key, rec.caption, path.read_bytes(), "image")


def _safe_key(key: str) -> str:
    """A key usable as a WebDataset key (no dots, no slashes)."""
    return re.sub(r"[./]", "_", key)


def _parquet_rows(unit: InputUnit, options: ReadOptions) -> Iterator[Union[Record, Skip]]:
    import pyarrow.parquet as pq
    table = pq.ParquetFile(unit.where)
    missing = {options.image_column, options.caption_column} - set(table.schema_arrow.names)
    if missing:
        raise ValueError(f"{unit.where}: no column {', '.join(sorted(missing))} (columns: "
                         f"{', '.join(table.schema_arrow.names)}; set --image-column/--caption-column)")
    stem = _safe_key(Path(unit.where).stem)
    batches = table.iter_batches(batch_size=256, row_groups=[unit.row_group],
                                 columns=[options.image_column, options.caption_column])
    rows = ((image, caption) for b in batches for image, caption in zip(b.column(0).to_pylist(),
                                                                        b.column(1).to_pylist()))
    for i, (image, caption) in enumerate(rows):  # 256 rows at a time, not the whole row group
        key = f"{stem}-{unit.row_group:05d}-{i:07d}"
        if isinstance(image, dict):
            image = image.get("bytes")
        if not isinstance(image, (bytes, bytearray)) or not image:
            yield Skip("no_image", f"{key}: column {options.image_column!r} holds no bytes")
        elif not isinstance(caption, str) or not caption.strip():
            yield Skip("no_caption", f"{key}: column {options.caption_column!r} is empty")
        else:
            yield Record(key, caption.strip(), bytes(image))
