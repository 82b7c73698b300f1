"""Run logging on rank 0: a console progress bar, RUN_DIR/metrics.jsonl and wandb (offline by default)."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from data_pipelines.slot import LEDGER
from model.attention import allowed_pairs

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense bf16 per device


def peak_flops(cfg_tflops: float, device: torch.device) -> Optional[float]:
    """FLOP/s of one device for MFU: the config's value, else a known GPU's dense bf16 peak, else None."""
    if cfg_tflops:
        return cfg_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None


def peak_memory(device: torch.device) -> int:
    """Bytes at this process's peak since it started (checkpoint loads, evaluation and sampling
    included): the tensors' high-water mark on a GPU (torch.cuda.max_memory_allocated; what the caching
    allocator reserves beyond it is not counted), the resident set's on the CPU (ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def batch_flops(model_cfg, params_by_use: dict, batch) -> float:
    """Training FLOPs of one micro-batch (forward + backward = 6 per parameter per token that uses
    it; `UnifiedTransformer.params_by_use`), plus attention over the pairs the mask allows
    (forward 4 * D per pair per layer, backward twice that). Padding counts nowhere."""
    real = int((batch.doc != -1).sum())
    text, latent = int(batch.text_loss.sum()), int(batch.is_latent.sum())
    pairs = allowed_pairs(batch.doc, batch.unit, batch.noisy)
    matmuls = params_by_use["every"] * real + params_by_use["text"] * text + params_by_use["latent"] * latent
    return 6.0 * matmuls + 12.0 * model_cfg.n_layers * model_cfg.dim * pairs


def loss_record(sums: list, counts: list, model_cfg, prefix: str = "") -> dict:
    """Token-weighted losses from loss sums and token counts (text targets, latent tokens), both
    totalled over ranks and steps: `loss` (lm_weight * lm + diffusion_weight * diffusion),
    `lm_loss`, `diffusion_loss`. A part with no token in the window is absent, not 0."""
    parts = {}
    for name, total, n in zip(("lm_loss", "diffusion_loss"), sums, counts):
        if n > 0:
            parts[name] = float(total) / float(n)
    if not parts:
        return {}
    loss = model_cfg.lm_weight * parts.get("lm_loss", 0.0) + model_cfg.diffusion_weight * parts.get("diffusion_loss", 0.0)
    return {prefix + k: v for k, v in {"loss": loss, **parts}.items()}


MIXTURE = "data/mixture"  # the key of the record of the data mixture a (re)start runs with


def mixture_config(data_cfg) -> dict:
    """What of data's config the mixture is (pretrain.summary reads each phase's own)."""
    d = data_cfg.to_dict()
    return {k: d[k] for k in ("mix_by", "datasets", "schedule", "interpolate")}


def ledger_record(names: list[str], base: list[list[int]], slots: list) -> dict:
    """The token ledger as metrics: per dataset, the documents and loss tokens (text targets + latent
    loss tokens) handed out so far (`base`: by earlier layouts' slots; `slots`: the LEDGER counts of
    every rank's slots, flat, summed over ranks) and its share of all loss tokens."""
    width = len(LEDGER)
    rows = [[b + int(v) for b, v in zip(row, slots[width * d:width * (d + 1)])] for d, row in enumerate(base)]
    total = sum(text + latent for _, text, latent in rows)
    record = {}
    for name, (docs, text, latent) in zip(names, rows):
        record.update({f"data/{name}/documents": docs, f"data/{name}/tokens": text + latent,
                       f"data/{name}/share": (text + latent) / total if total else 0.0})
    return record


class RunLogger:
    def __init__(self, cfg, is_main: bool, start_step: int):
        self.is_main, self.cfg = is_main, cfg
        self.run_dir = Path(cfg.run.dir)
        self.wandb = None
        self.bar = None
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a")
        if cfg.wandb.mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb
            id_file = self.run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else f"{int(time.time()):x}{os.getpid():x}"
            id_file.write_text(run_id)
            self.wandb = wandb.init(mode=cfg.wandb.mode, project=cfg.wandb.project, entity=cfg.wandb.entity or None,
                                    name=cfg.wandb.name or self.run_dir.name, dir=str(self.run_dir), id=run_id,
                                    resume="allow", config=cfg.to_dict())
        from tqdm import tqdm
        # a progress bar on a terminal; in a batch job's log file, one line per logged step instead
        self.bar = tqdm(total=cfg.train.max_steps, initial=start_step, desc="train", unit="step",
                        dynamic_ncols=True, mininterval=1.0, disable=not sys.stderr.isatty())
        self.t0 = time.time()

    def log(self, step: int, metrics: dict, advance: int = 0) -> None:
        if not self.is_main:
            return
        if advance:
            self.bar.update(advance)
        if not metrics:
            return
        record = {"step": step, **{k: (round(v, 7) if isinstance(v, float) else v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        shown = {k: metrics[k] for k in ("loss", "lm_loss", "diffusion_loss") if k in metrics}
        if "tokens_per_s" in metrics:
            shown["tok/s"] = int(metrics["tokens_per_s"])
        text = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in shown.items()}
        if self.bar.disable:
            if shown:
                print(f"step {step}/{self.cfg.train.max_steps} " + " ".join(f"{k}={v}" for k, v in text.items()),
                      file=sys.stderr, flush=True)
        else:
            self.bar.set_postfix(text, refresh=False)

    def record(self, step: int, fields: dict) -> None:
        """A record of `metrics.jsonl` only (not a metric: e.g. the data mixture a (re)start runs with)."""
        if self.is_main:
            self.jsonl.write(json.dumps({"step": step, **fields}) + "\n")
            self.jsonl.flush()

    def log_images(self, step: int, name: str, path: Path) -> None:
        if self.is_main and self.wandb is not None:
            import wandb
            media = wandb.Video(str(path), format="gif") if Path(path).suffix == ".gif" else wandb.Image(str(path))
            self.wandb.log({name: media}, step=step)

    def message(self, text: str) -> None:
        if self.is_main:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if not self.is_main:
            return
        self.bar.close()
        self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()
