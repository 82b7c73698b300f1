"""An uncompressed (WebDataset) tar on an open file, indexed once: its samples are read on demand
with pread, so a shard's bytes stay in the file (or the page cache), not in the reader's memory.

Samples are grouped by key as webdataset groups them (its `group_by_keys`: KEY.EXT members in a
row, extensions lower-cased, `__meta__` members skipped). A truncated or corrupt tar keeps the
samples before the damage and reports the damage as `error` (a tar cut between two members too: it
lacks the end-of-archive marker).
"""
from __future__ import annotations

import os
import re
import tarfile
from typing import BinaryIO, Iterator, Optional

from webdataset.tariterators import group_by_keys

META = re.compile(r"__[^/]*__($|/)")


class TarShard:
    """The samples of a tar file: `len(shard)`, `shard.sample(i)` -> (key, {extension: bytes})."""

    def __init__(self, file: BinaryIO, name: str):
        self.file, self.name = file, name
        # the samples are read in a permuted order: ask the kernel to read the file ahead, as one sequential read
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
        self.samples, self.error = index_tar(file, name)

    def __len__(self) -> int:
        return len(self.samples)

    def sample(self, index: int) -> tuple[str, dict[str, bytes]]:
        key, members = self.samples[index]
        fd = self.file.fileno()
        return key, {ext: os.pread(fd, size, offset) for ext, (offset, size) in members.items()}

    def close(self) -> None:
        self.file.close()


def index_tar(file: BinaryIO, name: str) -> tuple[list[tuple[str, dict]], Optional[str]]:
    """[(key, {extension: (offset, size)})] of the tar in `file`, in stored order, and the error that
    ended the index early (None for an intact tar)."""
    file.flush()  # (a file just written may hold its end in its buffer)
    size = os.fstat(file.fileno()).st_size
    errors: list[str] = []

    def handler(exn: Exception) -> bool:
        errors.append(f"{type(exn).__name__}: {exn}")
        return False

    def members() -> Iterator[dict]:
        file.seek(0)
        try:
            with tarfile.open(fileobj=file, mode="r:") as tar:
                while (info := tar.next()) is not None:
                    tar.members = []  # an index of a large shard must not keep every TarInfo
                    if not info.isreg() or META.match(info.name):
                        continue
                    if info.offset_data + info.size > size:
                        errors.append(f"truncated: {info.name} ends at byte {info.offset_data + info.size} of {size}")
                        return
                    yield {"fname": info.name, "data": (info.offset_data, info.size), "__url__": name}
                # tarfile ends quietly at end of file, so a tar cut between two members looks whole but
                # for its end-of-archive marker: two zero blocks
                file.seek(tar.offset)
                marker = file.read(1024)
                if len(marker) < 1024 or marker.count(0) < 1024:
                    errors.append(f"truncated: no end-of-archive marker after byte {tar.offset} of {size}")
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            errors.append(f"{type(e).__name__}: {e}")

    samples = [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
               for s in group_by_keys(members(), handler=handler)]
    return samples, (errors[0] if errors else None)
