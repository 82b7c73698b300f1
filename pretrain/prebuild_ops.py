"""DeepSpeed's JIT op that a CPU run loads: built once per environment, never waited on in silence.

DeepSpeed compiles its shared-memory all-reduce (ShareMemCommBuilder) the first time a process
group starts on the CPU accelerator. torch builds it under TORCH_EXTENSIONS_DIR, by default one
folder in the user's home shared by every environment (a cluster's shared home: every node), and
guards the build with a `lock` file that a killed build leaves behind: every later run then sleeps
forever before its first step. Here:
- the build goes into the environment itself (`<sys.prefix>/torch_extensions`), unless
  TORCH_EXTENSIONS_DIR is set; `make install` builds it there (`python -m pretrain.prebuild_ops`);
- every build or load of the op holds `monofusion-build.lock` (flock, with host and pid inside). Its
  holder is the only possible builder on this host, so a torch `lock` found by the next holder is
  stale (its builder died): it is removed, and the run says so. A lock naming another host (flock
  may be node-local on a network file system) is waited for, with a line every 30 s, and taken
  over as stale after `STALE_AFTER_S`.
"""
import contextlib
import fcntl
import os
import socket
import sys
import time
from pathlib import Path

GUARD = "monofusion-build.lock"
STALE_AFTER_S = 600.0  # a build takes about a minute; a torch lock this old is left by a dead builder


def extensions_dir() -> Path:
    """Where this environment's JIT ops are built: TORCH_EXTENSIONS_DIR, set to the environment's
    folder when unset and the environment is writable (else torch's default, in the home)."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        mine = Path(sys.prefix) / "torch_extensions"
        try:
            mine.mkdir(exist_ok=True)
            if os.access(mine, os.W_OK):
                os.environ["TORCH_EXTENSIONS_DIR"] = str(mine)
        except OSError:
            pass
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    from torch.utils.cpp_extension import get_default_build_root
    return Path(get_default_build_root())


def _say(line: str) -> None:
    sys.stderr.write(f"{line}\n")
    sys.stderr.flush()


@contextlib.contextmanager
def build_guard(poll_s: float = 1.0, report_every_s: float = 30.0):
    """Hold this environment's build lock; remove torch build locks its holder proves stale."""
    root = extensions_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / GUARD, "a+") as f:
        start, said = time.time(), 0.0
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.time() - start - said >= report_every_s:
                    said = time.time() - start
                    f.seek(0)
                    _say(f"waiting {said:.0f} s for {f.read().strip() or 'another process'} building DeepSpeed's "
                         f"ops in {root}")
                time.sleep(poll_s)
        f.seek(0)
        holder = f.read().strip()
        host = socket.gethostname()
        for baton in [*root.glob("*/lock"), *root.glob("*/*/lock")]:  # torch's FileBaton of one op's build
            age = time.time() - baton.stat().st_mtime
            if holder and f"host={host} " not in holder + " " and age < STALE_AFTER_S:
                waited = time.time()
                while baton.exists() and time.time() - baton.stat().st_mtime < STALE_AFTER_S:
                    if time.time() >= waited:
                        _say(f"{baton}: a build by {holder} may be running on another host; waiting for it "
                             f"(removed as stale {STALE_AFTER_S:.0f} s after it began)")
                        waited = time.time() + report_every_s
                    time.sleep(poll_s)
                age = time.time() - baton.stat().st_mtime if baton.exists() else 0.0
            if baton.exists():
                _say(f"{baton}: removing a stale build lock (its build was killed; {age:.0f} s old)")
                baton.unlink(missing_ok=True)
        f.seek(0)
        f.truncate()
        f.write(f"host={host} pid={os.getpid()}\n")
        f.flush()
        try:
            yield root
        finally:
            f.seek(0)
            f.truncate()
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)


def load_cpu_ops() -> tuple[bool, str]:
    """Build (once) and load the CPU accelerator's shared-memory op under the guard, before
    deepspeed.init_distributed loads it -> (False when it failed, what happened)."""
    import torch
    if torch.cuda.is_available():
        return True, "CUDA present, nothing to build for the CPU accelerator"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from deepspeed.accelerator import get_accelerator
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is None:
            return True, "this DeepSpeed has no ShareMemCommBuilder"
        root, name = extensions_dir(), builder.name
        if any(root.glob(f"**/{name}/{name}.so")) and not any(root.glob(f"**/{name}/lock")):
            builder.load(verbose=False)  # built and no build under way: loading needs no guard (ranks in parallel)
        else:
            with build_guard():
                builder.load(verbose=False)
    except Exception as e:  # the op is optional: DeepSpeed falls back to plain torch.distributed
        return False, f"not built ({type(e).__name__}: {e}); the next run will try again"
    return True, f"{builder.absolute_name()} ready in {extensions_dir()}"


def main() -> int:
    print(f"prebuild_ops: {load_cpu_ops()[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
