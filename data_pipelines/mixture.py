"""The data mixture: which dataset a slot reads next.

`data.mix_by: documents` draws a dataset with probability proportional to its weight (the draw
is a hash of the seed and the slot's draw count). `tokens` makes the weights shares of *loss
tokens* (text targets + latent loss tokens): a slot keeps, per dataset, the tokens its weights
asked of the batches it made (each batch's loss tokens shared by the weights of its step, `accrue`)
and reads next from the dataset furthest behind that target (ties: the same hashed draw), counting
the documents waiting in its packing buffer as handed out at today's weights. The buffer is not
emptied in order (best fit packs long documents at once and keeps short ones longer), so counting
what was handed out, not what was read, is what keeps the shares: a weight that changes
(`data.schedule`, an edit at a restart) is met once the buffer is through, and what a slot is behind
stays within about a buffer's tokens, so the realised shares follow the weights in any window much
longer than that.

`weights_at(cfg, step)`: the datasets' weights at an optimizer step: their `weight`, overridden by
the schedule's points (by dataset name or index), linear between points (`data.interpolate`),
constant before the first and after the last.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import Optional

from data_pipelines.config import DataConfig

TIE = 1e-9  # owed amounts closer than this are a tie (broken by the hashed draw)


def point_weights(cfg: DataConfig, weights: dict) -> list[float]:
    """The datasets' weights with a schedule point's (keys: names or indices) put in."""
    out = [d.weight for d in cfg.datasets]
    for key, w in weights.items():
        out[dataset_index(cfg, key)] = float(w)
    return out


def dataset_index(cfg: DataConfig, key) -> int:
    names = [d.name for d in cfg.datasets]
    if str(key) in names:
        return names.index(str(key))
    if isinstance(key, int) or str(key).isdigit():
        if int(key) < len(names):
            return int(key)
    raise KeyError(key)


def weights_at(cfg: DataConfig, step: int) -> list[float]:
    """Weights of the datasets at optimizer step `step` (module doc)."""
    points = cfg.schedule
    if not points:
        return [d.weight for d in cfg.datasets]
    i = bisect_right([p.step for p in points], step)
    if i == 0:
        return point_weights(cfg, points[0].weights)
    if i == len(points) or not cfg.interpolate:
        return point_weights(cfg, points[i - 1].weights)
    a, b = points[i - 1], points[i]
    f = (step - a.step) / (b.step - a.step)
    return [x + f * (y - x) for x, y in zip(point_weights(cfg, a.weights), point_weights(cfg, b.weights))]


def weighted_pick(weights: list[float], u: float) -> int:
    """Index i with probability weights[i] / sum(weights), for u uniform in [0, 1)."""
    target, acc = u * sum(weights), 0.0
    for i, w in enumerate(weights):
        acc += w
        if target < acc:
            return i
    return max(i for i, w in enumerate(weights) if w > 0)


def pick(weights: list[float], owed: Optional[list[float]], u: float) -> int:
    """The dataset to read next: by the draw `u` (documents: owed is None), else the one owed most
    among those of positive weight, ties by the draw."""
    if owed is None:
        return weighted_pick(weights, u)
    live = [i for i, w in enumerate(weights) if w > 0]
    most = max(owed[i] for i in live)
    tied = [i if (i in live and owed[i] >= most - TIE) else None for i in range(len(weights))]
    return weighted_pick([weights[i] if t is not None else 0.0 for i, t in enumerate(tied)], u)


def accrue(target: list[float], weights: list[float], tokens: int) -> None:
    """`tokens` loss tokens were handed out: every dataset of positive weight is due its share of them."""
    total = sum(w for w in weights if w > 0)
    for i, w in enumerate(weights):
        if w > 0:
            target[i] += w / total * tokens
