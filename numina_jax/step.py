"""The pure train and eval steps, jitted over the mesh with explicit shardings and donated state.

State is a dict {"step", "params", "opt_state"}; a batch is a dict of [B, T] arrays (input_ids, targets,
loss_mask, segment_ids, positions) for the whole global batch. The jitted train step can also take one row of
small int flags per device and return their maximum over all devices: how hosts agree (see trainer.HostSignals).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from numina_jax.data.packing import BATCH_KEYS
from numina_jax.loss import loss_terms
from numina_jax.model.config import GptOssConfig
from numina_jax.model.transformer import as_dtype
from numina_jax.sharding import logical_to_spec

STOP, CHECKPOINT_DUE = 0, 1  # columns of the host flags (see `host_flags_sharding`)
NUM_FLAGS = 2


@dataclasses.dataclass(frozen=True)
class StepConfig:
  model: GptOssConfig
  dtype: Any = jnp.bfloat16
  remat_policy: str = "full"
  moe_kernel: str = "auto"
  moe_tile: int = 0
  moe_capacity_factor: float = 0.0
  attention: str = "auto"
  loss_chunk: int = 512
  aux_coef: float = 0.0
  z_coef: float = 0.0
  num_microbatches: int = 1
  nan_at_step: int = 0  # test hook: the loss (and so the gradients) of this 1-based step become NaN; 0 = off

  @classmethod
  def from_config(cls, cfg, model_cfg: GptOssConfig) -> "StepConfig":
    micro = cfg.microbatch_size or cfg.global_batch_size
    return cls(model=model_cfg, dtype=as_dtype(cfg.model.dtype), remat_policy=cfg.remat_policy,
               moe_kernel=cfg.model.moe_kernel, moe_tile=cfg.model.moe_tile,
               moe_capacity_factor=cfg.model.moe_capacity_factor, attention=cfg.model.attention,
               loss_chunk=cfg.model.loss_chunk,
               aux_coef=cfg.model.load_balancing_loss_coef, z_coef=cfg.model.z_loss_coef,
               num_microbatches=cfg.global_batch_size // micro)


def _terms(params, batch, sc: StepConfig):
  return loss_terms(params, batch, sc.model, dtype=sc.dtype, remat_policy=sc.remat_policy,
                    moe_kernel=sc.moe_kernel, moe_tile=sc.moe_tile, attention=sc.attention, loss_chunk=sc.loss_chunk,
                    aux_coef=sc.aux_coef, z_coef=sc.z_coef, moe_capacity_factor=sc.moe_capacity_factor)


def train_step(state, batch, *, sc: StepConfig, tx: optax.GradientTransformation, schedule):
  """One optimizer step over the global batch, accumulating gradients over `sc.num_microbatches`.

  The loss is the mean over every loss token of the global batch, so it does not depend on how the batch is
  split into microbatches or how documents were packed.
  """
  params = state["params"]
  n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
  n_micro = sc.num_microbatches

  def micro_loss(p, mb):
    total, m = _terms(p, mb, sc)
    if sc.nan_at_step:
      total = total * jnp.where(state["step"] + 1 == sc.nan_at_step, jnp.nan, 1.0)
    loss = total / n_tokens
    if sc.aux_coef:
      loss = loss + sc.aux_coef * m["aux"] / n_micro
    return loss, m

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
  if n_micro == 1:
    (loss, m), grads = grad_fn(params, batch)
  else:
    # Row r goes to microbatch r % n_micro: with the batch axis sharded, every device keeps its own rows.
    mbs = jax.tree.map(lambda x: x.reshape(x.shape[0] // n_micro, n_micro, *x.shape[1:]).swapaxes(0, 1), batch)

    def body(carry, mb):
      g_acc, l_acc, m_acc = carry
      (l, m), g = grad_fn(params, mb)
      g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
      return (g_acc, l_acc + l, jax.tree.map(jnp.add, m_acc, m)), None

    zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    m0 = jax.eval_shape(lambda: _terms(params, jax.tree.map(lambda x: x[0], mbs), sc)[1])
    m0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0)
    (grads, loss, m), _ = jax.lax.scan(body, (zeros_g, jnp.zeros((), jnp.float32), m0), mbs)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)

  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state["opt_state"], params)
  params = optax.apply_updates(params, updates)
  metrics = {
      "loss": loss,
      "ce": m["ce_sum"] / n_tokens,
      "grad_norm": grad_norm,
      "lr": schedule(state["step"]),
      "loss_tokens": n_tokens,
      "param_norm": optax.tree.norm(params),
  }
  if sc.z_coef:
    metrics["z_loss"] = m["z_sum"] / n_tokens
  if sc.aux_coef:
    metrics["aux_loss"] = m["aux"] / n_micro
  if isinstance(opt_state, optax.ApplyIfFiniteState):
    metrics["skipped_updates"] = opt_state.total_notfinite
  if sc.moe_capacity_factor:
    metrics["moe_dropped"] = m["moe_dropped"]  # expert assignments dropped by the capacity limit, whole step
  return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


def eval_step(params, batch, *, sc: StepConfig):
  """(sum of token cross-entropies, number of loss tokens) on one batch."""
  _, m = _terms(params, batch, dataclasses.replace(sc, aux_coef=0.0, z_coef=0.0))
  return m["ce_sum"], jnp.sum(batch["loss_mask"].astype(jnp.float32))


def batch_shardings(mesh) -> dict[str, NamedSharding]:
  spec = logical_to_spec(("batch", "seq"), mesh=mesh)
  return {k: NamedSharding(mesh, spec) for k in BATCH_KEYS}


def host_flags_sharding(mesh) -> NamedSharding:
  """[devices, flags]: one row per device of the mesh, so every host contributes through its own devices."""
  return NamedSharding(mesh, P(tuple(mesh.axis_names), None))


def _train_step_with_flags(state, batch, flags_DF, **kw):
  state, metrics = train_step(state, batch, **kw)
  # Reduced inside the step: the all-reduce rides along with the step's own collectives, and every host reads
  # the same value with the same step's metrics.
  metrics["host_flags"] = jnp.max(flags_DF, axis=0)
  return state, metrics


def jit_train_step(sc: StepConfig, tx, schedule, state_shardings, mesh, *, host_flags: bool = False):
  """`step(state, batch) -> (state, metrics)`; with `host_flags`, `step(state, batch, flags_DF)` and
  `metrics["host_flags"]`, the maximum of each flag over all devices (see `host_flags_sharding`)."""
  rep = NamedSharding(mesh, P())
  if host_flags:
    fn = functools.partial(_train_step_with_flags, sc=sc, tx=tx, schedule=schedule)
    in_shardings = (state_shardings, batch_shardings(mesh), host_flags_sharding(mesh))
  else:
    fn = functools.partial(train_step, sc=sc, tx=tx, schedule=schedule)
    in_shardings = (state_shardings, batch_shardings(mesh))
  return jax.jit(fn, in_shardings=in_shardings, out_shardings=(state_shardings, rep), donate_argnums=(0,))


def jit_eval_step(sc: StepConfig, param_shardings, mesh):
  rep = NamedSharding(mesh, P())
  return jax.jit(functools.partial(eval_step, sc=sc), in_shardings=(param_shardings, batch_shardings(mesh)),
                 out_shardings=(rep, rep))
