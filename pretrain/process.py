"""How a process that joins a process group ends: `run_and_exit(main)` in each such entry point
(pretrain.train, slurm.task, slurm.boot for submitit, the test and bench launchers).

It ends the process as `sys.exit(main())` would, but without the interpreter's teardown. There, a
gloo worker thread that releases a collective's tensors a moment after the collective returned must
take the GIL; if Python is finalizing by then, the thread is ended inside a noexcept destructor and
the rank aborts ("terminate called without an active exception", SIGABRT; pytorch/pytorch#190489,
torch 2.13): a finished, checkpointed run is reported failed. Seen on 2-3 CPU ranks under load,
right after the last collective. Destroying the process groups does not help: DeepSpeed keeps them,
so their worker threads are not joined. This module imports no torch (slurm.task's
should-requeue runs on the batch host)."""
import atexit
import ctypes
import gc
import io
import os
import sys
import threading
import traceback
from typing import Callable, NoReturn

KEYBOARD_INTERRUPT_STATUS = 130  # as a shell reports a command ended by SIGINT


def run_and_exit(main: Callable[[], object]) -> NoReturn:
    """Run `main()` and end the process with its status (its return value or SystemExit's code; an
    uncaught exception prints its traceback and gives status 1), through `exit_process`."""
    try:
        code = main()
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:
        traceback.print_exc()
        code = KEYBOARD_INTERRUPT_STATUS
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    exit_process(code)


def exit_process(code=0) -> NoReturn:
    """End the process with `code` read as sys.exit reads it (None: 0, a message: printed, 1) after
    what a normal exit does first: non-daemon threads joined, atexit handlers run (wandb, logging,
    multiprocessing's children such as DataLoader workers), then open Python files and C stdio
    flushed (not closed); then os._exit, skipping the interpreter's teardown."""
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for step in (getattr(threading, "_shutdown", None), getattr(atexit, "_run_exitfuncs", None)):
        try:
            if step is not None:
                step()
        except BaseException:  # reported, as the interpreter's own exit does; the exit goes on
            traceback.print_exc()
    writers = (io.TextIOWrapper, io.BufferedWriter, io.BufferedRandom)
    for f in [*(f for f in gc.get_objects() if issubclass(type(f), writers)), sys.stdout, sys.stderr]:
        try:
            f.flush()
        except Exception:  # closed, not writable, or a pipe whose reader is gone
            pass
    try:
        ctypes.CDLL(None).fflush(None)  # C stdio (NCCL_DEBUG, DeepSpeed's printf): exit() would flush it
    except Exception:
        pass
    os._exit(code & 0xFF)
