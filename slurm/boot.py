"""The Python of a submitit task: `python -m slurm.boot -u -m submitit.core._submit FOLDER`.

Slurm may send the time-limit signal (USR2) or a preemption's SIGTERM while the task is still
starting: before submitit installs its handler, USR2's default action would kill the task (and
the job would fail instead of requeueing). This catches the stop signals from the first instant
and hands them to the trainer (slurm.job.EARLY_SIGNALS), which then stops after its first step
with a checkpoint; then runs the module as `python -u -m MODULE ARGS` would (Python's streams
unbuffered) and ends the process through pretrain.process.run_and_exit (a finished rank must not
abort in the interpreter's teardown).
"""
import runpy
import signal
import sys

from pretrain.process import run_and_exit
from slurm.job import EARLY_SIGNALS, STOP_SIGNALS


def main() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, _frame: EARLY_SIGNALS.append(signum))
    args = sys.argv[1:]
    if args[:1] == ["-u"]:
        sys.stdout.reconfigure(line_buffering=True, write_through=True)
        sys.stderr.reconfigure(line_buffering=True, write_through=True)
        args = args[1:]
    if args[:1] != ["-m"] or len(args) < 2:
        sys.exit(f"usage: python -m slurm.boot [-u] -m MODULE [ARGS...], got {sys.argv[1:]}")
    sys.argv = [args[1], *args[2:]]
    runpy.run_module(args[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    run_and_exit(main)
