"""Build DeepSpeed's JIT ops that a CPU run loads (`make install` runs this once).

DeepSpeed compiles its shared-memory all-reduce (ShareMemCommBuilder) the first time a process
group starts on the CPU accelerator, and again for every new virtual environment (the build is
keyed by the sources' path): about a minute that would otherwise land in the first training
run. Without a compiler or on a GPU machine this says why and does nothing.
"""
import os
import sys


def main() -> int:
    import torch
    if torch.cuda.is_available():
        print("prebuild_ops: CUDA present, nothing to build for the CPU accelerator")
        return 0
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from deepspeed.accelerator import get_accelerator
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is None:
            print("prebuild_ops: this DeepSpeed has no ShareMemCommBuilder")
            return 0
        builder.load(verbose=False)
    except Exception as e:  # the op is optional: DeepSpeed falls back to plain torch.distributed
        print(f"prebuild_ops: not built ({type(e).__name__}: {e}); the first run will try again")
        return 0
    print(f"prebuild_ops: {builder.absolute_name()} ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
