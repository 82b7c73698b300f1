"""Where a shard set lives: a local folder, an http(s):// URL prefix, or a `pipe:` command template.

    runs/data/digits                                   FOLDER/manifest.json, FOLDER/shard-000000.tar
    https://example.org/data/digits                    URL/manifest.json, URL/shard-000000.tar
    pipe:aws s3 cp s3://bucket/digits/{shard} -        the command's stdout; {shard} = manifest.json, shard-...
"""
from __future__ import annotations

import shlex
from pathlib import Path


def is_remote(root: str) -> bool:
    return str(root).startswith(("http://", "https://", "pipe:"))


def is_http(where: str) -> bool:
    return str(where).startswith(("http://", "https://"))


def location(root: str, name: str) -> str:
    """The location of file `name` of a shard set at `root` (folder, URL prefix or pipe template)."""
    root = str(root)
    if root.startswith("pipe:"):
        if "{shard}" not in root:
            raise ValueError(f"{root}: a pipe: path needs {{shard}} where the file name goes")
        return root.replace("{shard}", shlex.quote(name))
    if is_http(root):
        return root.rstrip("/") + "/" + name
    return str(Path(root) / name)
