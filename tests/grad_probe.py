"""Run under torchrun by tests/test_scale.py: the full gradient of one optimizer step over a fixed
global batch of 4 rows, as the trainer computes it, whatever the ranks x micro-batches layout.

    python -m torch.distributed.run --nproc-per-node N tests/grad_probe.py CONFIG OUT key=value ...
        [--variant OUT2 key=value ...]

Global row g goes to micro-batch m, rank r, row b with g = (m * ranks + r) * micro_batch_size + b.
Rank 0 writes {grads: {parameter name: full gradient}, accumulation, communication: dtypes} to OUT.
Each `--variant` builds another engine in the same processes with its own overrides (after the
common ones) and writes to its own OUT: one launch for several ZeRO stages or precisions.
"""
import contextlib
import dataclasses
import sys

import torch

from model.config_system import load_config
from model.diffusion import Diffusion, assign_timesteps
from model.layout import LatentSegment, LayoutSpec, TextSegment, layout_document, pack_rows
from model.packed_batch import PackedBatch
from pretrain.config import ExperimentConfig
from pretrain.distributed import init_distributed
from pretrain.process import run_and_exit
from pretrain.train import Trainer


def global_rows(cfg) -> list[PackedBatch]:
    """Rows whose loss tokens differ a lot: text-heavy, image-heavy, text only, one image only."""
    g = torch.Generator().manual_seed(0)
    spec = LayoutSpec.from_model_config(cfg.model)
    hw = 8

    def text(n):
        return TextSegment(torch.randint(9, 500, (n,), generator=g).tolist())

    def image():
        return LatentSegment(torch.randn(cfg.model.latent_channels, hw, hw, generator=g))

    docs = [[[text(150), image()]], [[text(3), image(), image(), image()], [text(2), image()]],
            [[text(40)], [text(60)]], [[image()]]]
    rows = []
    for i, row in enumerate(docs):
        batch = pack_rows([[layout_document(d, spec) for d in row]], cfg.data.seq_len)
        rows.append(assign_timesteps(batch, Diffusion(cfg.model), torch.Generator().manual_seed(100 + i)))
    return rows


def cat_rows(rows: list[PackedBatch]) -> PackedBatch:
    """Stack 1-row batches into one (a text-only row carries a (0, 0) latents tensor)."""
    fields = {f.name: torch.cat([getattr(r, f.name) for r in rows]) for f in dataclasses.fields(PackedBatch)
              if f.name != "latents"}
    latents = [r.latents for r in rows if r.latents.shape[0]]
    return PackedBatch(**fields, latents=torch.cat(latents) if latents else rows[0].latents)


def perturb(model, zero_stage: int) -> None:
    """Move every weight off its initialisation (the zero-initialised latent head and adaLN would
    give many parameters a zero gradient), the same way on every rank and layout."""
    import deepspeed
    params = list(model.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0, enabled=zero_stage == 3):
        with torch.no_grad():
            for i, (_, p) in enumerate(params):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(p.dtype) * 0.02)


def main(config: str, *args: str) -> None:
    groups = [[]]  # [OUT, overrides...] per engine
    for a in args:
        groups.append([]) if a == "--variant" else groups[-1].append(a)
    common = groups[0][1:]
    dist = init_distributed()
    for i, (out, *extra) in enumerate(groups):
        probe(load_config(ExperimentConfig, config, common + (extra if i else [])), dist, out)


def probe(cfg, dist, out: str) -> None:
    trainer = Trainer(cfg, dist, resume="none")
    perturb(trainer.engine.module, cfg.train.zero_stage)
    rows = global_rows(cfg)
    B, world = cfg.train.micro_batch_size, dist.world_size
    assert len(rows) == B * cfg.train.grad_accum * world, "the layout must hold the 4 global rows"
    places = [[(m * world + dist.rank) * B + b for b in range(B)] for m in range(cfg.train.grad_accum)]
    micro = [cat_rows([rows[g] for g in row_ids]) for row_ids in places]
    _, _, *counts = trainer.step_token_counts(micro)
    reduced = set()  # the dtypes of the gradients the ranks actually exchanged in this step
    with record_reductions(reduced):
        trainer.accumulate(micro, counts, [[(g,) for g in row_ids] for row_ids in places])  # noise keyed by row
    from deepspeed.utils import safe_get_full_grad
    grads = {n: safe_get_full_grad(p).detach().clone().cpu() for n, p in trainer.engine.module.named_parameters()}
    if dist.is_main:  # with the dtypes DeepSpeed accumulates and reduces gradients in
        engine = trainer.engine
        torch.save({"grads": grads, "accumulation": str(accumulated_in(engine.optimizer)),
                    "communication": sorted(reduced)}, out)
    trainer.engine.destroy()
    if trainer.lock is not None:
        trainer.lock.release()


REDUCTIONS = ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_reduce_coalesced",
              "reduce_scatter_fn", "inference_all_reduce", "_reduce_scatter_base")


@contextlib.contextmanager
def record_reductions(dtypes: set):
    """Add to `dtypes` the dtype of every floating tensor of more than one value that goes through a
    reduction, wherever DeepSpeed calls it: its comm backend or torch.distributed (scalars such as the
    gradient norm are left out)."""
    import deepspeed.comm.comm as ds_comm
    targets = [t for t in (ds_comm.cdb, torch.distributed) if t is not None]
    saved = []

    def note(values):
        for v in values:
            for x in v if isinstance(v, (list, tuple)) else [v]:
                if torch.is_tensor(x) and x.is_floating_point() and x.numel() > 1:
                    dtypes.add(str(x.dtype))

    for target in targets:
        for name in REDUCTIONS:
            original = getattr(target, name, None)
            if original is None:
                continue

            def wrapped(*args, _original=original, **kwargs):
                note([*args, *kwargs.values()])
                return _original(*args, **kwargs)
            saved.append((target, name, original))
            setattr(target, name, wrapped)
    try:
        yield dtypes
    finally:
        for target, name, original in saved:
            setattr(target, name, original)


def accumulated_in(opt) -> torch.dtype:
    """The dtype of the buffers that hold the accumulated gradient partitions (DeepSpeed 0.19.8)."""
    if getattr(opt, "grad_partitions_flat_buffer", None) is not None:  # ZeRO-3
        return opt.grad_partitions_flat_buffer.dtype
    if getattr(opt, "fp32_groups_gradients_flat", None):  # BF16_Optimizer (ZeRO-1 in bf16)
        return opt.fp32_groups_gradients_flat[0].dtype
    grads = [g for group in opt.averaged_gradients.values() for g in group if g is not None]  # ZeRO-1/2
    return grads[0].dtype



if __name__ == "__main__":
    run_and_exit(lambda: main(*sys.argv[1:]))
