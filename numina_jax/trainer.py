"""The training loop: start (or resume), step, log, evaluate, checkpoint, survive preemption, export."""

from __future__ import annotations

import copy
import logging
import math
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from numina_jax import checkpoint as ckpt
from numina_jax import config as config_lib
from numina_jax import storage
from numina_jax.metrics import MetricWriter, flops_per_token, peak_flops_per_device, plot_metrics
from numina_jax.model.config import GptOssConfig
from numina_jax.model.params import init_value, param_specs
from numina_jax.model.transformer import as_dtype
from numina_jax.optim import make_optimizer
from numina_jax.sharding import make_mesh, param_shardings
from numina_jax.step import BATCH_KEYS, StepConfig, batch_shardings, jit_eval_step, jit_train_step

log = logging.getLogger("numina_jax")


class NonFiniteLossError(RuntimeError):
  pass


class _Preemption:
  """Turns SIGTERM (a preempted spot TPU VM) into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    if jax.process_count() > 1:
      # jax.distributed's preemption notifier catches SIGTERM itself; a Python handler would replace its handler
      # and no host would ever reach the preemption sync point.
      return self

    def handler(signum, frame):
      self.requested = True
      log.warning("SIGTERM received: saving a checkpoint after this step, then exiting")
    try:
      self._old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)

  def agreed(self, step: int) -> bool:
    """Whether to checkpoint and stop after `step`; on several hosts, all of them agree on the same step."""
    if jax.process_count() == 1:
      return self.requested
    # The distributed runtime propagates a preemption notice to every host in the background and names one
    # step for all to stop at, without a blocking collective on every step.
    from jax.experimental import multihost_utils
    return multihost_utils.reached_preemption_sync_point(step)


# Model ---------------------------------------------------------------------------------------------
def model_config_for(cfg, tokenizer) -> GptOssConfig:
  """The architecture: from the starting checkpoint, a config.json, or the tiny preset."""
  m = cfg.model
  if m.hf_path:
    from numina_jax.hf.load import resolve_checkpoint
    return GptOssConfig.from_pretrained(resolve_checkpoint(m.hf_path))
  if m.init_checkpoint:
    return ckpt.load_model_config(m.init_checkpoint)
  if m.config_path:
    return GptOssConfig.from_pretrained(m.config_path)
  vocab = m.vocab_size or int(math.ceil(len(tokenizer) / 64) * 64)
  if vocab < len(tokenizer):
    raise ValueError(f"config.model.vocab_size={vocab} is smaller than the tokenizer ({len(tokenizer)} tokens)")
  pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
  eos = tokenizer.convert_tokens_to_ids("<|return|>")
  return GptOssConfig(
      vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
      num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
      num_key_value_heads=m.num_key_value_heads, head_dim=m.head_dim, num_local_experts=m.num_local_experts,
      num_experts_per_tok=m.num_experts_per_tok, sliding_window=m.sliding_window,
      rope_original_max_position_embeddings=max(cfg.seq_len, 64),
      pad_token_id=pad, eos_token_id=eos)


def init_params(model_cfg: GptOssConfig, shardings, seed: int, param_dtype) -> dict[str, jax.Array]:
  """Random init, created directly in its shardings (never whole on one device)."""
  specs = param_specs(model_cfg)

  def make():
    key = jax.random.key(seed)
    out = {}
    for i, (name, spec) in enumerate(sorted(specs.items())):
      out[name] = init_value(spec, jax.random.fold_in(key, i), param_dtype, model_cfg.initializer_range)
    pad = model_cfg.pad_token_id
    if pad is not None and 0 <= pad < model_cfg.vocab_size:
      out["embed"] = out["embed"].at[pad].set(0)
    return out

  return jax.jit(make, out_shardings=shardings)()


def load_start_params(cfg, model_cfg, shardings, mesh) -> dict[str, jax.Array]:
  m = cfg.model
  dtype = as_dtype(m.param_dtype)
  if m.hf_path:
    from numina_jax.hf import load_pretrained_params
    log.info("loading Hugging Face weights from %s", m.hf_path)
    params, _ = load_pretrained_params(m.hf_path, dtype, mesh, shardings=shardings)
    return params
  if m.init_checkpoint:
    step = None if m.init_step < 0 else m.init_step
    if step is None:
      step = ckpt.best_step(m.init_checkpoint)
    log.info("starting from checkpoint %s (step %s)", m.init_checkpoint, step)
    params, _ = ckpt.load_params(m.init_checkpoint, step=step, shardings=shardings, dtype=dtype)
    return params
  return init_params(model_cfg, shardings, cfg.seed, dtype)


def opt_state_shardings(tx, params_abstract, p_shardings, mesh):
  """Optimizer moments follow their parameter's sharding; everything else is replicated."""
  abstract = jax.eval_shape(tx.init, params_abstract)
  rep = NamedSharding(mesh, P())

  def pick(path, leaf):
    for entry in reversed(path):
      key = getattr(entry, "key", None)
      if isinstance(key, str) and key in p_shardings and tuple(leaf.shape) == tuple(params_abstract[key].shape):
        return p_shardings[key]
    return rep

  return jax.tree_util.tree_map_with_path(pick, abstract)


# Stages ----------------------------------------------------------------------------------------------
def stage2_config(cfg, stage1_workdir: str) -> ml_collections.ConfigDict:
  c = copy.deepcopy(cfg)
  with c.unlocked():
    c.stage = "tir"
    c.data.dataset_name = cfg.stage2.dataset_name
    c.seq_len = cfg.stage2.seq_len
    c.num_epochs = cfg.stage2.num_epochs
    c.max_steps = cfg.stage2.max_steps
    c.warmup_ratio = cfg.stage2.warmup_ratio
    c.lr = cfg.stage2.lr
    c.model.hf_path = ""
    c.model.init_checkpoint = storage.join(stage1_workdir, "checkpoints")
    c.model.init_step = -1
    c.workdir = storage.join(cfg.workdir, "stage2_tir")
    c.stage2.enabled = False
  return c


def train(cfg: ml_collections.ConfigDict, *, stop_at_step: int | None = None) -> dict[str, Any]:
  """Runs the configured stage (or both stages of the recipe); restarting the same command resumes."""
  config_lib.validate(cfg)
  if cfg.multihost and jax.process_count() == 1:
    jax.distributed.initialize()
  if not cfg.stage2.enabled:
    return train_stage(cfg, stop_at_step=stop_at_step)
  c1 = copy.deepcopy(cfg)
  with c1.unlocked():
    c1.workdir = storage.join(cfg.workdir, "stage1_cot")
    c1.stage2.enabled = False
    c1.export_hf = False
  r1 = train_stage(c1, stop_at_step=stop_at_step)
  if r1.get("preempted"):
    return {"stage1": r1, "preempted": True}
  c2 = stage2_config(cfg, c1.workdir)
  r2 = train_stage(c2)
  return {"stage1": r1, "stage2": r2, "preempted": r2.get("preempted", False)}


def _global_batch(local: dict[str, np.ndarray], shardings, global_rows: int):
  out = {}
  for k in BATCH_KEYS:
    arr = np.asarray(local[k])
    out[k] = jax.make_array_from_process_local_data(shardings[k], arr, (global_rows, *arr.shape[1:]))
  return out


def train_stage(cfg: ml_collections.ConfigDict, *, stop_at_step: int | None = None) -> dict[str, Any]:
  """One stage. `stop_at_step` behaves as if SIGTERM arrived during that step (for tests and drills)."""
  from numina_jax import data as data_lib

  workdir = cfg.workdir
  is_main = jax.process_index() == 0
  storage.makedirs(workdir)
  mesh = make_mesh(dict(cfg.mesh))
  n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
  micro = cfg.microbatch_size or cfg.global_batch_size
  if micro % n_batch_shards:
    raise ValueError(f"config.microbatch_size ({micro}) must divide by the batch-sharded mesh axes "
                     f"data*fsdp*expert = {n_batch_shards} (mesh {dict(mesh.shape)})")
  if cfg.global_batch_size % jax.process_count():
    raise ValueError(f"config.global_batch_size ({cfg.global_batch_size}) must divide by the number of hosts "
                     f"({jax.process_count()})")

  tokenizer = data_lib.load_tokenizer(cfg.data.tokenizer)
  model_cfg = model_config_for(cfg, tokenizer)
  specs = param_specs(model_cfg)
  p_shard = param_shardings(specs, mesh)
  from jax.experimental import multihost_utils
  pipe_kwargs = dict(seq_len=cfg.seq_len, global_batch_size=cfg.global_batch_size, seed=cfg.seed,
                     process_index=jax.process_index(), process_count=jax.process_count(),
                     allgather=multihost_utils.process_allgather if jax.process_count() > 1 else None)
  train_it = data_lib.make_pipeline(cfg.data, tokenizer, split="train", **pipe_kwargs)
  eval_batches = list(data_lib.make_pipeline(cfg.data, tokenizer, split="eval", **pipe_kwargs))
  steps_per_epoch = train_it.steps_per_epoch
  total_steps = cfg.max_steps or steps_per_epoch * cfg.num_epochs
  if total_steps <= 0:
    raise ValueError(f"the training split of {cfg.data.dataset_name!r} gives no full batch of "
                     f"{cfg.global_batch_size} x {cfg.seq_len} tokens; lower global_batch_size or seq_len")

  tx, schedule = make_optimizer(cfg, total_steps)
  sc = StepConfig.from_config(cfg, model_cfg)
  params_abstract = {k: jax.ShapeDtypeStruct(s.shape, as_dtype(cfg.model.param_dtype)) for k, s in specs.items()}
  o_shard = opt_state_shardings(tx, params_abstract, p_shard, mesh)
  rep = NamedSharding(mesh, P())
  state_shard = {"step": rep, "params": p_shard, "opt_state": o_shard}

  mgr = _manager(cfg)
  start = mgr.latest_step()
  with jax.set_mesh(mesh):
    if start is not None:
      state, meta = _restore(mgr, start, state_shard, tx, params_abstract)
      train_it.set_state(meta["data_state"])
      log.info("resumed from %s at step %d", mgr.directory, start)
    else:
      params = load_start_params(cfg, model_cfg, p_shard, mesh)
      opt_state = jax.jit(tx.init, out_shardings=o_shard)(params)
      state = {"step": jax.device_put(jnp.zeros((), jnp.int32), rep), "params": params, "opt_state": opt_state}
    step_fn = jit_train_step(sc, tx, schedule, state_shard, mesh)
    eval_fn = jit_eval_step(sc, p_shard, mesh)
    b_shard = batch_shardings(mesh)

    writer = MetricWriter(workdir, enabled=is_main, resume_step=start or 0)
    writer.write_config(cfg, model_cfg)
    fpt = flops_per_token(model_cfg, cfg.seq_len)
    peak = peak_flops_per_device() * jax.device_count()
    step = int(jax.device_get(state["step"]))
    result: dict[str, Any] = {"workdir": workdir, "total_steps": total_steps, "start_step": step}
    pbar = _progress(cfg, total_steps, step, is_main)
    last_save_t = time.time()
    window = {"t": time.time(), "tokens": 0, "loss_tokens": 0.0, "steps": 0}
    pending = None  # (step, metrics) of the step in flight, read one step late
    last_logged = None
    eval_loss = None

    def finish_pending():
      nonlocal pending, last_logged
      if pending is None:
        return None
      s, m = pending
      pending = None
      m = jax.device_get(m)
      if not np.isfinite(m["loss"]):
        raise NonFiniteLossError(
            f"loss is {m['loss']} at step {s}: stopping; the last good checkpoint in {mgr.directory} "
            f"(step {mgr.latest_step()}) is intact. Lower config.lr, check the data, or raise optim.clip_norm.")
      window["loss_tokens"] += float(m["loss_tokens"])
      window["steps"] += 1
      last_logged = (s, m)
      if s % cfg.log_every_steps == 0 or s == total_steps:
        dt = max(time.time() - window["t"], 1e-9)
        tok_s = window["tokens"] / dt
        rec = {k: float(v) for k, v in m.items()}
        rec.update(step=s, epoch=(s - 1) // max(steps_per_epoch, 1), tokens_per_s=tok_s,
                   loss_tokens_per_s=window["loss_tokens"] / dt, steps_per_s=window["steps"] / dt,
                   mfu=fpt * tok_s / peak if peak else 0.0)
        writer.write(s, rec)
        if pbar is not None:
          pbar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{tok_s:,.0f}")
        window.update(t=time.time(), tokens=0, loss_tokens=0.0, steps=0)
      return m

    def run_eval(s):
      ce, n = 0.0, 0.0
      for b in eval_batches:
        c, t = eval_fn(state["params"], _global_batch(b, b_shard, cfg.global_batch_size))
        ce, n = ce + float(c), n + float(t)
      value = ce / max(n, 1.0)
      writer.write(s, {"step": s, "eval_loss": value, "eval_tokens": n})
      return value

    def save(s, metrics=None, force=False):
      nonlocal last_save_t
      meta = {"step": s, "data_state": train_it.get_state(), "config": cfg.to_json(),
              "total_steps": total_steps}
      mgr.save(s, args=ocp.args.Composite(**{
          ckpt.PARAMS: ocp.args.StandardSave(state["params"]),
          ckpt.OPT_STATE: ocp.args.StandardSave(state["opt_state"]),
          ckpt.MODEL_CONFIG: ocp.args.JsonSave(model_cfg.to_hf_dict()),
          ckpt.TRAIN_META: ocp.args.JsonSave(meta),
      }), metrics=metrics, force=force)
      writer.flush()  # on gs:// metrics.jsonl is rewritten only now and then: never lag behind a checkpoint
      last_save_t = time.time()

    preempted = False
    try:
      with _Preemption() as preempt:
        while step < total_steps:
          local = next(train_it)
          batch = _global_batch(local, b_shard, cfg.global_batch_size)
          state, metrics = step_fn(state, batch)
          step += 1
          window["tokens"] += int(np.prod(local["input_ids"].shape)) * jax.process_count()
          finish_pending()
          pending = (step, metrics)
          if pbar is not None:
            pbar.update(1)
          do_eval = bool(eval_batches) and cfg.eval_every_steps and step % cfg.eval_every_steps == 0
          do_ckpt = (cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0) or (
              cfg.checkpoint_every_secs and time.time() - last_save_t > cfg.checkpoint_every_secs)
          stop = preempt.agreed(step) or (stop_at_step is not None and step >= stop_at_step)
          if do_eval or do_ckpt or stop or step == total_steps:
            finish_pending()  # never checkpoint a state whose loss was not checked
          if do_eval and step != total_steps:
            eval_loss = run_eval(step)
          if (do_eval or do_ckpt or stop) and step != total_steps:
            save(step, {"eval_loss": eval_loss} if do_eval else None, force=stop)
          if stop:
            preempted = True
            break
        finish_pending()
        if not preempted:
          if eval_batches:
            eval_loss = run_eval(step)
          if mgr.latest_step() != step:
            save(step, {"eval_loss": eval_loss} if eval_batches else None, force=True)
    finally:
      # Checkpoints already handed to the async writer hold good states: let them land even if we fail.
      mgr.wait_until_finished()
    if pbar is not None:
      pbar.close()

  result.update(final_step=step, preempted=preempted, eval_loss=eval_loss,
                data_stats=getattr(train_it, "stats", None))
  if last_logged is not None:
    result["final_loss"] = float(last_logged[1]["loss"])
  if preempted:
    log.warning("preempted at step %d; checkpoint saved in %s; rerun the same command to resume", step,
                mgr.directory)
  elif is_main:
    if cfg.plot:
      writer.flush()  # the plot reads metrics.jsonl back
      result["plot"] = plot_metrics(workdir)
    if cfg.export_hf:
      from numina_jax.hf import save_pretrained
      out = storage.join(workdir, "hf")
      save_pretrained(state["params"], out, cfg=model_cfg, dtype=as_dtype(cfg.export_dtype),
                      tokenizer=tokenizer, overwrite=True)
      result["hf_export"] = out
  writer.write_summary(result)
  writer.close()
  mgr.close()
  if hasattr(train_it, "close"):
    train_it.close()
  return result


def _manager(cfg) -> ocp.CheckpointManager:
  return ckpt.training_manager(storage.join(cfg.workdir, "checkpoints"), max_to_keep=cfg.checkpoint.max_to_keep,
                               keep_best=cfg.checkpoint.keep_best, async_save=cfg.checkpoint.async_save)


def _restore(mgr, step, state_shard, tx, params_abstract):
  def target(tree_abs, shard):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree_abs, shard)

  opt_abs = jax.eval_shape(tx.init, params_abstract)
  try:
    r = mgr.restore(step, args=ocp.args.Composite(**{
        ckpt.PARAMS: ocp.args.StandardRestore(target(params_abstract, state_shard["params"])),
        ckpt.OPT_STATE: ocp.args.StandardRestore(target(opt_abs, state_shard["opt_state"])),
        ckpt.TRAIN_META: ocp.args.JsonRestore(),
    }))
  except Exception as e:
    raise ValueError(f"could not resume from checkpoint {mgr.directory}/{step}: {type(e).__name__}: {e}. "
                     f"If that step folder is damaged, move it away to resume from the one before.") from e
  meta = r[ckpt.TRAIN_META]
  state = {"step": jax.device_put(jnp.asarray(meta["step"], jnp.int32), state_shard["step"]),
           "params": r[ckpt.PARAMS], "opt_state": r[ckpt.OPT_STATE]}
  return state, meta


def _progress(cfg, total, initial, is_main):
  if not (cfg.progress_bar and is_main):
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc=f"train[{cfg.stage}]", unit="step", dynamic_ncols=True)
