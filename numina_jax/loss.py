"""Masked next-token cross-entropy in fp32, computed chunk by chunk over the sequence so the [B, T, V] logits
never exist at once, plus the optional z-loss and MoE load-balancing loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from numina_jax.model import forward
from numina_jax.model.moe import load_balancing_loss


def lm_head_ce(h_BTD, lm_head_DV, targets_BT, mask_BT, *, chunk: int, dtype):
  """Sums over the masked tokens of (cross-entropy, logsumexp^2), chunked over T and rematerialized.

  `chunk` 0 (or >= T) computes the whole sequence at once; otherwise it must divide T."""

  def one(h, t, m):
    logits = jnp.einsum("btd,dv->btv", h, lm_head_DV.astype(dtype),
                        preferred_element_type=jnp.float32).astype(dtype).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
    return jnp.sum((lse - tgt) * m), jnp.sum(jnp.square(lse) * m)

  B, T, D = h_BTD.shape
  if not chunk or chunk >= T:
    return one(h_BTD, targets_BT, mask_BT)
  if T % chunk:
    raise ValueError(f"loss_chunk {chunk} does not divide the sequence length {T}; set model.loss_chunk to a "
                     f"divisor of it (or 0 for the whole sequence at once)")
  n = T // chunk
  xs = (h_BTD.reshape(B, n, chunk, D).swapaxes(0, 1), targets_BT.reshape(B, n, chunk).swapaxes(0, 1),
        mask_BT.reshape(B, n, chunk).swapaxes(0, 1))

  def body(carry, x):
    ce, z = jax.checkpoint(one)(*x)
    return (carry[0] + ce, carry[1] + z), None

  (ce, z), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), xs)
  return ce, z


def loss_terms(params, batch, model_cfg, *, dtype, remat_policy, moe_kernel, moe_tile, loss_chunk,
               aux_coef: float, z_coef: float, moe_capacity_factor: float = 0.0, attention: str = "auto"):
  """Per-batch sums: (weighted loss sum, metrics). Dividing by the global loss-token count gives the mean."""
  need_router = aux_coef > 0
  need_dropped = moe_capacity_factor > 0
  out = forward(params, batch["input_ids"], model_cfg, positions_BT=batch["positions"],
                segment_ids_BT=batch["segment_ids"], dtype=dtype, remat_policy=remat_policy,
                moe_kernel=moe_kernel, moe_tile=moe_tile, moe_capacity_factor=moe_capacity_factor,
                attention=attention, return_router_logits=need_router, return_hidden=True,
                return_moe_dropped=need_dropped)
  out = list(out) if (need_router or need_dropped) else [out]
  h = out.pop(0)
  router = out.pop(0) if need_router else None
  mask = batch["loss_mask"].astype(jnp.float32)
  ce_sum, z_sum = lm_head_ce(h, params["lm_head"], batch["targets"], mask, chunk=loss_chunk, dtype=dtype)
  total = ce_sum + z_coef * z_sum
  metrics = {"ce_sum": ce_sum, "z_sum": z_sum}
  if need_router:
    aux = load_balancing_loss(router, (batch["segment_ids"] > 0).reshape(-1), model_cfg.num_experts_per_tok)
    metrics["aux"] = aux
  if need_dropped:
    metrics["moe_dropped"] = out.pop(0).astype(jnp.float32)
  return total, metrics
