"""Pure functions of the gpt-oss forward pass (spec: shared/spec/gpt-oss.md, section 3); the MoE is in `moe.py`.

Axis legend used in names and einsums: B batch, T query positions, S key positions, D hidden, N query heads,
K kv heads, G query heads per kv head, H head dim, E experts, V vocab, X = B*T tokens.

Rounding follows transformers: matmuls accumulate in fp32 and round once to the compute dtype, norms and the
softmaxes run in fp32, biases and residuals are added in the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

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


def attention_masks(segment_ids_BT, window: int):
  """(full, sliding) boolean masks [B, T, S]: causal, same segment, and for sliding i - window < j."""
  T = segment_ids_BT.shape[1]
  i = jnp.arange(T)[:, None]
  j = jnp.arange(T)[None, :]
  same = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  full = same & (j <= i)[None]
  sliding = full & (i - j < window)[None]
  return full, sliding


def attention(p, x_BTD, cos, sin, mask_BTS, dtype):
  """Grouped-query attention with q/k/v/o biases and a learned per-head sink in the softmax denominator."""
  q_BTNH = checkpoint_name(dense(x_BTD, p["q_w"], p["q_b"], "btd,dnh->btnh"), "qkv_proj")
  k_BTKH = checkpoint_name(dense(x_BTD, p["k_w"], p["k_b"], "btd,dkh->btkh"), "qkv_proj")
  v_BTKH = checkpoint_name(dense(x_BTD, p["v_w"], p["v_b"], "btd,dkh->btkh"), "qkv_proj")
  q_BTNH, k_BTKH = apply_rope(q_BTNH, cos, sin), apply_rope(k_BTKH, cos, sin)
  B, T, N, H = q_BTNH.shape
  K = k_BTKH.shape[2]
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)  # query head n uses kv head n // G
  scores = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BTKH, preferred_element_type=F32).astype(dtype)
  scores = scores * jnp.asarray(H ** -0.5, dtype)
  scores = jnp.where(mask_BTS[:, None, None], scores, jnp.finfo(dtype).min).astype(F32)
  # The sink is one more logit in each softmax row whose probability is dropped: fold it into the denominator
  # rather than concatenating a column (same values, half the attention memory traffic).
  sinks = p["sinks"].astype(dtype).astype(F32).reshape(1, K, N // K, 1, 1)
  m = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sinks)
  e = jnp.exp(scores - m)
  probs = (e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sinks - m))).astype(dtype)
  o_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs, v_BTKH, preferred_element_type=F32).astype(dtype)
  out = dense(o_BTKGH.reshape(B, T, N, H), p["o_w"], p["o_b"], "btnh,nhd->btd")
  return checkpoint_name(out, "out_proj")


def decoder_layer(p, x_BTD, cos, sin, mask_BTS, *, cfg, dtype, kernel, tile, capacity_factor=0.0):
  """(x, router logits [B*T, E], dropped MoE assignments) after one attention + MoE layer."""
  h = rms_norm(x_BTD, p["attn_norm"], cfg.rms_norm_eps)
  x_BTD = x_BTD + attention(p, h, cos, sin, mask_BTS, dtype)
  x_BTD = with_logical_constraint(x_BTD, ("batch", "seq", "act_embed"))
  h = rms_norm(x_BTD, p["mlp_norm"], cfg.rms_norm_eps)
  y, logits_XE, dropped = moe_lib.moe(p, h, top_k=cfg.num_experts_per_tok, limit=cfg.swiglu_limit,
                                      alpha=cfg.swiglu_alpha, kernel=kernel, tile=tile,
                                      capacity_factor=capacity_factor)
  x_BTD = with_logical_constraint(x_BTD + y, ("batch", "seq", "act_embed"))
  return x_BTD, logits_XE, dropped
