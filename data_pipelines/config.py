"""DataConfig: which shard sets to stream, how to mix, pack and shuffle them."""
from __future__ import annotations

import dataclasses
import re
from typing import Literal

from model.config_system import Config, ConfigError, knob


NAME = re.compile(r"[A-Za-z0-9._-]*[A-Za-z._-][A-Za-z0-9._-]*")  # a dataset name: not all digits (an index)


def default_name(path: str) -> str:
    """A dataset's name from where it is: the last folder of a path or URL (of a pipe: command, its last
    word with a '/'), without the {shard} file or a query, reduced to NAME's characters."""
    words = [w for w in path.split() if "/" in w] if path.startswith("pipe:") else [path]
    where = (words[-1] if words else path).split("?")[0]
    parts = [p for p in where.split("/") if p and "{shard}" not in p and p not in (".", "..") and not p.endswith(":")]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", parts[-1]) if parts else "data"
    return name if NAME.fullmatch(name) else f"data{name}"


@dataclasses.dataclass
class DatasetConfig(Config):
    path: str = knob("", "shard set holding manifest.json (data_pipelines.write_shards): a folder, an http(s):// "
                         "URL prefix, or a pipe: command with {shard} for the file name (data_pipelines.transport)")
    name: str = knob("", "the dataset's stable name in logs (data/NAME/...) and the token ledger ('' = the last "
                         "folder of path)")
    weight: float = knob(1.0, "mixture weight (normalised over the datasets)")
    role: Literal["generate", "context", "both"] = knob(
        "generate", "layout of latents: generate (noised, diffusion loss), context (clean), both")
    image_first: float = knob(0.0, "probability that a sample is laid out image first (image-to-text): each caption "
                                   "that precedes a latent follows it instead, the latent clean (context, no "
                                   "diffusion loss) and the caption with the LM loss; drawn per sample")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.name = self.name or default_name(self.path)
        if not NAME.fullmatch(self.name):
            raise ConfigError(f"name: {self.name!r} must be letters, digits, '.', '_' or '-', not all digits")
        if self.weight <= 0:
            raise ConfigError(f"weight: must be positive, got {self.weight}")
        if not 0.0 <= self.image_first <= 1.0:
            raise ConfigError(f"image_first: must be in [0, 1], got {self.image_first}")


@dataclasses.dataclass
class MixPoint(Config):
    step: int = knob(0, "optimizer step at which these weights hold")
    weights: dict = knob({}, "dataset name (or index) -> weight; a dataset not named keeps its data.datasets weight")


@dataclasses.dataclass
class DataConfig(Config):
    datasets: list[DatasetConfig] = knob([], "shard sets to mix: [{path, weight, role, image_first}, ...]")
    mix_by: Literal["documents", "tokens"] = knob(
        "tokens", "what the weights are shares of: loss tokens (text targets + latent loss tokens, kept by a "
                  "deterministic controller: data_pipelines.mixture) or documents drawn")
    schedule: list[MixPoint] = knob([], "weights over training: [{step: N, weights: {name: w, ...}}, ...], steps "
                                        "increasing; before the first point its weights, after the last the last's")
    interpolate: bool = knob(True, "schedule weights change linearly between points (false: a step function)")
    eval_datasets: list[DatasetConfig] = knob([], "held-out shard sets for evaluation")
    seq_len: int = knob(1024, "tokens per packed row")
    num_workers: int = knob(2, "DataLoader worker processes per rank (0 = in the main process)")
    seed: int = knob(0, "seed of the sample order, mixture, caption dropout and timesteps")
    shuffle: bool = knob(True, "seeded permutation of shards and of samples inside a shard, per epoch")
    pack_buffer: int = knob(32, "documents held to choose from when filling a row (first fit)")
    caption_dropout: float = knob(0.1, "probability of dropping the caption of a generated latent (CFG)")
    max_bad_samples: int = knob(100, "corrupt samples skipped per reader before a DataError")
    max_shard_bytes: int = knob(2 * 10**9, "largest remote shard a reader downloads (refused beyond, not retried); "
                                               "it waits in a spill file on disk, not in memory")
    spill_dir: str = knob("", "folder of the spill files of downloaded shards ('' = $TMPDIR or /tmp); each reader "
                              "holds about 2 x shards_in_flight + 2 shards per remote dataset there (its group's, "
                              "one more, the next group's, one downloading), unnamed, gone when it ends")
    read_timeout: float = knob(60.0, "seconds a remote read may go without a byte (or below min_read_speed) "
                                     "before it is aborted and retried")
    min_read_speed: float = knob(65536.0, "bytes/s a remote transfer must keep over each read_timeout window "
                                          "(0 = any byte is progress)")
    retry_budget: float = knob(300.0, "seconds from a remote read's first failure until it gives up (a DataError); "
                                      "with read_timeout and retry_backoff_max, at most half the 30-min "
                                      "process-group timeout (checked)")
    retry_backoff: float = knob(0.5, "seconds before the first retry of a remote read (doubling, jittered)")
    retry_backoff_max: float = knob(30.0, "cap of the retry backoff, seconds")
    shards_in_flight: int = knob(4, "shards each reader slot reads at once, interleaved in a seeded order (with fewer "
                                    "than slots x this shards, the epoch is cut into slots x this slices instead)")
    num_epochs: int = knob(0, "passes over each dataset; 0 = endless")
    add_bos_eos: bool = knob(True, "wrap each document in <bos> ... <eos>")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seq_len <= 8:
            raise ConfigError(f"seq_len: must be > 8, got {self.seq_len}")
        if self.shards_in_flight < 1:
            raise ConfigError(f"shards_in_flight: must be >= 1, got {self.shards_in_flight}")
        for key in ("read_timeout", "retry_backoff", "retry_backoff_max"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}: must be positive, got {getattr(self, key)}")
        for key in ("retry_budget", "min_read_speed"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if not self.add_bos_eos and any(d.image_first for d in self.datasets + self.eval_datasets):
            raise ConfigError("add_bos_eos: image_first needs it (a caption is read after <bos> <boi> image <eoi> "
                              "and ends at <eos>)")
        self._check_schedule()
        names = [d.name for d in self.datasets]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"datasets: more than one is named {twice[0]!r}; give each a name: (data.datasets.N.name)")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ConfigError(f"caption_dropout: must be in [0, 1], got {self.caption_dropout}")

    def _check_schedule(self) -> None:
        from data_pipelines.mixture import dataset_index, point_weights
        steps = [p.step for p in self.schedule]
        if steps != sorted(set(steps)) or any(n < 0 for n in steps):
            raise ConfigError(f"schedule: steps must be >= 0 and increasing, got {steps}")
        for i, p in enumerate(self.schedule):
            named = set()
            for key, w in p.weights.items():
                try:
                    d = dataset_index(self, key)
                except KeyError:
                    raise ConfigError(f"schedule.{i}.weights: {key!r} is not a dataset name or index "
                                      f"({', '.join(d.name for d in self.datasets)})") from None
                if d in named:
                    raise ConfigError(f"schedule.{i}.weights: {key!r} names dataset {d} a second time")
                named.add(d)
                if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
                    raise ConfigError(f"schedule.{i}.weights.{key}: must be a number >= 0, got {w!r}")
            if not any(w > 0 for w in point_weights(self, p.weights)):
                raise ConfigError(f"schedule.{i}: every weight is 0")
