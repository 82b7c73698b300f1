"""Held-out losses during training: eval/lm_loss and eval/diffusion_loss on data.eval_datasets."""
from __future__ import annotations

import itertools
from typing import Callable

import torch

from data_pipelines.loader import PackedLoader
from data_pipelines.slot import DataError
from model.config_system import InputMissing
from model.layout import pack_rows
from model.transformer import loss_token_counts
from pretrain.distributed import DistInfo, sum_over_ranks
from pretrain.failures import next_batch, stop_if_any_failed
from pretrain.metrics import loss_record


@torch.no_grad()
def held_out_losses(engine, cfg, dist: DistInfo, noise_for: Callable[[object, PackedLoader], torch.Tensor]) -> dict:
    """Token-weighted losses on data.eval_datasets (the same batches every time: the first
    `eval_batches` of each rank, or all with 0); `noise_for(batch, loader)` is a batch's diffusion
    noise. Every rank runs the same number of forwards (ZeRO-3 gathers parameters in each): a rank
    whose share of the held-out data ran out feeds an all-padding batch, which adds no token."""
    loader, error = None, None
    try:  # a manifest unreadable on one rank stops every rank, with its line
        loader = PackedLoader(cfg.data.replace(num_workers=0), cfg.model, cfg.train.micro_batch_size,
                              dist.rank, dist.world_size, datasets=cfg.data.eval_datasets, num_epochs=1)
    except (DataError, InputMissing) as e:
        error = e
    stop_if_any_failed(dist, error)
    batches = iter(loader)
    empty = pack_rows([[] for _ in range(cfg.train.micro_batch_size)], cfg.data.seq_len)
    sums, counts = [0.0, 0.0], torch.zeros(2, dtype=torch.long)
    engine.eval()
    for _ in range(cfg.train.eval_batches) if cfg.train.eval_batches else itertools.count():
        batch, error = next_batch(batches)
        more, failed = sum_over_ranks([batch is not None, error is not None], group=dist.control_group)
        if failed:
            stop_if_any_failed(dist, error, known=True)
        if not more:
            break
        batch = empty if batch is None else batch
        counts += loss_token_counts(batch)
        noise = noise_for(batch, loader)  # padding: no latent, no noise
        out = engine(batch.to(dist.device), noise=noise, return_loss=True)
        sums = [sums[0] + out["lm_sum"], sums[1] + out["diffusion_sum"]]
    engine.train()
    totals = sum_over_ranks([*sums, *counts.tolist()], dist.device)
    return loss_record(totals[:2], totals[2:], cfg.model, prefix="eval/")
