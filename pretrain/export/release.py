"""Release folders: everything needed to sample, with no DeepSpeed and no data pipeline run.

    RELEASE/config.json                       the model config (model.transformer)
    RELEASE/model.safetensors                 or model-0000K-of-0000N.safetensors + model.safetensors.index.json
    RELEASE/tokenizer.model or tokenizer.json the shards' tokenizer (sentencepiece, or tokenizers' JSON)
    RELEASE/release.json                      latent encoder, latent shapes seen in training, provenance
    RELEASE/README.md                         provenance for people: source, step, tokens, EMA or raw
    RELEASE/vae/                              the VAE, when the latents came from one

This module owns the release folder; `write_release` writes one into a temporary folder and
renames it at the end, so that OUT is either complete or absent. `load_for_sampling(path)`
takes a release folder, a training run directory (its latest checkpoint) or a checkpoint folder.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from model.model_config import ModelConfig
from model.transformer import UnifiedTransformer, save_model_config
from model.weights import Entry, has_weights, state_entries, write_weights
from model.config_system import InputMissing
from data_pipelines.tokenizer import TOKENIZER_FILES, file_name, find_tokenizer, load_tokenizer
from pretrain.export import readme
from pretrain.export.staging import staged_folder

RELEASE_FILE, README_FILE = "release.json", "README.md"
WEIGHT_KNOBS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "norm_eps", "rope_theta", "rope_scaling",
                "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_seq_len", "qk_norm",
                "latent_channels", "patch_size")  # model knobs that give the weights their meaning


@dataclasses.dataclass
class Loaded:
    model: UnifiedTransformer
    tokenizer: Optional[Path]
    info: dict  # {"encoder": {...}, "latent_shapes": {"image": [C,H,W], ...}, ...}


def data_record(manifests: list) -> tuple[dict, Optional[bytes], Optional[str]]:
    """What a checkpoint carries about its data (pretrain.checkpoint.data_files): the record (encoder,
    latent shapes, clip timing, the tokenizer's fingerprint and size) and the tokenizer file's bytes
    when the file the manifests name is there and is the one the shards were written with; else the
    third item says why it is not carried."""
    from data_pipelines.tokenizer import fingerprint_of
    info, path = info_from_manifests(manifests)
    wanted = next((m.tokenizer for m in manifests if m.tokenizer.get("fingerprint")), {})
    record = dict(info, tokenizer={k: wanted.get(k) for k in ("fingerprint", "vocab_size")} if wanted else None)
    if path is None:
        return record, None, "the shards name no tokenizer" if wanted else None
    try:
        content = Path(path).read_bytes()
    except OSError as e:
        return record, None, f"{path}: {e.strerror or e}"
    if wanted and fingerprint_of(content) != wanted["fingerprint"]:
        return record, None, (f"{path} is not the tokenizer the shards were written with (fingerprint "
                              f"{fingerprint_of(content)}, the manifests record {wanted['fingerprint']})")
    return record, content, None


def checkpoint_data(folder: Path, config: dict) -> tuple[dict, Optional[Path], Optional[str]]:
    """(record, tokenizer file, why there is none) of a checkpoint folder: the files it carries (the
    tokenizer only if it matches the fingerprint recorded with it), or for a checkpoint written before
    checkpoints carried them, the manifests of its datasets given by absolute paths (a relative path
    would be read from wherever this runs)."""
    from data_pipelines.shards import load_manifest
    from data_pipelines.tokenizer import fingerprint_of
    from pretrain.checkpoint import DATA_FILE, read_data
    record, tokenizer = read_data(folder)
    if record is None:
        manifests = []
        for entry in config.get("data", {}).get("datasets", []):
            try:
                if Path(entry["path"]).is_absolute():
                    manifests.append(load_manifest(entry["path"]))
            except (FileNotFoundError, ValueError):
                continue
        record, content, why = data_record(manifests)
        path = info_from_manifests(manifests)[1]
        if content is None:
            return record, None, f"{folder} has no {DATA_FILE} and " + (why or "its datasets' manifests are not found")
        return record, path, None
    if tokenizer is None:
        return record, None, f"{folder} carries no tokenizer file ({' or '.join(TOKENIZER_FILES)})"
    wanted, got = (record.get("tokenizer") or {}).get("fingerprint"), fingerprint_of(tokenizer.read_bytes())
    if wanted and got != wanted:
        return record, None, f"{tokenizer} is not the run's tokenizer (fingerprint {got}, {DATA_FILE} records {wanted})"
    return record, tokenizer, None


def info_from_manifests(manifests: list) -> tuple[dict, Optional[Path]]:
    """({encoder, latent_shapes}, tokenizer path) of a list of shard manifests: the first of each (the
    encoder of the first set with latents: a text-only set's encoder encoded nothing)."""
    info, tokenizer = {"encoder": None, "latent_shapes": {}}, None
    for m in sorted(manifests, key=lambda m: not m.latent_shapes):
        info["encoder"] = info["encoder"] or m.encoder
        for kind, shape in m.latent_shapes.items():
            info["latent_shapes"].setdefault(kind, shape)
        if m.video and "video" in m.latent_shapes:
            info.setdefault("video", m.video)  # how clips were cut (their fps)
        if tokenizer is None and m.tokenizer_path:
            tokenizer = Path(m.tokenizer_path)
    return info, tokenizer


def write_release(out: str | Path, cfg: ModelConfig, entries: list[Entry], get_tensor: Callable[[str], torch.Tensor],
                  info: dict, tokenizer: Optional[Path], max_shard_bytes: int = 5 * 10**9,
                  progress: Optional[Callable] = None) -> Path:
    """Write a release folder at `out` (which must not exist), streaming the weights through
    `get_tensor`; nothing is left at `out` if anything fails."""
    with staged_folder(out) as tmp:
        write_weights(tmp, entries, get_tensor, max_shard_bytes, progress=progress)
        save_model_config(tmp, cfg)
        info = dict(info)
        encoder = dict(info.get("encoder") or {})
        if encoder.get("type") == "vae":  # the release carries its VAE: nothing else is needed to sample
            shutil.copytree(encoder["path"], tmp / "vae")
            info["encoder"] = dict(encoder, path="vae")
        (tmp / RELEASE_FILE).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / README_FILE).write_text(readme.render(cfg, info, {e.name: tuple(e.shape) for e in entries}))
        if tokenizer is not None and Path(tokenizer).is_file():
            shutil.copyfile(tokenizer, tmp / file_name(Path(tokenizer).read_bytes()))
    return Path(out)


def save_release(model: UnifiedTransformer, out: str | Path, info: dict, tokenizer: Optional[Path],
                 dtype: Optional[torch.dtype] = None, max_shard_bytes: int = 5 * 10**9) -> Path:
    """A release folder of a model in memory."""
    state = model.state_dict()
    return write_release(out, model.cfg, state_entries(state, dtype), state.__getitem__, info, tokenizer,
                         max_shard_bytes)


def stamp(provenance: dict) -> dict:
    return {**provenance, "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def checkpoint_folder(path: Path) -> Path:
    """A run directory or checkpoint root (-> its `latest`) or a checkpoint folder itself."""
    from pretrain.checkpoint import is_checkpoint, read_latest, run_checkpoints
    path = Path(path)
    root = run_checkpoints(path) if run_checkpoints(path).is_dir() else path
    if read_latest(root):
        return root / read_latest(root)
    if is_checkpoint(path):
        return path
    raise InputMissing(f"{path}: not a release folder, run directory or checkpoint folder "
                            "(no model.safetensors, no checkpoints/latest, no *model_states.pt)")


def model_from_checkpoint(ckpt: Path, ema: bool = True) -> tuple[UnifiedTransformer, dict, bool]:
    """(model with the checkpoint's whole weights, its experiment config, whether they are the EMA's)."""
    from pretrain.checkpoint.reader import CheckpointReader
    reader = CheckpointReader(ckpt)
    used_ema = ema and reader.has_ema()
    config = reader.config
    model = UnifiedTransformer.from_state_dict(ModelConfig.from_dict(config["model"]), reader.state_dict(used_ema))
    return model.eval(), config, used_ema


def init_from_release(model: UnifiedTransformer, path: str | Path, manifests: list) -> None:
    """Copy a release folder's weights into `model` (train.init_from). ConfigError, one line, when its
    tensors do not fit the model or the shards were tokenized with another tokenizer than its own."""
    from model.config_system import ConfigError
    from model.transformer import check_state_shapes
    from model.weights import WeightsError, load_weights
    from model.transformer import CONFIG_FILE
    path = Path(path)
    if not has_weights(path) or not (path / CONFIG_FILE).is_file():
        raise ConfigError(f"train.init_from={path}: not a release folder (no {CONFIG_FILE} and weights)")
    theirs, ours = json.loads((path / CONFIG_FILE).read_text()), model.cfg.to_dict()
    theirs = {**ModelConfig().to_dict(), **theirs}  # a knob added since the release was written: its default
    differ = [f"model.{k} is {theirs.get(k)!r} there, {ours[k]!r} here" for k in WEIGHT_KNOBS if theirs.get(k) != ours[k]]
    if differ:
        raise ConfigError(f"train.init_from={path}: the run's model is not the release's ({'; '.join(differ)})")
    tokenizer = find_tokenizer(path)
    if tokenizer is None:
        raise ConfigError(f"train.init_from={path}: the release has no tokenizer file, so the shards' tokenizer "
                          "cannot be checked against its embeddings (write it with its tokenizer)")
    own = load_tokenizer(tokenizer).fingerprint()
    for m in manifests:
        if m.tokenizer.get("fingerprint") not in (None, own):
            raise ConfigError(f"train.init_from={path}: {m.root} was tokenized with {m.tokenizer_path}, not the "
                              f"release's {tokenizer} (write the shards with --tokenizer {tokenizer})")
    state = load_weights(path)
    try:
        check_state_shapes(model, {k: v.shape for k, v in state.items()})
    except WeightsError as e:
        raise ConfigError(f"train.init_from={path}: {e} (the model.* settings must match its config.json)") from None
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(state[name])


def load_for_sampling(path: str | Path, device="cpu", ema: bool = True) -> Loaded:
    """A release folder, a run directory (its `latest`), or one checkpoint folder."""
    path = Path(path)
    if has_weights(path):  # not config.json: a checkpoint folder holds one too (the run's config)
        model = UnifiedTransformer.from_pretrained(path, device=device)
        info = json.loads((path / RELEASE_FILE).read_text()) if (path / RELEASE_FILE).is_file() else {}
        if (info.get("encoder") or {}).get("type") == "vae":
            info["encoder"]["path"] = str(path / info["encoder"]["path"])  # relative to the release
        return Loaded(model, find_tokenizer(path), info)
    folder = checkpoint_folder(path)
    model, config, _ = model_from_checkpoint(folder, ema)
    info, tokenizer, _ = checkpoint_data(folder, config)
    return Loaded(model.to(device), tokenizer, info)
