"""torch.distributed setup for one process or many (torchrun, the deepspeed launcher, or on Slurm
one task per GPU through slurm.submit / slurm/train.sbatch, or one task per node running torchrun)."""
from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import sys

import torch


# How long a collective may wait for a rank (every group: DeepSpeed's own default is 10 min, torch's 30).
# A rank retrying a remote read holds the others in the step's collective: data.retry_budget fits in it.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)


class LaunchError(RuntimeError):
    """The processes were started in a way that cannot form one run."""


@dataclasses.dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    control_group: object = None  # gloo group for host-side flags (None: the default group is gloo)
    checkpoint_group: object = None  # gloo group of the checkpoint writer threads only (None on one rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Join the process group described by RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (a single
    process when they are absent): NCCL on GPU, gloo on CPU (DeepSpeed's CPU accelerator)."""
    cuda = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))
    gpus = os.environ.get("SLURM_GPUS_ON_NODE", "0")
    if not cuda and gpus.isdigit() and int(gpus) > 0:  # else this rank would pick gloo, the others NCCL
        raise LaunchError(f"Slurm gave this task GPUs (SLURM_GPUS_ON_NODE={gpus}) but torch sees no CUDA device")
    if "RANK" not in os.environ and tasks > 1:  # else each task would train alone, into the same run.dir
        raise LaunchError(f"srun started {tasks} tasks without a torch.distributed environment (RANK unset): "
                          "start one task per node that runs torchrun --nproc-per-node G -m pretrain.train ...")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    import deepspeed
    if not cuda:  # its shared-memory op, built and loaded where no stale build lock can hang the run
        from pretrain.prebuild_ops import load_cpu_ops
        loaded, outcome = load_cpu_ops()
        if not loaded:
            print(f"warning: DeepSpeed's shared-memory op: {outcome}", file=sys.stderr, flush=True)
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:  # a site that binds one GPU per task shows each task only its own (device 0)
        local_rank %= torch.cuda.device_count()
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False, timeout=PROCESS_GROUP_TIMEOUT)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    # Host-side agreement (stop on a signal?) goes through gloo so that it never waits on the GPU stream.
    control = torch.distributed.new_group(backend="gloo", timeout=PROCESS_GROUP_TIMEOUT) if cuda else None
    # A background checkpoint commit agrees over its own group: collectives of one group stay on one thread.
    world = torch.distributed.get_world_size()
    writers = torch.distributed.new_group(backend="gloo", timeout=PROCESS_GROUP_TIMEOUT) if world > 1 else None
    return DistInfo(torch.distributed.get_rank(), world, local_rank, device, control, writers)


def all_gather_objects(obj, group=None) -> list:
    """Every rank's `obj` (picklable), gathered over `group` (gloo: CPU tensors, no GPU sync)."""
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj, group=group)
    return out


def max_over_ranks(value: float, group=None) -> float:
    """The largest of every rank's `value` (a CPU tensor: `group` must be gloo)."""
    t = torch.tensor([float(value)], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=group)
    return t.item()


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank when `flag` is true on any rank (a CPU tensor: `group` must be gloo)."""
    return max_over_ranks(1 if flag else 0, group) > 0


def sum_over_ranks(values: list, device=None, group=None) -> list[float]:
    """Sum over ranks of each value (numbers or 0-dim tensors, which are read only here). With a gloo
    `group` (CPU tensors) this never waits on the GPU stream."""
    t = torch.stack([torch.as_tensor(v, device=device).to(torch.float64) for v in values])
    torch.distributed.all_reduce(t, group=group)
    return t.tolist()
