#!/usr/bin/env bash
# The CUDA path: set up a virtual environment with jax[cuda12] and run training on this GPU machine.
#
#   launch/gpu_train.sh [--dry-run] [train flags...]    e.g. launch/gpu_train.sh --config configs/oss20b_gpu.py
#
# One process drives all local GPUs (a single-host mesh); NCCL carries the collectives. The venv is
# .venv-cuda in the checkout, made (pip install -e '.[cuda]') on the first run. --dry-run prints the
# commands instead of running them; `-- --help` shows the trainer's own flags.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
dry_run=0
while (($#)); do
  case $1 in
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
  shift
done

run() {
  if ((dry_run)); then printf '%q ' "$@" | sed 's/ $//'; echo; else "$@"; fi
}

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
((dry_run)) && echo "cd $(printf '%q' "$here")"
if [[ ! -x .venv-cuda/bin/python ]]; then
  run python3 -m venv .venv-cuda
  run .venv-cuda/bin/pip install -q -U pip
  run .venv-cuda/bin/pip install -q -e '.[cuda]'
fi
run .venv-cuda/bin/python -c "import jax; d = jax.devices(); assert d[0].platform == 'gpu', d; print('GPUs:', d)"
# Let XLA use most of the GPU memory up front (its default is 75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
if ((dry_run)); then
  run env XLA_PYTHON_CLIENT_MEM_FRACTION="$XLA_PYTHON_CLIENT_MEM_FRACTION" \
    .venv-cuda/bin/python -m numina_jax.train "$@"
  exit 0
fi
exec .venv-cuda/bin/python -m numina_jax.train "$@"
