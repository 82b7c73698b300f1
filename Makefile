# monofusion: `make demo` runs the main job from a fresh clone, `make test` the suite.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install data demo test test-fast slurm-up slurm-down clean
DEMO_DIR ?= runs/demo

install: $(VENV)/.installed

# torch first, then everything else under a constraint that pins it, so that no
# dependency (nor a package's isolated build environment) pulls another torch.
$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	echo "torch==$(TORCH_VERSION)" > $(VENV)/constraints.txt
	PIP_CONSTRAINT=$(abspath $(VENV))/constraints.txt $(PY) -m pip install -q -e ".[dev]"
	@# DeepSpeed JIT-builds its CPU shared-memory all-reduce at the first engine of a new venv (~1 min): now, once
	$(PY) -m pretrain.prebuild_ops
	touch $@

# Text for the demo: Debian's Python documentation sources (skipped without apt or root;
# the demo then falls back to the standard library's own documentation).
data: install
	@dpkg -s python3.11-doc >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		(apt-get update -qq && apt-get install -y -qq python3.11-doc >/dev/null) || \
		echo "python3.11-doc not installed: using the standard library's docs"; }
	$(PY) -m data_pipelines.demo_data --out $(DEMO_DIR)/data

# Train tiny-cpu on 2 CPU ranks under ZeRO-2 on digits both ways (text-to-image and image-to-text)
# beside text, stop half-way (as a preemption would), resume from `latest`, summarize, then draw
# each digit and read the drawings back with the digit classifier, and caption the 300 held-out digits.
TORCHRUN := $(PY) -m torch.distributed.run --nproc-per-node 2
demo: data
	rm -rf $(DEMO_DIR)/run
	$(TORCHRUN) -m pretrain.train --config configs/tiny-cpu.yaml run.dir=$(DEMO_DIR)/run train.stop_at=400
	@echo "--- stopped at step 400; resuming from latest ---"
	$(TORCHRUN) -m pretrain.train --config configs/tiny-cpu.yaml run.dir=$(DEMO_DIR)/run --resume auto
	$(PY) -m pretrain.summary $(DEMO_DIR)/run
	$(PY) -m pretrain.quality --model $(DEMO_DIR)/run --task both --per-digit 8 --out $(DEMO_DIR)/digits.png
	$(PY) -m pretrain.sample --model $(DEMO_DIR)/run --kind text --prompt "The Python tutorial" \
		--max-new-tokens 40 --temperature 0.8 --top-p 0.9

# img2dataset, the tests' source of real webdataset shards, in a venv of its own (it pins webdataset<0.3)
IMG2DATASET_VENV ?= .venv-img2dataset
$(IMG2DATASET_VENV)/.installed:
	test -x $(IMG2DATASET_VENV)/bin/python || python3 -m venv $(IMG2DATASET_VENV)
	$(IMG2DATASET_VENV)/bin/pip install -q img2dataset==1.47.0
	touch $@

test: install $(IMG2DATASET_VENV)/.installed
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# A real two-node Slurm on this machine (root): `export SLURM_CONF=...` as printed, then sbatch/srun/slurm.submit.
SLURM_DIR ?= /tmp/monofusion-slurm
slurm-up: install
	$(PY) -m slurm.local_cluster up --dir $(SLURM_DIR) --nodes 2

slurm-down: install
	$(PY) -m slurm.local_cluster down --dir $(SLURM_DIR)

clean:
	rm -rf $(VENV) $(IMG2DATASET_VENV) .pytest_cache
