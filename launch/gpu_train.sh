#!/usr/bin/env bash
# The CUDA path: set up a virtual environment with jax[cuda12] and run training on this GPU machine.
#
#   launch/gpu_train.sh [train flags...]    e.g. launch/gpu_train.sh --config configs/oss20b_gpu.py
#
# One process drives all local GPUs (a single-host mesh); NCCL carries the collectives.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
if [[ ! -x .venv-cuda/bin/python ]]; then
  python3 -m venv .venv-cuda
  .venv-cuda/bin/pip install -q -U pip
  .venv-cuda/bin/pip install -q -e '.[cuda]'
fi
.venv-cuda/bin/python -c "import jax; d = jax.devices(); assert d[0].platform == 'gpu', d; print('GPUs:', d)"
# Let XLA use most of the GPU memory up front (its default is 75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
exec .venv-cuda/bin/python -m numina_jax.train "$@"
