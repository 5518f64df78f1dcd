"""Fine-tune gpt-oss with the NuminaMath recipe.

  python -m numina_jax.train                                  # the embedded CPU demo (configs/default.py)
  python -m numina_jax.train --config configs/oss120b_v5.py --config.lr=3e-5
  python -m numina_jax.train --config configs/oss120b_v5.py:tir   # stage 2 (tool-integrated reasoning)

Every field of the config can be overridden as --config.FIELD=VALUE (e.g. --config.data.dataset_name=...).
Rerunning the same command resumes from the latest checkpoint in the workdir. On several hosts every host runs
the same command with --config.multihost=True (the coordinator is auto-detected on Cloud TPU, SLURM, Open MPI
and Kubernetes; elsewhere set --config.distributed.coordinator_address/num_processes/process_id).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

from absl import app
from ml_collections import config_flags

REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEFAULT_CONFIG = os.path.join(REPO_CONFIGS, "default.py")

_CONFIG = None  # defined in main(), after the overrides were checked: ml_collections reads them at definition


def load_config_file(spec: str):
  """Loads `path[:arg]` the way config_flags does (used to check overrides before flag parsing)."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"--config: no config file at {path}")
  mod_spec = importlib.util.spec_from_file_location("_numina_config", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(arg) if arg else mod.get_config()


def _config_arg(argv: list[str]) -> str:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return DEFAULT_CONFIG


def precheck(argv: list[str]) -> None:
  """Unknown `--config.X` overrides and bad config paths become one-line errors rather than tracebacks."""
  from numina_jax.config import check_overrides
  if any(a in ("-h", "--help", "--helpfull", "--helpshort") for a in argv):
    return
  try:
    cfg = load_config_file(_config_arg(argv))
    check_overrides(cfg, argv)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  _quiet_logs()
  from numina_jax.distributed import DistributedStartError
  from numina_jax.trainer import NonFiniteLossError, train
  cfg = _CONFIG.value
  try:
    result = train(cfg)
  except (NonFiniteLossError, DistributedStartError, ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  _print_summary(result)


def _quiet_logs() -> None:
  """Our own INFO lines on stderr; orbax's and absl's per-write chatter only from WARNING up."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  log = logging.getLogger("numina_jax")
  if not log.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log.addHandler(handler)
  log.setLevel(logging.INFO)
  log.propagate = False


def _print_summary(result: dict) -> None:
  stages = [result[k] for k in ("stage1", "stage2") if k in result] or [result]
  for r in stages:
    line = f"[{r.get('workdir')}] steps {r.get('start_step')} -> {r.get('final_step')} of {r.get('total_steps')}"
    if r.get("final_loss") is not None:
      line += f", final train loss {r['final_loss']:.4f}"
    if r.get("eval_loss") is not None:
      line += f", eval loss {r['eval_loss']:.4f}"
    print(line)
    for k in ("plot", "hf_export"):
      if r.get(k):
        print(f"  {k}: {r[k]}")
  if result.get("preempted"):
    print("preempted: a checkpoint was saved; rerun the same command to resume")


def main(argv=None):
  global _CONFIG
  argv = list(sys.argv if argv is None else argv)
  precheck(argv[1:])
  if _CONFIG is None:
    _CONFIG = config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "Training config file (python, get_config()); `path:arg` passes arg.",
        lock_config=True)
  app.run(_main, argv=argv)


if __name__ == "__main__":
  main()
