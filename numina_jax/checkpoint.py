"""Orbax checkpoints. One format for converted weights and training runs: a `CheckpointManager` directory of
step folders, each holding the items `params` (flat `{name: array}`), `model_config` (the HF-style config
dict) and, for training runs, `opt_state` and `train_meta` (step, data-iterator state, run config)."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from orbax.checkpoint import checkpoint_managers as cm
from etils import epath

from numina_jax import storage
from numina_jax.model.config import GptOssConfig
from numina_jax.model.params import param_specs

PARAMS, MODEL_CONFIG, OPT_STATE, TRAIN_META = "params", "model_config", "opt_state", "train_meta"


def _path(directory: str) -> epath.Path:
  """The folder as Orbax wants it; on gs:// with fresh listings, since another process or tensorstore may have
  written there since this process last looked (on gs:// a finished step holds `commit_success.txt`)."""
  storage.refresh(directory)
  return storage.path(directory)


def score(metrics: dict) -> float:
  """How good a saved step is, higher better: its `score` (the trainer records the metric that
  checkpoint.best_metric names: SC-TIR maj@N, or minus the eval loss), else minus its eval loss."""
  return metrics["score"] if "score" in metrics else -metrics["eval_loss"]


def training_manager(directory: str, *, max_to_keep: int, keep_best: int = 0,
                     async_save: bool = True) -> ocp.CheckpointManager:
  """The manager of a training run: keeps the last `max_to_keep` steps and the `keep_best` best by `score`."""

  policies = [cm.LatestN(n=max_to_keep)]
  if keep_best:
    # BestN keeps the tail of the sorted list: the highest scores.
    policies.append(cm.BestN(get_metric_fn=score, n=keep_best, reverse=False,
                             keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=cm.AnyPreservationPolicy(policies), enable_async_checkpointing=async_save,
      best_fn=score, best_mode="max", create=True, step_prefix=None)
  return ocp.CheckpointManager(_path(directory), options=options)


def best_step(directory: str) -> int | None:
  """The step with the best recorded `score` (SC-TIR maj@N or eval loss, as the run's checkpoint.best_metric
  chose); None when no step has one (callers then take the latest)."""
  mgr = ocp.CheckpointManager(_path(directory), options=ocp.CheckpointManagerOptions(
      create=False, best_fn=score, best_mode="max"))
  try:
    return mgr.best_step()
  finally:
    mgr.close()


def save_params(directory: str, params: Mapping[str, jax.Array], cfg: GptOssConfig, step: int = 0) -> str:
  """Writes a weights-only checkpoint (what `convert import` produces and the trainer can start from)."""
  mgr = ocp.CheckpointManager(_path(directory), options=ocp.CheckpointManagerOptions(
      enable_async_checkpointing=False, create=True, step_prefix=None))
  mgr.save(step, args=ocp.args.Composite(**{
      PARAMS: ocp.args.StandardSave(dict(params)),
      MODEL_CONFIG: ocp.args.JsonSave(cfg.to_hf_dict()),
  }), force=True)
  mgr.wait_until_finished()
  mgr.close()
  return str(directory)


def latest_step(directory: str) -> int | None:
  if not _path(directory).exists():
    return None
  mgr = ocp.CheckpointManager(_path(directory), options=ocp.CheckpointManagerOptions(create=False))
  try:
    return mgr.latest_step()
  finally:
    mgr.close()


def load_model_config(directory: str, step: int | None = None) -> GptOssConfig:
  step = _resolve_step(directory, step)
  mgr = ocp.CheckpointManager(_path(directory), options=ocp.CheckpointManagerOptions(create=False))
  try:
    restored = mgr.restore(step, args=ocp.args.Composite(**{MODEL_CONFIG: ocp.args.JsonRestore()}))
  finally:
    mgr.close()
  return GptOssConfig.from_hf_dict(dict(restored[MODEL_CONFIG]), source=f"{directory} (step {step})")


def _resolve_step(directory: str, step: int | None) -> int:
  path = _path(directory)
  if not path.exists():
    raise FileNotFoundError(f"no checkpoint directory at {directory}")
  s = latest_step(directory) if step is None else step
  if s is None:
    raise FileNotFoundError(f"{directory} holds no complete checkpoint (no finished step folder)")
  return s


def load_params(directory: str, *, step: int | None = None, shardings: Mapping[str, Any] | None = None,
                dtype=None) -> tuple[dict[str, jax.Array], GptOssConfig]:
  """Restores `params` (into `shardings` when given, else onto the default device) and the model config."""

  cfg = load_model_config(directory, step)
  step = _resolve_step(directory, step)
  specs = param_specs(cfg)
  mgr = ocp.CheckpointManager(_path(directory), options=ocp.CheckpointManagerOptions(create=False))
  try:
    meta = _params_metadata(directory, step)
    target = {}
    for name, spec in specs.items():
      if name not in meta:
        raise ValueError(f"checkpoint {directory} step {step} lacks parameter {name!r}")
      saved_dtype = meta[name].dtype
      sharding = shardings[name] if shardings is not None else jax.sharding.SingleDeviceSharding(
          jax.devices()[0])
      target[name] = jax.ShapeDtypeStruct(spec.shape, dtype or saved_dtype, sharding=sharding)
    extra = sorted(set(meta) - set(specs))
    if extra:
      raise ValueError(f"checkpoint {directory} step {step} has parameters the model lacks: {extra}")
    restored = mgr.restore(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)}))
  except (ValueError, FileNotFoundError):
    raise
  except Exception as e:  # orbax raises many types for a damaged folder
    raise ValueError(f"could not read checkpoint {directory} step {step}: {type(e).__name__}: {e}") from e
  finally:
    mgr.close()
  return dict(restored[PARAMS]), cfg


def _params_metadata(directory: str, step: int) -> dict[str, Any]:
  step_dir = _path(directory) / str(step) / PARAMS
  if not step_dir.exists():
    raise FileNotFoundError(f"checkpoint {directory} step {step} has no '{PARAMS}' item")
  level = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)  # it looks for step-level metadata inside the item: harmless
  try:
    with ocp.StandardCheckpointer() as ckptr:
      meta = ckptr.metadata(step_dir)
  finally:
    absl_logging.set_verbosity(level)
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  return dict(tree)

