"""Pure functions of the gpt-oss forward pass (spec: shared/spec/gpt-oss.md, section 3); the MoE is in `moe.py`.

Axis legend used in names and einsums: B batch, T query positions, S key positions, D hidden, N query heads,
K kv heads, G query heads per kv head, H head dim, E experts, V vocab, X = B*T tokens.

Rounding follows transformers: matmuls accumulate in fp32 and round once to the compute dtype, norms and the
softmaxes run in fp32, biases and residuals are added in the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from numina_jax.model import moe as moe_lib
from numina_jax.sharding import with_logical_constraint

F32 = jnp.float32


def dense(x, w, b, eq: str):
  """`einsum(eq, x, w)` accumulated in fp32, rounded to x's dtype, plus bias in that dtype."""
  y = jnp.einsum(eq, x, w.astype(x.dtype), preferred_element_type=F32).astype(x.dtype)
  return y if b is None else y + b.astype(x.dtype)


def rms_norm(x, w, eps: float):
  x32 = x.astype(F32)
  n = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (w.astype(F32) * n).astype(x.dtype)


def rope_cos_sin(positions_BT, inv_freq, attention_factor: float, dtype):
  """cos/sin [B, T, H/2]: angles in fp32 (positions reach 131072), scaled by YaRN's factor, then cast."""
  theta = positions_BT.astype(F32)[..., None] * jnp.asarray(inv_freq, F32)
  return ((jnp.cos(theta) * attention_factor).astype(dtype), (jnp.sin(theta) * attention_factor).astype(dtype))


def apply_rope(x_BTnH, cos_BTh, sin_BTh):
  """Rotate-half (NeoX) RoPE over the last axis; cos/sin broadcast over heads."""
  half = x_BTnH.shape[-1] // 2
  x1, x2 = x_BTnH[..., :half], x_BTnH[..., half:]
  cos, sin = cos_BTh[:, :, None, :], sin_BTh[:, :, None, :]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def decoder_layer(p, x_BTD, attend, *, cfg, kernel, tile, capacity_factor=0.0):
  """(x, router logits [B*T, E], dropped MoE assignments) after one attention + MoE layer.

  `attend(p, h_BTD)` is this layer's attention block (`attention.attention` with its window bound)."""
  h = rms_norm(x_BTD, p["attn_norm"], cfg.rms_norm_eps)
  x_BTD = x_BTD + attend(p, h)
  x_BTD = with_logical_constraint(x_BTD, ("batch", "seq", "act_embed"))
  h = rms_norm(x_BTD, p["mlp_norm"], cfg.rms_norm_eps)
  y, logits_XE, dropped = moe_lib.moe(p, h, top_k=cfg.num_experts_per_tok, limit=cfg.swiglu_limit,
                                      alpha=cfg.swiglu_alpha, kernel=kernel, tile=tile,
                                      capacity_factor=capacity_factor)
  x_BTD = with_logical_constraint(x_BTD + y, ("batch", "seq", "act_embed"))
  return x_BTD, logits_XE, dropped
