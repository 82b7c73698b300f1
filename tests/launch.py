"""Launch the trainer on N CPU ranks for tests (torchrun, or bare processes for signal tests)."""
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

from pretrain.distributed import free_port

REPO = Path(__file__).resolve().parents[1]


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    path = os.pathsep.join([str(REPO)] + [p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p])
    return dict(e, OMP_NUM_THREADS="1", WANDB_SILENT="true", PYTHONPATH=path, **extra)


def torchrun(n: int, args: list, extra_env: dict = None, timeout: int = 300,
             module: str = "pretrain.train") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
           str(free_port()), "-m", module, *args]
    return subprocess.run(cmd, cwd=REPO, env=env(**(extra_env or {})), capture_output=True, text=True,
                          timeout=timeout)


def resume_probe(n: int, config, resume, out: Path, *overrides: str) -> dict:
    """What the live engine holds right after a resume on n ranks (tests/resume_probe.py)."""
    r = torchrun(n, ["--config", str(config), "--resume", str(resume), "--out", str(out), "wandb.mode=disabled",
                     *overrides], module="tests.resume_probe")
    assert r.returncode == 0, r.stderr[-3000:]
    import torch
    return torch.load(out, weights_only=False)


def train_cli(args: list, **extra_env) -> subprocess.CompletedProcess:
    """`python -m pretrain.train ARGS` as one process, without a launcher."""
    return subprocess.run([sys.executable, "-m", "pretrain.train", *args], cwd=REPO, env=env(**extra_env),
                          capture_output=True, text=True)


def error_line(r: subprocess.CompletedProcess) -> str:
    """The last line a failed command wrote to stderr (its one-line error)."""
    return r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""


def spawn_ranks(n: int, args: list, log_dir: Path) -> list:
    """Start n rank processes directly, each in its own process group (signal it with os.killpg, as
    Slurm signals every process of a job step, DataLoader workers included)."""
    port = str(free_port())
    procs = []
    for r in range(n):
        e = env(RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        out = open(log_dir / f"rank{r}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "pretrain.train", *args], cwd=REPO, env=e,
                                      stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def start_probe(parser, argv=None) -> tuple:
    """A probe run under torchrun: `parser` (its own options) gains --config and key=value overrides ->
    (the parsed arguments, the config, this rank's process group)."""
    from model.config_system import load_config
    from pretrain.config import ExperimentConfig
    from pretrain.distributed import init_distributed
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    return args, load_config(ExperimentConfig, args.config, args.overrides), init_distributed()


def metrics(run_dir: Path) -> dict:
    """step -> logged record (the last one logged for that step; not the records of the mixture a start
    runs with)."""
    from pretrain.metrics import MIXTURE
    path = Path(run_dir) / "metrics.jsonl"
    records = map(json.loads, path.read_text().splitlines()) if path.is_file() else ()
    return {r["step"]: r for r in records if MIXTURE not in r}


def cleanup_shm() -> None:
    for f in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"):
        try:
            os.unlink(f)
        except OSError:
            pass
