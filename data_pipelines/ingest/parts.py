"""What each extraction task has finished: `OUT/parts/part-IIIII-of-NNNNN.json`, and joining the parts.

A part records, for every input unit its task finished, the output shard it wrote ({name, samples,
sha256} and its size, or none when every sample was skipped), the skips by reason and the latent
shapes. It is written when the task starts and rewritten atomically after each unit, so a killed
task loses only the units it had not finished. A rerun keeps a finished unit whose shard still has
its recorded sha256 and redoes the rest. Units are what is finished, not tasks: a rerun with
another number of tasks adopts the units the earlier parts finished. Every part of an `OUT` must
share the recipe and the unit list, else the rerun is refused. `merge_parts` joins the finished
units into `OUT/manifest.json` (data_pipelines.shards owns that format). Output shard u is named
after input unit u, so the merged shard set does not depend on how many tasks wrote it. This module
is the one owner of the part format.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Optional

from data_pipelines.shards import Manifest, file_sha256, shard_name, temporary_path, write_manifest
from model.config_system import InputMissing

PART_FORMAT = "monofusion-part/2"
PARTS = "parts"
AGREED = ("format", "units", "units_digest", "recipe")  # what every part of one extraction shares


def units_digest(units: list) -> str:
    """A hash of the input unit list: parts of one extraction must agree on it."""
    return hashlib.sha256(json.dumps([repr(u) for u in units]).encode()).hexdigest()[:16]


def output_name(unit: int) -> str:
    """The output shard of input unit `unit`."""
    return shard_name(unit)


def read_parts(out: str | Path) -> dict[Path, dict]:
    """Every part under `out` (path -> contents), in name order."""
    folder = Path(out) / PARTS
    found = sorted(folder.glob("part-*-of-*.json")) if folder.is_dir() else []
    return {p: json.loads(p.read_text()) for p in found}


def _check_agreement(parts: dict[Path, dict], body: dict) -> None:
    for path, other in parts.items():
        for key in AGREED:
            if other.get(key) != body.get(key):
                raise ValueError(f"{path}: written by another extraction (its {key} differs); rerun the same "
                                 f"command, or write to a new --out")


class Part:
    """The finished units of task `task` of `tasks`: this task's part as a killed run left it, plus
    the units of this task that parts written with another number of tasks finished."""

    def __init__(self, out: str | Path, task: int, tasks: int, units: int, digest: str, recipe: dict):
        self.out, self.task, self.tasks = Path(out), task, tasks
        self.path = self.out / PARTS / f"part-{task:05d}-of-{tasks:05d}.json"
        self.body = {"format": PART_FORMAT, "task": task, "tasks": tasks, "units": units, "units_digest": digest,
                     "recipe": recipe, "done": {}}
        existing = read_parts(self.out)
        _check_agreement(existing, self.body)
        for other in sorted(existing.values(), key=lambda p: p is existing.get(self.path)):  # own part last
            for u, rec in other["done"].items():
                if int(u) % tasks == task:
                    self.body["done"][u] = rec
        self.kept: list[int] = []  # units found finished and intact

    def mine(self) -> list[int]:
        return list(range(self.task, self.body["units"], self.tasks))

    def scan(self) -> list[int]:
        """Check this task's finished units (sha256 of their shards); forget the others and save the part
        (created here, so a task with no unit has one). Returns the units left to do."""
        todo = [u for u in self.mine() if not self._intact(u)]
        self.body["done"] = {u: rec for u, rec in self.body["done"].items() if int(u) in self.kept}
        self.save()
        return todo

    def _intact(self, unit: int) -> bool:
        rec = self.body["done"].get(str(unit))
        if rec is None:
            return False
        path = self.out / output_name(unit)
        if rec["shard"] is None or (path.is_file() and file_sha256(path) == rec["shard"]["sha256"]):
            self.kept.append(unit)
            return True
        return False

    def record(self, unit: int, shard: Optional[dict], skipped: Counter, shapes: Counter) -> None:
        size = (self.out / shard["name"]).stat().st_size if shard else 0
        self.body["done"][str(unit)] = {"shard": shard, "bytes": size, "skipped": dict(sorted(skipped.items())),
                                        "shapes": {"x".join(map(str, s)): n for s, n in sorted(shapes.items())}}
        self.save()

    def save(self) -> None:
        self.body["done"] = dict(sorted(self.body["done"].items(), key=lambda kv: int(kv[0])))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_path(self.path)
        tmp.write_text(json.dumps(self.body, indent=1) + "\n")
        os.replace(tmp, self.path)

    def totals(self) -> tuple[int, Counter]:
        """(samples written, skips by reason) over this task's finished units."""
        return _totals(self.body["done"].values())


def _totals(records) -> tuple[int, Counter]:
    written, skipped = 0, Counter()
    for rec in records:
        written += rec["shard"]["samples"] if rec["shard"] else 0
        skipped.update(rec["skipped"])
    return written, skipped


def finished_units(out: str | Path) -> tuple[dict[int, dict], int, dict]:
    """({unit: record} finished by any part, the number of units, one part's contents); ValueError
    when the parts disagree, FileNotFoundError when there is none."""
    parts = read_parts(out)
    if not parts:
        raise InputMissing(f"{Path(out) / PARTS}: no extraction parts (write them with "
                                "data_pipelines.write_shards)")
    first = next(iter(parts.values()))
    _check_agreement(parts, first)
    done: dict[int, dict] = {}
    for path, part in parts.items():
        for u, rec in part["done"].items():
            if int(u) in done and done[int(u)]["shard"] != rec["shard"]:
                raise ValueError(f"{path}: input unit {u} is recorded with other contents by another part; "
                                 f"delete {Path(out) / output_name(int(u))} and its records, and rerun")
            done[int(u)] = rec
    return done, first["units"], first


def unfinished(out: str | Path) -> list[int]:
    """The input units no part has finished."""
    done, units, _ = finished_units(out)
    return [u for u in range(units) if u not in done]


def merge_parts(out: str | Path, max_bad_fraction: Optional[float] = None) -> Manifest:
    """Join the finished units of an extraction into `out/manifest.json`; ValueError naming what is
    unfinished, inconsistent or (with `max_bad_fraction`) skipped too often."""
    done, units, first = finished_units(out)
    missing = [u for u in range(units) if u not in done]
    if missing:
        raise ValueError(f"{out}: {len(missing)} of {units} input units unfinished (first: "
                         f"{', '.join(map(str, missing[:5]))}); rerun the tasks that own them")
    written, skipped = _totals(done.values())
    bad = sum(skipped.values())
    if max_bad_fraction is not None and bad > max_bad_fraction * (written + bad):
        raise ValueError(f"{out}: {bad} of {written + bad} samples skipped ({skip_summary(skipped)}), more than "
                         f"--max-bad-fraction {max_bad_fraction:g}")
    shards, shapes = [], Counter()
    for u in sorted(done):
        rec = done[u]
        if rec["shard"] is not None:
            path = Path(out) / rec["shard"]["name"]
            if not path.is_file() or path.stat().st_size != rec["bytes"]:
                raise InputMissing(f"{path}: recorded as finished, but missing or of another size")
            shards.append(rec["shard"])
        shapes.update(rec["shapes"])
    kinds = {"image": Counter(), "video": Counter()}  # C,h,w and C,T,h,w
    for shape, n in shapes.items():
        kinds["video" if shape.count("x") == 3 else "image"][shape] += n
    return write_manifest(out, shards, **first["recipe"],
                          latent_shapes={k: [int(n) for n in c.most_common(1)[0][0].split("x")]
                                         for k, c in kinds.items() if c},
                          shape_counts={k: dict(sorted(c.items())) for k, c in kinds.items() if c},
                          skipped=dict(sorted(skipped.items())))


def skip_summary(skipped: Counter) -> str:
    """'reason count, ...', most frequent first."""
    return ", ".join(f"{r} {n}" for r, n in skipped.most_common())
