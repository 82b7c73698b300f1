#!/usr/bin/env bash
# Prepare a GPU device call (run here, on the developer machine): wheels for the packages the
# device image lacks (Python 3.12, x86-64) into .whl/, and the shared reference benchmark into .gpu/.
# Both folders are ignored by git; name them in the device call's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
for d in /.whl/ /.gpu/; do grep -qx "$d" "$EXCLUDE" 2>/dev/null || echo "$d" >> "$EXCLUDE"; done
rm -rf .whl .gpu && mkdir -p .whl .gpu
cp ../shared/bench/reference_step.py .gpu/
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# versions as installed here, so the device runs what the tests ran
pin() { .venv/bin/python -c "import importlib.metadata as m; print('$1=='+m.version('$1'))"; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d .whl "$(pin webdataset)" "$(pin braceexpand)" "$(pin diffusers)" "$(pin hjson)" \
    "$(pin pydantic)" "$(pin pydantic_core)" "$(pin annotated_types)" "$(pin typing_inspection)" \
    "$(pin typing_extensions)"  # pydantic needs a newer one than some images hold
# deepspeed is published as source only: build its pure-Python wheel here
.venv/bin/python -m pip wheel -q --no-deps -w .whl "$(pin deepspeed)"
ls -la .whl .gpu
du -sh .whl
