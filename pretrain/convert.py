"""Checkpoint conversion.

    python -m pretrain.convert to-universal CKPT OUT     # a ZeRO checkpoint -> DeepSpeed universal
    python -m pretrain.train --config X.yaml --resume OUT  # ... then resume on another number of ranks
    python -m pretrain.convert to-release CKPT_OR_RUN OUT [--raw] [--dtype bf16] [--max-shard-size 5GB]

`to-universal` runs DeepSpeed's `ds_to_universal` (with `--inject_missing_state`, needed for
ZeRO-1/2) and adds `ema_fp32.pt`: the EMA reassembled from the per-rank partitions, which a
resumed run on any number of ranks cuts into its own partitions again. `to-release` writes a
release folder (pretrain.export.release) from any checkpoint, reading one tensor at a time
(pretrain.checkpoint.reader): its memory is bounded by the largest tensor, not the model.
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

import torch

from pretrain.checkpoint import CONFIG_FILE, copy_side_files, is_checkpoint, write_full_ema
from pretrain.checkpoint.reader import CheckpointError, CheckpointReader
from model.config_system import InputMissing
from pretrain.export.staging import staged_folder


def to_universal(ckpt: str | Path, out: str | Path) -> Path:
    """Convert a ZeRO checkpoint folder (e.g. RUN/checkpoints/step_N) to a universal one at `out`."""
    ckpt, out = Path(ckpt), Path(out)
    if not is_checkpoint(ckpt):
        raise InputMissing(f"{ckpt}: not a DeepSpeed checkpoint folder (no *model_states.pt)")
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt),
           "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]
    with staged_folder(out) as tmp:
        r = subprocess.run(cmd + ["--output_folder", str(tmp)], capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"ds_to_universal failed on {ckpt}: {last}")
        reader = CheckpointReader(ckpt)
        if reader.has_ema():
            write_full_ema(tmp, reader.state_dict(ema=True))
        copy_side_files(ckpt, tmp)
    return out


def to_release(source: str | Path, out: str | Path, ema: bool = True, dtype: str = "fp32",
               max_shard_size: str | int = "5GB", progress: bool = False, tokenizer: bool = True,
               latents: bool = True) -> Path:
    """A checkpoint folder (ZeRO-1/2/3 from any number of ranks, or universal), a checkpoint root or
    a run directory (its `latest`) -> a release folder (pretrain.export.release), EMA weights when the run
    kept an EMA (else or with ema=False the raw ones). The weights are streamed: one tensor in
    memory at a time, the optimizer moments never read. The tokenizer, encoder and latent shapes
    come from the checkpoint itself; without them it refuses (CheckpointError) unless `tokenizer`
    (--no-tokenizer) or `latents` (--text-only) is False."""
    from model.model_config import ModelConfig
    from model.transformer import UnifiedTransformer, check_state_shapes
    from model.weights import ByteProgress, parse_size, state_entries
    from pretrain.export.release import checkpoint_data, checkpoint_folder, stamp, write_release
    folder = checkpoint_folder(Path(source))
    reader = CheckpointReader(folder)
    config = reader.config
    if "model" not in config:
        raise CheckpointError(f"{folder}: no experiment config ({CONFIG_FILE} or client state)")
    cfg = ModelConfig.from_dict(config["model"])
    with torch.device("meta"):
        model = UnifiedTransformer(cfg)
    shapes = dict(reader.entries())
    check_state_shapes(model, shapes)
    use_ema = ema and reader.has_ema()
    out_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    entries = state_entries(model.state_dict(), out_dtype)
    info, tokenizer_file, why = checkpoint_data(folder, config)
    if tokenizer_file is None and tokenizer:
        raise CheckpointError(f"{folder}: no tokenizer to release ({why}); --no-tokenizer writes a release without one")
    if latents and (not info.get("encoder") or not info.get("latent_shapes")):
        raise CheckpointError(f"{folder}: its data record names no latent encoder or latent shapes; --text-only "
                              "writes a release that samples text only")
    info = {k: v for k, v in info.items() if k != "tokenizer"} if tokenizer_file is None else info
    info["provenance"] = stamp({"source": str(folder.resolve()), "step": reader.client.get("step"),
                                "tokens_seen": reader.client.get("tokens"), "weights": "ema" if use_ema else "raw",
                                "dtype": dtype, "config_sha256": config_hash(config)})
    try:
        with ByteProgress(entries, f"to-release {folder.name}", progress) as bar:
            return write_release(out, cfg, entries, lambda name: reader.tensor(name, use_ema), info, tokenizer_file,
                                 parse_size(max_shard_size), progress=bar)
    finally:
        reader.release()


def config_hash(config: dict) -> str:
    import hashlib
    import json
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


LLAMA_FIXED = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "norm_eps", "rope_theta",
               "max_seq_len", "qk_norm")  # set by the Llama (it has no query/key norms)


def latent_knobs(overrides: list[str]) -> dict:
    """`model.KEY=VALUE` overrides of the knobs a Llama does not fix, typed by ModelConfig."""
    from model.config_system import ConfigError, load_config
    from model.model_config import ModelConfig
    keys = []
    for o in overrides:
        key = o.split("=", 1)[0]
        if not key.startswith("model.") or "=" not in o:
            raise ConfigError(f"{o}: expected model.KEY=VALUE")
        if key[len("model."):] in LLAMA_FIXED:
            raise ConfigError(f"{key}: fixed by the Llama's config.json")
        keys.append(key[len("model."):])
    cfg = load_config(ModelConfig, None, [o[len("model."):] for o in overrides])
    return {k: getattr(cfg, k) for k in keys}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    u = sub.add_parser("to-universal", help="ZeRO checkpoint -> DeepSpeed universal checkpoint")
    u.add_argument("checkpoint", help="a checkpoint folder, e.g. RUN/checkpoints/step_00001000")
    u.add_argument("out", help="output folder (e.g. RUN/checkpoints/step_00001000_universal)")
    r = sub.add_parser("to-release", help="checkpoint or run -> release folder (config.json + safetensors)")
    r.add_argument("checkpoint", help="a checkpoint folder (RUN/checkpoints/step_00001000), or a run directory")
    r.add_argument("out", help="release folder to write")
    r.add_argument("--raw", action="store_true", help="raw weights even when the run kept an EMA")
    r.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    r.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (e.g. 5GB, 500MB)")
    r.add_argument("--no-tokenizer", action="store_true", help="write the release although the checkpoint "
                                                                 "carries no tokenizer")
    r.add_argument("--text-only", action="store_true", help="write the release although the checkpoint names no "
                                                              "latent encoder or shapes (it samples text only)")
    i = sub.add_parser("import-llama", help="Hugging Face Llama folder -> release folder (latent parts fresh)")
    i.add_argument("hf_dir", help="folder with config.json, *.safetensors and tokenizer.model or tokenizer.json")
    i.add_argument("out", help="release folder to write")
    i.add_argument("overrides", nargs="*", help="model knobs the Llama does not fix, e.g. model.latent_channels=4 "
                                                  "model.patch_size=2 model.objective=flow model.mode=acdit")
    e = sub.add_parser("export-llama", help="release folder -> Hugging Face Llama folder (the text path)")
    e.add_argument("release", help="a release folder (to-release, import-llama)")
    e.add_argument("out", help="folder to write")
    e.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)  # unwinds like Ctrl-C: the staged output folder is removed
    try:
        if a.command == "import-llama":
            from pretrain.export.llama import import_llama
            out = import_llama(a.hf_dir, a.out, progress=True, **latent_knobs(a.overrides))
            from data_pipelines.tokenizer import find_tokenizer
            print(f"wrote {out}; train from it with train.init_from={out} (shards: --tokenizer {find_tokenizer(out)})")
        elif a.command == "export-llama":
            from pretrain.export.llama import export_llama
            out = export_llama(a.release, a.out, a.dtype, progress=True)
            print(f"wrote {out}; load with transformers.LlamaForCausalLM.from_pretrained({str(out)!r})")
        elif a.command == "to-universal":
            out = to_universal(a.checkpoint, a.out)
            print(f"wrote {out}; resume with --resume {out}")
        else:
            out = to_release(a.checkpoint, a.out, ema=not a.raw, dtype=a.dtype, max_shard_size=a.max_shard_size,
                             progress=True, tokenizer=not a.no_tokenizer, latents=not a.text_only)
            print(f"wrote {out}; sample with python -m pretrain.sample --model {out}")
    except (OSError, ValueError, RuntimeError) as e:  # CheckpointError, WeightsError, ConfigError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        name = e.args[0] if e.args else "SIGINT"
        print(f"error: interrupted ({name}): nothing written at {a.out}", file=sys.stderr)
        return 128 + signal.Signals[name].value
    return 0


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


if __name__ == "__main__":
    sys.exit(main())
