# monofusion: `make demo` runs the main job from a fresh clone, `make test` the suite.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-fast clean

install: $(VENV)/.installed

# torch first, then everything else under a constraint that pins it, so that no
# dependency (nor a package's isolated build environment) pulls another torch.
$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	echo "torch==$(TORCH_VERSION)" > $(VENV)/constraints.txt
	PIP_CONSTRAINT=$(abspath $(VENV))/constraints.txt $(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(PY) -m model.overfit --config configs/tiny-cpu.yaml

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
