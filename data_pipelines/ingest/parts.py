"""What each extraction task has finished: `OUT/parts/part-IIIII-of-NNNNN.json`, and joining the parts.

A part records, for every input unit its task finished, the output shard it wrote ({name, samples,
sha256}, or none when every sample was skipped), the skips by reason and the latent shapes. It is
rewritten atomically after each unit, so a killed task loses only the units it had not finished. A
rerun of the same command keeps a finished unit whose shard still has its recorded sha256 and
redoes the rest. `merge_parts` joins complete parts into `OUT/manifest.json` (data_pipelines.shards
owns that format); output shard u is named after input unit u, so the merged shard set does not
depend on how many tasks wrote it. This module is the one owner of the part format.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Optional

from data_pipelines.shards import Manifest, file_sha256, shard_name, write_manifest

PART_FORMAT = "monofusion-part/1"
PARTS = "parts"


def units_digest(units: list) -> str:
    """A hash of the input unit list: parts of one extraction must agree on it."""
    return hashlib.sha256(json.dumps([repr(u) for u in units]).encode()).hexdigest()[:16]


def output_name(unit: int) -> str:
    """The output shard of input unit `unit`."""
    return shard_name(unit)


class Part:
    """The finished units of task `task` of `tasks`; loads the part a killed run left, if any."""

    def __init__(self, out: str | Path, task: int, tasks: int, units: int, digest: str, recipe: dict):
        self.out, self.task, self.tasks = Path(out), task, tasks
        self.path = self.out / PARTS / f"part-{task:05d}-of-{tasks:05d}.json"
        self.body = {"format": PART_FORMAT, "task": task, "tasks": tasks, "units": units, "units_digest": digest,
                     "recipe": recipe, "done": {}}
        if self.path.is_file():
            old = json.loads(self.path.read_text())
            for key in ("tasks", "units", "units_digest", "recipe"):
                if old.get(key) != self.body[key]:
                    raise ValueError(f"{self.path}: written by another extraction (its {key} differs); "
                                     f"rerun the same command, or write to a new --out")
            self.body["done"] = old["done"]
        self.kept: list[int] = []  # units found finished and intact

    def mine(self) -> list[int]:
        return list(range(self.task, self.body["units"], self.tasks))

    def finished(self, unit: int) -> bool:
        """Unit `unit` was finished and its shard is intact (sha256 checked); else it is forgotten."""
        rec = self.body["done"].get(str(unit))
        if rec is None:
            return False
        shard = rec["shard"]
        path = self.out / output_name(unit)
        if shard is None or (path.is_file() and file_sha256(path) == shard["sha256"]):
            self.kept.append(unit)
            return True
        del self.body["done"][str(unit)]
        return False

    def record(self, unit: int, shard: Optional[dict], skipped: Counter, shapes: Counter) -> None:
        self.body["done"][str(unit)] = {"shard": shard, "skipped": dict(sorted(skipped.items())),
                                        "shapes": {"x".join(map(str, s)): n for s, n in sorted(shapes.items())}}
        self.body["done"] = dict(sorted(self.body["done"].items(), key=lambda kv: int(kv[0])))
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.body, indent=1) + "\n")
        os.replace(tmp, self.path)

    def totals(self) -> tuple[int, Counter]:
        """(samples written, skips by reason) over the finished units."""
        written, skipped = 0, Counter()
        for rec in self.body["done"].values():
            written += rec["shard"]["samples"] if rec["shard"] else 0
            skipped.update(rec["skipped"])
        return written, skipped


def read_parts(out: str | Path) -> list[dict]:
    folder = Path(out) / PARTS
    found = sorted(folder.glob("part-*-of-*.json")) if folder.is_dir() else []
    if not found:
        raise FileNotFoundError(f"{folder}: no extraction parts (write them with data_pipelines.write_shards)")
    return [json.loads(p.read_text()) for p in found]


def unfinished(parts: list[dict]) -> list[str]:
    """What is missing before the parts can be merged, one phrase per task ([] when complete)."""
    first = parts[0]
    tasks, units = first["tasks"], first["units"]
    by_task = {p["task"]: p for p in parts if p["tasks"] == tasks}
    missing = []
    for task in range(tasks):
        mine = range(task, units, tasks)
        part = by_task.get(task)
        left = len(mine) if part is None else sum(str(u) not in part["done"] for u in mine)
        if left:
            missing.append(f"task {task} of {tasks}: {left} of {len(mine)} input units unfinished")
    return missing


def merge_parts(out: str | Path) -> Manifest:
    """Join the complete parts of an extraction into `out/manifest.json`; ValueError naming what is
    unfinished or inconsistent."""
    parts = read_parts(out)
    first = parts[0]
    for p in parts:
        for key in ("format", "tasks", "units", "units_digest", "recipe"):
            if p.get(key) != first.get(key):
                raise ValueError(f"{Path(out) / PARTS}: part {p['task']} of {p['tasks']} disagrees with part "
                                 f"{first['task']} of {first['tasks']} on its {key} (parts of two extractions?)")
    missing = unfinished(parts)
    if missing:
        raise ValueError(f"{out}: not every task has finished ({'; '.join(missing)}); rerun those tasks")
    done = {int(u): rec for p in parts for u, rec in p["done"].items()}
    shards, skipped, shapes = [], Counter(), Counter()
    for u in sorted(done):
        rec = done[u]
        if rec["shard"] is not None:
            if not (Path(out) / rec["shard"]["name"]).is_file():
                raise FileNotFoundError(f"{Path(out) / rec['shard']['name']}: recorded as finished, but missing")
            shards.append(rec["shard"])
        skipped.update(rec["skipped"])
        shapes.update(rec["shapes"])
    recipe = first["recipe"]
    common = [int(n) for n in shapes.most_common(1)[0][0].split("x")] if shapes else None
    return write_manifest(out, shards, **recipe, latent_shapes={"image": common} if common else {},
                          shape_counts={"image": dict(sorted(shapes.items()))} if shapes else {},
                          skipped=dict(sorted(skipped.items())))
