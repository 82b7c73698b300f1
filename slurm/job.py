"""What submitit runs in every task of a training job: the torch.distributed environment from
Slurm's, then the trainer in this process, resuming from `latest`.

Slurm sends submitit's signal (SIGUSR2) to every task `signal_delay_s` before the time limit.
The trainer takes it as a stop signal: it finishes the step, every rank writes its part of a
checkpoint, and then submitit's own handler, called here on every rank, requeues the job
from rank 0 (through `checkpoint()`, which resubmits this same callable). The requeued job
resumes from the checkpoint. A preemption (`scontrol requeue`, or a preempting partition)
sends SIGTERM: the trainer checkpoints if it can within Slurm's KillWait, and Slurm requeues.
"""
from __future__ import annotations

import hashlib
import os
import signal
from typing import Sequence

import submitit
from submitit.core.utils import UncompletedJobError
from submitit.helpers import TorchDistributedEnvironment

EARLY_SIGNALS: list = []  # stop signals caught by slurm.boot before the trainer's handlers existed

PORTS = (15000, 32000)  # below Linux's default ephemeral range (32768-60999), the same on every node


def master_port(job_id: str) -> int:
    """A port derived from the job id (SLURM_JOB_ID: unique per array task too): every task computes
    the same one without talking, and it is not in the ephemeral range, where an outgoing
    connection on the node could hold it (submitit's random 20000-60000 overlaps that range)."""
    digest = int(hashlib.sha1(str(job_id).encode()).hexdigest(), 16)
    return PORTS[0] + digest % (PORTS[1] - PORTS[0])


def requeue_signal() -> int:
    """The signal submitit asked Slurm to send before the time limit (SUBMITIT_PREEMPT_SIGNAL)."""
    return getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, requeue_signal())  # the trainer's, and submitit's


class TrainJob(submitit.helpers.Checkpointable):
    """`python -m pretrain.train --config CONFIG --resume auto OVERRIDES` in every task of a job."""

    def __init__(self, config: str, overrides: Sequence[str], max_requeues: int):
        self.config, self.overrides, self.max_requeues = str(config), list(overrides), max_requeues

    def __call__(self) -> int:
        usr = requeue_signal()
        submitit_handler = signal.getsignal(usr)  # checkpoint_and_try_requeue, installed before this call
        for sig in STOP_SIGNALS:  # until the trainer's own handlers: note the signal, as slurm.boot does
            signal.signal(sig, lambda signum, _frame: EARLY_SIGNALS.append(signum))
        from pretrain.job_history import slurm_job  # here, not at import: slurm.boot imports this module
        from pretrain.train import run_training
        os.environ["MASTER_PORT"] = str(master_port(os.environ["SLURM_JOB_ID"]))
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        restarts = slurm_job()["restart"]
        if restarts > self.max_requeues:  # a preempted job is requeued by Slurm itself, past our count
            raise UncompletedJobError(f"requeued {restarts} times, more than --max-requeues {self.max_requeues}: "
                                      "not training; resubmit to go on from `latest`")
        outcome = run_training(["--config", self.config, "--resume", "auto", *self.overrides],
                               stop_signals=STOP_SIGNALS, early_signals=EARLY_SIGNALS)
        if outcome.code:
            raise RuntimeError(f"training exited with code {outcome.code} (see this task's log)")
        if usr in outcome.stop_signals:  # some rank got the time-limit signal: all checkpointed
            if restarts >= self.max_requeues:
                raise UncompletedJobError(f"the time limit came after {restarts} requeues (--max-requeues "
                                          f"{self.max_requeues}): checkpointed, not requeued; resubmit to go on")
            submitit_handler(usr, None)  # rank 0: checkpoint() -> requeue -> exit; other ranks: return
        return outcome.step

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """The state is in the run's checkpoints: requeue the same call (it resumes from `latest`)."""
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
