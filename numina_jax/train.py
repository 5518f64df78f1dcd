"""Fine-tune gpt-oss with the NuminaMath recipe.

  python -m numina_jax.train                                  # the embedded CPU demo (configs/default.py)
  python -m numina_jax.train --config configs/oss120b_v5.py --config.lr=3e-5
  python -m numina_jax.train --config configs/oss120b_v5.py:tir   # stage 2 (tool-integrated reasoning)

A stage is a config file's get_config(stage) (`path:stage`). A stage that sets next_stage (the demo's CoT stage
does) is followed by the same file's get_config(next_stage), from its best checkpoint, in workdir/stage<k>_<stage>.
Every field of the config can be overridden as --config.FIELD=VALUE (e.g. --config.data.dataset_name=...); in a
chain the overrides apply to every stage.
Rerunning the same command resumes from the latest checkpoint in the workdir. On several hosts every host runs
the same command with --config.multihost=True (the coordinator is auto-detected on Cloud TPU, SLURM, Open MPI
and Kubernetes; elsewhere set --config.distributed.coordinator_address/num_processes/process_id).
"""

from __future__ import annotations

import logging
import sys

from absl import app
from absl import logging as absl_logging
from ml_collections import config_flags

from numina_jax.config import (DEFAULT_CONFIG, check_overrides, config_overrides, config_spec, load_config,
                               load_config_file)

_ARGV: list[str] = []  # the command line's flags, for the stages a chain (config.next_stage) loads
_CONFIG = None  # defined in main(), after the overrides were checked: ml_collections reads them at definition


def precheck(argv: list[str]) -> None:
  """Unknown `--config.X` overrides and bad config paths become one-line errors rather than tracebacks."""
  if any(a in ("-h", "--help", "--helpfull", "--helpshort") for a in argv):
    return
  try:
    cfg = load_config_file(config_spec(argv))
    check_overrides(cfg, argv)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  _quiet_logs()
  # The trainer (jax, the model, the data) is imported after the flags parse, so --help answers at once.
  from numina_jax.distributed import DistributedStartError
  from numina_jax.trainer import NonFiniteLossError, train
  cfg = _CONFIG.value
  path = config_spec(_ARGV).partition(":")[0]
  overrides = config_overrides(_ARGV)

  def next_config(stage: str):
    """The next stage of a chain: the same file's get_config(stage), with the same command-line overrides."""
    return load_config([f"--config={path}:{stage}", *overrides])

  try:
    result = train(cfg, next_config=next_config)
  except (NonFiniteLossError, DistributedStartError, ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  _print_summary(result)


def _quiet_logs() -> None:
  """Our own INFO lines on stderr; orbax's and absl's per-write chatter only from WARNING up."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  log = logging.getLogger("numina_jax")
  if not log.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log.addHandler(handler)
  log.setLevel(logging.INFO)
  log.propagate = False


def _print_summary(result: dict) -> None:
  stages = [v for k, v in result.items() if k.startswith("stage") and isinstance(v, dict)] or [result]
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
    if r.get("sctir"):
      m = r["sctir"]
      print(f"  sctir: {m['dir']} (maj@{m['n']} {100 * m['maj_at_n']:.1f}%, mean@1 {100 * m['mean_at_1']:.1f}% "
            f"on {m['num_problems']} held-out problems)")
  if result.get("preempted"):
    print("preempted: a checkpoint was saved; rerun the same command to resume")


def main(argv=None):
  global _CONFIG, _ARGV
  argv = list(sys.argv if argv is None else argv)
  _ARGV = argv[1:]
  precheck(argv[1:])
  if _CONFIG is None:
    _CONFIG = config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "Training config file (python, get_config()); `path:arg` passes arg.",
        lock_config=True, sys_argv=argv)
  app.run(_main, argv=argv)


if __name__ == "__main__":
  main()
