# Two commands: `make demo` and `make test`. Both create .venv/ on first use and reuse it after.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.13.0+cpu lies on local disk on our machines; pip finds it through this folder.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
export OMP_WAIT_POLICY := PASSIVE

.PHONY: demo test venv lint clean-venv

$(VENV)/.installed: requirements/cpu.txt setup.cfg setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# pip 26.3+ refuses merlin-dataloader 23.08 (git URL in its dev extra).
	$(PY) -m pip install -q 'pip<26.3' setuptools wheel
	$(PY) -m pip install $(FIND_LINKS) -r requirements/cpu.txt
	# torchrec without deps: its metadata pulls the CUDA fbgemm-gpu, which overwrites the CPU wheel.
	$(PY) -m pip install --no-deps torchrec==1.8.0
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	$(PY) -c "import torch, torchrec, fbgemm_gpu, nvtabular, torchrec_mamba; print('stack ok: torch', torch.__version__, 'torchrec', torchrec.__version__)"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

demo: venv
	$(PY) examples/retailrocket/run.py

lint: venv
	$(PY) -m ruff check torchrec_mamba preprocessing tests benchmarks examples

clean-venv:
	rm -rf $(VENV)
