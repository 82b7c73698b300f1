"""Release folders: everything needed to sample, with no DeepSpeed and no data pipeline run.

    RELEASE/config.json, model.safetensors   (UnifiedTransformer.save_pretrained)
    RELEASE/tokenizer.model                   (the sentencepiece model of the shards)
    RELEASE/release.json                      (latent encoder description, latent shapes seen in training)

`load_for_sampling(path)` takes a release folder or a training run directory (its latest
checkpoint, consolidated in memory by DeepSpeed's zero_to_fp32 helpers; EMA weights when
the run kept an EMA).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from model.model_config import ModelConfig
from model.transformer import WEIGHTS_FILE, UnifiedTransformer

RELEASE_FILE, TOKENIZER_FILE = "release.json", "tokenizer.model"


@dataclasses.dataclass
class Loaded:
    model: UnifiedTransformer
    tokenizer: Optional[Path]
    info: dict  # {"encoder": {...}, "latent_shapes": {"image": [C,H,W], ...}}


def data_info(data_cfg: dict) -> tuple[dict, Optional[Path]]:
    """Encoder, latent shapes and tokenizer of a run, from its datasets' manifests (those still
    readable: a release may be made after the shards moved)."""
    from data_pipelines.shards import load_manifest
    manifests = []
    for entry in data_cfg.get("datasets", []):
        try:
            manifests.append(load_manifest(entry["path"]))
        except (FileNotFoundError, ValueError):
            continue
    return info_from_manifests(manifests)


def info_from_manifests(manifests: list[dict]) -> tuple[dict, Optional[Path]]:
    """({encoder, latent_shapes}, tokenizer path) of a list of shard manifests: the first of each."""
    info, tokenizer = {"encoder": None, "latent_shapes": {}}, None
    for m in manifests:
        info["encoder"] = info["encoder"] or m.get("encoder")
        for kind, shape in m.get("latent_shapes", {}).items():
            info["latent_shapes"].setdefault(kind, shape)
        if tokenizer is None and m.get("tokenizer", {}).get("path"):
            tokenizer = Path(m["tokenizer"]["path"])
    return info, tokenizer


def save_release(model: UnifiedTransformer, out: Path, info: dict, tokenizer: Optional[Path],
                 dtype: Optional[torch.dtype] = None) -> Path:
    out = Path(out)
    model.save_pretrained(out, dtype=dtype)
    encoder = dict(info.get("encoder") or {})
    if encoder.get("type") == "vae":  # the release carries its VAE: nothing else is needed to sample
        shutil.copytree(encoder["path"], out / "vae", dirs_exist_ok=True)
        info = dict(info, encoder=dict(encoder, path="vae"))
    (out / RELEASE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if tokenizer is not None and Path(tokenizer).is_file():
        shutil.copyfile(tokenizer, out / TOKENIZER_FILE)
    return out


def checkpoint_client_state(ckpt: Path) -> dict:
    files = sorted(ckpt.glob("mp_rank_00_model_states.pt")) or sorted(ckpt.glob("zero_pp_rank_0_*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{ckpt}: no DeepSpeed model states file")
    return torch.load(files[0], map_location="cpu", weights_only=False)


def model_from_checkpoint(ckpt: Path, ema: bool = True) -> tuple[UnifiedTransformer, dict, bool]:
    """(model with consolidated weights, client state, whether the EMA was used)."""
    from pretrain.convert import EMA_FILE, consolidate, consolidate_ema
    client = checkpoint_client_state(ckpt)
    cfg = ModelConfig.from_dict(client["config"]["model"])
    state = None
    if ema:
        state = torch.load(ckpt / EMA_FILE, map_location="cpu") if (ckpt / EMA_FILE).is_file() \
            else consolidate_ema(ckpt)
    used_ema = state is not None
    if state is None:
        state = consolidate(ckpt)
    model = UnifiedTransformer(cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval(), client, used_ema


def load_for_sampling(path: str | Path, device="cpu", ema: bool = True) -> Loaded:
    """A release folder, a run directory (its `latest`), or one checkpoint folder."""
    from pretrain.checkpoint import read_latest
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file():  # not config.json: a checkpoint folder holds one too (the run's config)
        model = UnifiedTransformer.from_pretrained(path, device=device)
        info = json.loads((path / RELEASE_FILE).read_text()) if (path / RELEASE_FILE).is_file() else {}
        if (info.get("encoder") or {}).get("type") == "vae":
            info["encoder"]["path"] = str(path / info["encoder"]["path"])  # relative to the release
        tok = path / TOKENIZER_FILE
        return Loaded(model, tok if tok.is_file() else None, info)
    ckpt = path
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if read_latest(path):
        ckpt = path / read_latest(path)
    if not list(ckpt.glob("*model_states.pt")):
        raise FileNotFoundError(f"{path}: not a release folder ({WEIGHTS_FILE}), run directory or checkpoint")
    model, client, _ = model_from_checkpoint(ckpt, ema)
    info, tokenizer = data_info(client["config"].get("data", {}))
    return Loaded(model.to(device), tokenizer, info)
