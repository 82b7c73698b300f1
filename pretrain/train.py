"""Train from a YAML config with DeepSpeed, on one CPU process, several CPU ranks or many GPUs.

    python -m pretrain.train --config configs/tiny-cpu.yaml [--resume auto|PATH|none] key=value ...
    torchrun --nproc-per-node 2 -m pretrain.train --config configs/tiny-cpu.yaml
    deepspeed --num_gpus 8 --module pretrain.train --config configs/monoformer-1b.yaml

Checkpoints go to RUN_DIR/checkpoints every `checkpoint.interval` steps, at the end, and
when SIGTERM or SIGUSR1 arrives (then the run exits 0), written in the background with
`checkpoint.async`; `--resume auto` continues from `latest`, with this run's train.* settings
(each change is logged). Metrics go to the console, RUN_DIR/metrics.jsonl and wandb.
Bad input (a config value, a missing file) ends the run with one line and exit code 2; anything
unexpected with its traceback and exit code 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from data_pipelines.documents import stateless_uniform
from data_pipelines.loader import COUNTERS, PackedLoader
from data_pipelines.slot import DataError
from model.config_system import ConfigError, InputMissing, load_config
from model.diffusion import row_noise
from model.transformer import Block, UnifiedTransformer, loss_token_counts
from pretrain import checkpoint as ckpt
from pretrain import job_history
from pretrain.config import ExperimentConfig
from pretrain.distributed import (DistInfo, LaunchError, all_gather_objects, any_rank, init_distributed,
                                  max_over_ranks, sum_over_ranks)
from pretrain.ema import ShardedEMA
from pretrain.job_history import FINISHED
from pretrain.process import run_and_exit
from pretrain.engine import build_engine, changed_settings, optimizer_settings, restore_settings
from pretrain.failures import next_batch, say_error, stop_if_any_failed
from pretrain.evaluation.held_out import held_out_losses
from pretrain.evaluation.in_loop import EvalSampler
from pretrain.metrics import (MIXTURE, RunLogger, batch_flops, ledger_record, loss_record, mixture_config,
                              peak_flops, peak_memory)
from pretrain.export.release import data_record, init_from_release
from pretrain.run_lock import RunDirBusy, exit_with_parent, lock_run_dir

NOISE, EVAL = 11, 12  # hash domains of the diffusion noise seeds
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # checkpoint at the end of the step, then exit 0


def noise_generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(stateless_uniform(*keys) * 2 ** 62))


class Trainer:
    def __init__(self, cfg: ExperimentConfig, dist: DistInfo, resume: str = "auto", stop_signals=STOP_SIGNALS,
                 early_signals: Optional[list] = None):
        self.cfg, self.dist, self.stop_signals = cfg, dist, tuple(stop_signals)
        self.early_signals = early_signals if early_signals is not None else []  # caught before run()
        t = cfg.train
        self.lock = lock_run_dir(cfg.run.dir, dist)
        self.ckpt_root = ckpt.run_checkpoints(cfg.run.dir)
        self.resume_from = ckpt.resolve_resume(resume, self.ckpt_root)
        if self.resume_from is not None:
            ckpt.check_model_matches(*self.resume_from, cfg.model)
        universal = self.resume_from is not None and ckpt.is_universal(*self.resume_from)
        # data and sampling inputs first: a missing file stops the run (every rank) before the engine is built
        self.loader, error = None, None
        try:
            self.loader = PackedLoader(cfg.data, cfg.model, t.micro_batch_size, dist.rank, dist.world_size,
                                       batches_per_step=t.grad_accum)
        except (DataError, InputMissing) as e:
            error = e
        stop_if_any_failed(self.dist, error)
        try:  # rank 0 reads the held-out images to caption: its failure stops every rank
            self.eval_sampler = EvalSampler(cfg, self.loader.manifests, dist.is_main)
        except (ConfigError, OSError, ValueError) as e:  # whatever rank 0 alone hit, every rank stops
            error = e
        stop_if_any_failed(self.dist, error)
        torch.manual_seed(cfg.run.seed)
        model = UnifiedTransformer(cfg.model)
        if t.init_from and self.resume_from is None:
            init_from_release(model, t.init_from, self.loader.manifests)
        model.activation_checkpointing = t.activation_checkpointing
        if t.zero_stage == 3:  # gather a block's parameters at once, not one Linear at a time
            from deepspeed.utils import set_z3_leaf_modules
            set_z3_leaf_modules(model, [Block])
        if t.compile:
            model.compile_blocks()
        self.num_params, self.params_by_use = model.num_params(), model.params_by_use()  # before ZeRO-3 shards
        self.engine = build_engine(model, cfg, dist.device, load_universal=universal)
        self.ema = ShardedEMA(self.engine, t.ema_decay, t.ema_warmup) if t.ema_decay else None
        self.checkpointer = ckpt.Checkpointer(self.engine, self.ckpt_root, dist.rank, cfg.checkpoint.keep,
                                              cfg.checkpoint.async_save, dist.checkpoint_group)
        record, tokenizer, problem = data_record(self.loader.manifests)  # every checkpoint carries them
        if problem and dist.is_main:
            warnings.warn(f"checkpoints will carry no tokenizer (a release from them needs --no-tokenizer): {problem}")
        self.checkpointer.data_files = ckpt.data_files(record, tokenizer)
        self.step, self.tokens = 0, 0
        self.loss_tokens = [0, 0]  # text targets, latent loss tokens trained on so far (all ranks)
        self.stop_signal: Optional[int] = None
        self.end_reason = "not started"
        self.signals_received: tuple = ()  # by any rank, when they stopped the run before its end

    # ---- checkpoints ---------------------------------------------------------------------
    def save(self) -> Path:
        data_state = PackedLoader.merge_states(all_gather_objects(self.loader.state_dict(self.step), self.dist.control_group))
        client = {"step": self.step, "tokens": self.tokens, "loss_tokens": self.loss_tokens, "data": data_state,
                  "config": self.cfg.to_dict()}
        own = {"rng": ckpt.rng_state(), "ema": self.ema.state_dict() if self.ema else None}
        return self.checkpointer.save(self.step, client, own)

    def resume(self) -> list[str]:
        """Load the checkpoint chosen by --resume (a universal one may come from another world size);
        returns notes for the log: what the checkpoint lacked and how the run makes up for it."""
        if self.resume_from is None:
            return []
        root, tag = self.resume_from
        settings = optimizer_settings(self.engine)
        client, own = ckpt.load_checkpoint(self.engine, root, tag, self.dist.rank)
        restore_settings(self.engine, settings, self.cfg.train.lr, self.cfg.train.grad_clip)
        self.step, self.tokens = client["step"], client["tokens"]
        self.checkpointer.lineage = ckpt.read_lineage(root / tag) or self.checkpointer.lineage
        notes = changed_settings(client.get("config", {}).get("train", {}), self.cfg.train, self.engine, self.step)
        if "loss_tokens" not in client:  # checkpoints written before 2026-11-24
            notes.append(f"{root / tag} has no loss-token counts: text_tokens and latent_tokens count from 0")
        self.loss_tokens = list(client.get("loss_tokens", [0, 0]))
        self.loader.load_state_dict(client["data"], self.step)  # world-size independent
        self.cfg.data.mix_by = self.loader.cfg.mix_by  # (documents for a run older than mix_by: recorded so)
        if own is not None:  # same world size: this rank's RNG and EMA partition
            ckpt.set_rng_state(own["rng"])
        if self.ema is None:
            return notes
        if own is not None and own.get("ema") is not None:
            self.ema.load_state_dict(own["ema"])
        elif own is None and (full := ckpt.read_full_ema(root / tag)) is not None:
            self.ema.load_full(self.engine, full)
        else:  # not from the random initialisation it was copied from before the weights were loaded
            self.ema.reset(self.engine)
            notes.append(f"{root / tag} has no EMA: the EMA starts from its weights")
        return notes

    def _on_signal(self, signum, _frame) -> None:
        if self.stop_signal is None:  # the first one says why (a SIGTERM may follow Slurm's warning)
            self.stop_signal = signum

    # ---- steps ---------------------------------------------------------------------------
    def step_token_counts(self, micro: list, failed: bool = False) -> list[int]:
        """[ranks whose data ended, ranks whose data failed, text targets, latent loss tokens] of this
        optimizer step, summed over every micro-batch of every rank (one all-reduce on CPU tensors: no
        GPU sync)."""
        local = [int(len(micro) < self.cfg.train.grad_accum), int(failed)]
        local += sum((loss_token_counts(b) for b in micro), torch.zeros(2, dtype=torch.long)).tolist()
        if self.dist.world_size == 1:
            return local
        return [int(v) for v in sum_over_ranks(local, group=self.dist.control_group)]

    def accumulate(self, micro: list, counts: list[int], row_keys: list) -> dict:
        """Forward and backward of one optimizer step's micro-batches, the optimizer step itself not
        taken. Each loss is a sum over its tokens divided by `counts` (text targets, latent tokens of
        the whole step): a token weighs the same whatever it was packed with (ARCHITECTURE.md).
        `row_keys[m][b]` names row b of micro-batch m for its diffusion noise. Returns this rank's
        loss sums (device tensors: reading them waits for the GPU)."""
        sums = {"lm_sum": 0.0, "diffusion_sum": 0.0}
        for m, batch in enumerate(micro):
            self.last_batch = batch
            noise = self._noise(NOISE, batch, row_keys[m])
            out = self.engine(batch.to(self.dist.device, non_blocking=True), noise=noise, normalizer=counts,
                              return_loss=True)
            # DeepSpeed averages gradients over ranks: undo it, the normaliser already counts every rank
            self.engine.backward(out["loss"] * self.dist.world_size, scale_wrt_gas=False)
            if m < len(micro) - 1:
                self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step
            for k in sums:
                sums[k] = sums[k] + out[k]
        return sums

    def _noise(self, domain: int, batch, keys: list) -> torch.Tensor:
        """Diffusion noise of a batch, row b drawn from a generator seeded by keys[b]."""
        return row_noise(batch, [noise_generator(self.cfg.run.seed, domain, *k) for k in keys],
                         self.cfg.model.latent_patch_dim)

    def eval_noise(self, batch, loader: PackedLoader) -> torch.Tensor:
        """The noise of an evaluation batch that `loader` handed out last: the same at every evaluation."""
        return self._noise(EVAL, batch, self.row_keys(loader, batch.shape[0]))

    @staticmethod
    def row_keys(loader: PackedLoader, rows: int) -> list:
        """Noise keys of the rows of the batch `loader` handed out last: (its slot, the slot's batch
        index, row). They follow the data, not the ranks: a resume that reads the same slots on
        another split of ranks x workers draws the same noise for the same rows."""
        return [(*loader.last_position, b) for b in range(rows)]

    def train_step(self, batches) -> tuple[dict, list[int]]:
        """One optimizer step over grad_accum micro-batches -> (this rank's loss sums, the step's
        global token counts). StopIteration on every rank when any rank's data ended."""
        micro, keys, error = [], [], None
        for _ in range(self.cfg.train.grad_accum):
            batch, error = next_batch(batches)
            if batch is None:
                break
            if self.cfg.train.log_samples:
                self._log_samples(len(micro))
            micro.append(batch)
            keys.append(self.row_keys(self.loader, batch.shape[0]))
        ended, failed, *counts = self.step_token_counts(micro, error is not None)
        if failed:
            stop_if_any_failed(self.dist, error, known=True)
        if ended:
            raise StopIteration
        sums = self.accumulate(micro, counts, keys)
        self.engine.step()
        if self.ema is not None:
            self.ema.update(self.step)
        self.step += 1
        self.tokens += micro[0].tokens.numel() * self.cfg.train.grad_accum * self.dist.world_size
        self.loss_tokens = [a + b for a, b in zip(self.loss_tokens, counts)]
        return sums, counts

    def window_record(self, sums: list, counts: list, steps: int, elapsed: float, tokens: int,
                      peak: Optional[float]) -> dict:
        """The metrics of the `steps` steps since the last record: losses (this rank's `sums`, all ranks'
        `counts`), the data counters and ledger, grad norm, lr, throughput, MFU at `peak` FLOP/s and
        the busiest rank's memory high-water mark (collectives: every rank calls it)."""
        cfg, t = self.cfg, self.cfg.train
        ledger = [n for row in self.loader.ledger() for n in row]
        totals = sum_over_ranks([*sums, *self.loader.counters().values(), *ledger], self.dist.device)
        metrics = loss_record(totals[:2], counts, cfg.model)
        metrics.update({f"data/{k}": int(v) for k, v in zip(COUNTERS, totals[2:2 + len(COUNTERS)])})
        metrics.update(ledger_record([d.name for d in cfg.data.datasets], self.loader.base_ledger,
                                     totals[2 + len(COUNTERS):]))
        metrics.update(grad_norm=float(self.engine.get_global_grad_norm() or 0.0), lr=self.engine.get_lr()[0],
                       tokens_per_s=tokens / elapsed, tokens=self.tokens, text_tokens=self.loss_tokens[0],
                       latent_tokens=self.loss_tokens[1])
        flops = batch_flops(cfg.model, self.params_by_use, self.last_batch) * t.grad_accum * steps
        metrics["mfu"] = flops / elapsed / peak if peak else None
        # GPU: allocated; CPU: resident (what pretrain.plan predicts)
        metrics["memory/peak_gb"] = max_over_ranks(peak_memory(self.dist.device), self.dist.control_group) / 1e9
        return metrics

    def _log_samples(self, micro: int) -> None:
        path = Path(self.cfg.run.dir) / f"samples_rank{self.dist.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({"step": self.step + 1, "micro": micro, "docs": self.loader.last_keys,
                                "datasets": self.loader.last_datasets}) + "\n")

    # ---- the run -------------------------------------------------------------------------
    def run(self) -> int:
        cfg, t = self.cfg, self.cfg.train
        notes = self.resume()
        log = RunLogger(cfg, self.dist.is_main, self.step)
        log.message(f"{self.num_params / 1e6:.1f}M parameters, {self.dist.world_size} rank(s) on "
                    f"{self.dist.device.type}, ZeRO-{t.zero_stage}, from step {self.step}")
        for note in notes:
            log.message(note)
        names = [d.name for d in cfg.data.datasets]  # the mixture from here on, and the ledger so far
        log.record(self.step, {MIXTURE: mixture_config(cfg.data),
                               **ledger_record(names, self.loader.base_ledger,
                                              [n for row in self.loader.ledger(every_slot=True) for n in row])})
        if self.lock is not None and self.lock.previous:
            log.message(f"run.dir: took over the lock of {self.lock.previous} (that process is gone)")
        job = job_history.slurm_job()
        if job is not None and self.dist.is_main:
            job_history.record(cfg.run.dir, "start", self.step, ranks=self.dist.world_size)
            log.message(f"Slurm job {job['job']}" + (f", requeued {job['restart']} time(s)" if job["restart"] else ""))
        for sig in self.stop_signals:
            signal.signal(sig, self._on_signal)
        if self.early_signals and self.stop_signal is None:  # e.g. a requeued job signalled while starting
            self.stop_signal = self.early_signals[0]
        peak = peak_flops(t.peak_tflops, self.dist.device)
        batches = iter(self.loader)
        window_sums, window_counts = [0.0, 0.0], [0, 0]  # loss sums (this rank), token counts (all ranks)
        window_steps, window_start, window_tokens = 0, time.time(), self.tokens
        saved_at, self.end_reason = self.step, FINISHED
        first_record = {"requeues": job["restart"]} if job is not None else {}
        last = t.stop_at or t.max_steps
        while self.step < last:
            try:
                sums, counts = self.train_step(batches)
            except StopIteration:
                log.message(f"data exhausted at step {self.step} (data.num_epochs={cfg.data.num_epochs})")
                self.end_reason = "data exhausted"
                break
            window_sums = [window_sums[0] + sums["lm_sum"], window_sums[1] + sums["diffusion_sum"]]
            window_counts = [a + b for a, b in zip(window_counts, counts)]
            window_steps += 1
            metrics, first_record = first_record, {}
            if self.step % t.log_interval == 0 or self.step == last:
                metrics.update(self.window_record(window_sums, window_counts, window_steps,
                                                  time.time() - window_start, self.tokens - window_tokens, peak))
                window_sums, window_counts = [0.0, 0.0], [0, 0]
                window_steps, window_start, window_tokens = 0, time.time(), self.tokens
            stop = any_rank(self.stop_signal is not None, self.dist.control_group)
            evaluate = t.eval_interval and (self.step % t.eval_interval == 0 or self.step == t.max_steps)
            if evaluate and not stop:  # a stop: checkpoint first
                eval_start = time.time()
                if cfg.data.eval_datasets:
                    metrics.update(held_out_losses(self.engine, cfg, self.dist, self.eval_noise))
                grid, quality = self.eval_sampler.sample(self.engine, self.ema, self.step, self.dist)
                if grid is not None:
                    log.log_images(self.step, "samples", grid)
                metrics.update(quality, eval_seconds=time.time() - eval_start)
                window_start += metrics["eval_seconds"]  # tokens_per_s and mfu count training time only
            log.log(self.step, metrics, advance=1)
            if stop or self.step % cfg.checkpoint.interval == 0:
                path = self.save()
                saved_at = self.step
                log.message(f"checkpoint {path}" + (" (writing)" if self.checkpointer.busy() else ""))
            if stop and self.step < t.max_steps:  # a signal in the last step: the run is finished
                received = all_gather_objects(self.stop_signal, self.dist.control_group) \
                    if self.dist.world_size > 1 else [self.stop_signal]
                self.signals_received = tuple(sorted({s for s in received if s is not None}))
                self.end_reason = "signal " + "+".join(signal.Signals(s).name for s in self.signals_received)
                log.message(f"stopping on {self.end_reason} at step {self.step}")
                break
        if self.end_reason == FINISHED and self.step < t.max_steps:  # train.stop_at
            self.end_reason = f"train.stop_at={t.stop_at}"
            log.message(f"stopping at step {self.step} (train.stop_at); --resume auto goes on to {t.max_steps}")
        if saved_at != self.step:
            log.message(f"checkpoint {self.save()}" + (" (writing)" if self.checkpointer.busy() else ""))
        if self.checkpointer.busy():
            log.message("waiting for the checkpoint in flight to reach the disk")
        code = 0  # the end, a stop signal: the last checkpoint is on disk and `latest` names it
        if not self.checkpointer.settle():
            self.end_reason, code = f"{self.end_reason}; its last checkpoint could not be written", 1
        if self.dist.is_main:
            job_history.record(cfg.run.dir, "end", self.step, reason=self.end_reason)
        log.close()
        if self.lock is not None:
            self.lock.release()
        return code


@dataclasses.dataclass
class Outcome:
    code: int  # the exit code: 0 = finished or stopped by a signal (checkpointed), 1 = its last checkpoint
               # could not be written, 2 = bad input
    stop_signals: tuple = ()  # the signals (received by any rank) that stopped the run before its end
    step: int = 0


def main(argv=None) -> int:
    return run_training(argv).code


def run_training(argv=None, stop_signals=STOP_SIGNALS, early_signals=()) -> Outcome:
    """The command line of this module, run in this process -> what came of it. `early_signals`:
    stop signals a launcher caught before this was called (the run stops after its first step)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML experiment config")
    p.add_argument("--resume", default="auto", help="auto (latest in run.dir), none, or a checkpoint folder")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    args, unknown = p.parse_known_intermixed_args(argv)  # overrides may come before and after options
    unknown = [u for u in unknown if not u.startswith("--local_rank") and not u.startswith("--local-rank")]
    try:
        if unknown:
            raise ConfigError(f"unknown argument(s): {' '.join(unknown)}")
        cfg = load_config(ExperimentConfig, args.config, args.overrides)
    except ConfigError as e:
        say_error(f"error: {e}")
        return Outcome(2)
    # DeepSpeed 0.19 calls this deprecated torch API on every step; the warning is not ours to fix.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    trainer, early = None, list(early_signals)
    for sig in stop_signals:  # a signal during start-up stops the run after its first step, checkpointed
        signal.signal(sig, lambda signum, _frame: early.append(signum))
    if "RANK" in os.environ:  # started by a launcher (torchrun, deepspeed, srun): do not outlive it
        exit_with_parent(f"rank {os.environ['RANK']}",
                         lambda: bool(early) or (trainer is not None and trainer.stop_signal is not None))
    try:
        dist = init_distributed()
    except LaunchError as e:
        say_error(f"error: {e}")
        return Outcome(2)
    try:
        trainer = Trainer(cfg, dist, args.resume, stop_signals, early)
        code = trainer.run()
        return Outcome(code, trainer.signals_received, trainer.step)
    except RunDirBusy as e:  # the same on every rank: said once
        if dist.is_main:
            say_error(f"error: {e}")
        return Outcome(2)
    except (ConfigError, DataError, InputMissing) as e:  # bad input: one line, no traceback
        say_error(f"error{f' (rank {dist.rank})' if dist.world_size > 1 else ''}: {e}")
        return Outcome(2)
    finally:  # a failure: a checkpoint written in the background is committed if every rank gets there
        if trainer is not None and trainer.checkpointer.busy():
            trainer.checkpointer.settle(timeout_s=120.0)


if __name__ == "__main__":
    run_and_exit(main)
