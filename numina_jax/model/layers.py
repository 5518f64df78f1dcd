"""Pure functions of the gpt-oss forward pass (spec: shared/spec/gpt-oss.md, section 3).

Axis legend used in names and einsums: B batch, T query positions, S key positions, D hidden, N query heads,
K kv heads, G query heads per kv head, H head dim, E experts, I expert intermediate, V vocab, X = B*T tokens,
A = X*top_k expert assignments, M padded assignment rows.

Rounding follows transformers: matmuls accumulate in fp32 and round once to the compute dtype, norms and the
softmaxes run in fp32, biases and residuals are added in the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

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


# MoE ---------------------------------------------------------------------------------------------
def route(p, h_XD, top_k: int):
  """Router logits [X, E]; top-k of the raw logits, softmax over those k (in the logits dtype)."""
  logits_XE = dense(h_XD, p["router_w"], p["router_b"], "xd,de->xe")
  vals, idx_XK = jax.lax.top_k(logits_XE, top_k)
  weights_XK = jax.nn.softmax(vals.astype(F32), axis=-1).astype(h_XD.dtype)
  return logits_XE, idx_XK, weights_XK


def swiglu(gate, up, limit: float, alpha: float):
  gate = jnp.minimum(gate, limit)
  up = jnp.clip(up, -limit, limit)
  return (up + 1) * (gate * jax.nn.sigmoid(gate * alpha))


def combine(y_XKD, weights_XK):
  """Weighted sum over the k experts: multiply in the compute dtype, accumulate in fp32, round once."""
  return jnp.sum((y_XKD * weights_XK[..., None]).astype(F32), axis=1).astype(y_XKD.dtype)


def moe_dense(p, h_XD, idx_XK, weights_XK, limit, alpha):
  """Reference: every expert on every token, then pick each token's k outputs. O(E/k) wasted work."""
  gate = dense(h_XD, p["gate_w"], None, "xd,edi->exi") + p["gate_b"][:, None].astype(h_XD.dtype)
  up = dense(h_XD, p["up_w"], None, "xd,edi->exi") + p["up_b"][:, None].astype(h_XD.dtype)
  y_EXD = dense(swiglu(gate, up, limit, alpha), p["down_w"], None, "exi,eid->exd")
  y_EXD = y_EXD + p["down_b"][:, None].astype(h_XD.dtype)
  X = h_XD.shape[0]
  y_XKD = y_EXD[idx_XK, jnp.arange(X)[:, None]]
  return combine(y_XKD, weights_XK)


def _sort_assignments(idx_XK, num_experts: int):
  """Assignments sorted by expert: (order, expert of each sorted row, token of each sorted row, group sizes)."""
  X, K = idx_XK.shape
  flat_A = idx_XK.reshape(-1)
  order_A = jnp.argsort(flat_A, stable=True)
  expert_A = flat_A[order_A]
  token_A = order_A // K
  group_sizes_E = jnp.bincount(flat_A, length=num_experts).astype(jnp.int32)
  return order_A, expert_A, token_A, group_sizes_E


def _unsort_combine(ys_AD, order_A, X, K, weights_XK):
  y_AD = jnp.zeros_like(ys_AD).at[order_A].set(ys_AD, unique_indices=True)
  return combine(y_AD.reshape(X, K, -1), weights_XK)


def moe_ragged(p, h_XD, idx_XK, weights_XK, limit, alpha):
  """Dropless grouped matmul over expert-sorted rows with `jax.lax.ragged_dot` (the TPU/GPU fast path)."""
  X, K = idx_XK.shape
  E = p["gate_w"].shape[0]
  dt = h_XD.dtype
  order_A, expert_A, token_A, sizes_E = _sort_assignments(idx_XK, E)
  xs_AD = h_XD[token_A]

  def rdot(x, w):
    return jax.lax.ragged_dot(x, w.astype(dt), sizes_E, preferred_element_type=F32).astype(dt)

  gate = rdot(xs_AD, p["gate_w"]) + p["gate_b"].astype(dt)[expert_A]
  up = rdot(xs_AD, p["up_w"]) + p["up_b"].astype(dt)[expert_A]
  ys_AD = rdot(swiglu(gate, up, limit, alpha), p["down_w"]) + p["down_b"].astype(dt)[expert_A]
  return _unsort_combine(ys_AD, order_A, X, K, weights_XK)


def auto_tile(assignments: int, experts: int) -> int:
  """Rows per tile: about a quarter of an expert's average group, a power of two in [16, 512].

  Small tiles waste matmul efficiency and copy each expert's weights once per tile; large tiles waste padding.
  """
  target = max(assignments / max(experts, 1) / 4, 1)
  return int(min(512, max(16, 2 ** round(math.log2(target)))))


def moe_tiled(p, h_XD, idx_XK, weights_XK, limit, alpha, tile: int = 0):
  """Dropless MoE from ordinary batched matmuls (the CPU path: XLA's CPU `ragged_dot` is ~18x slower).

  Assignments are sorted by expert and each expert's group is padded to a multiple of `tile` rows, so every
  tile belongs to one expert; a batched matmul then runs each tile against its expert's weights. A token picks
  an expert at most once, so the padded length is statically bounded by X*k + E*(tile-1). `tile=0` picks the
  size from the shapes (`auto_tile`).
  """
  X, K = idx_XK.shape
  E = p["gate_w"].shape[0]
  dt = h_XD.dtype
  A = X * K
  tile = max(1, min(tile or auto_tile(A, E), A))
  n_tiles = -(-(A + E * (tile - 1)) // tile)
  order_A, expert_A, token_A, sizes_E = _sort_assignments(idx_XK, E)
  padded_E = -(-sizes_E // tile) * tile
  padded_end_E = jnp.cumsum(padded_E)
  rank_A = jnp.arange(A) - (jnp.cumsum(sizes_E) - sizes_E)[expert_A]
  dest_A = (padded_end_E - padded_E)[expert_A] + rank_A
  x_MD = jnp.zeros((n_tiles * tile, h_XD.shape[1]), dt).at[dest_A].set(h_XD[token_A], unique_indices=True)
  tile_expert = jnp.searchsorted(padded_end_E, jnp.arange(n_tiles) * tile, side="right")
  tile_expert = jnp.minimum(tile_expert, E - 1)  # tiles past the last group are all padding
  x_tCD = x_MD.reshape(n_tiles, tile, -1)

  def tdot(x, w):
    return jnp.einsum("tcd,tdf->tcf", x, w.astype(dt)[tile_expert], preferred_element_type=F32).astype(dt)

  gate = tdot(x_tCD, p["gate_w"]) + p["gate_b"].astype(dt)[tile_expert][:, None]
  up = tdot(x_tCD, p["up_w"]) + p["up_b"].astype(dt)[tile_expert][:, None]
  y_tCD = tdot(swiglu(gate, up, limit, alpha), p["down_w"]) + p["down_b"].astype(dt)[tile_expert][:, None]
  ys_AD = y_tCD.reshape(n_tiles * tile, -1)[dest_A]
  return _unsort_combine(ys_AD, order_A, X, K, weights_XK)


MOE_KERNELS = {"dense": moe_dense, "ragged": moe_ragged, "tiled": moe_tiled}


def resolve_moe_kernel(name: str) -> str:
  if name == "auto":
    return "tiled" if jax.default_backend() == "cpu" else "ragged"
  if name not in MOE_KERNELS:
    raise ValueError(f"unknown moe_kernel {name!r}; choose one of auto, {', '.join(MOE_KERNELS)}")
  return name


def moe(p, x_BTD, *, top_k, limit, alpha, kernel: str, tile: int):
  B, T, D = x_BTD.shape
  h_XD = x_BTD.reshape(B * T, D)
  logits_XE, idx_XK, weights_XK = route(p, h_XD, top_k)
  fn = MOE_KERNELS[kernel]
  kwargs = {"tile": tile} if kernel == "tiled" else {}
  out_XD = fn(p, h_XD, idx_XK, weights_XK, limit, alpha, **kwargs)
  return checkpoint_name(out_XD.reshape(B, T, D), "mlp_out"), logits_XE


def load_balancing_loss(router_logits_LXE, valid_X, top_k: int):
  """Switch-style auxiliary loss of transformers' gpt-oss (spec section 4), padding rows excluded."""
  E = router_logits_LXE.shape[-1]
  probs = jax.nn.softmax(router_logits_LXE.astype(F32), axis=-1)
  _, sel = jax.lax.top_k(probs, top_k)
  counts = jax.nn.one_hot(sel, E, dtype=F32).sum(axis=2)  # [L, X, E]; a token picks an expert once
  w = jnp.broadcast_to(valid_X.astype(F32)[None, :, None], counts.shape)
  n = jnp.maximum(jnp.sum(w[..., 0]), 1.0)
  f_E = jnp.sum(counts * w, axis=(0, 1)) / n
  p_E = jnp.sum(probs * w, axis=(0, 1)) / n
  return E * jnp.sum(f_E * p_E)


def decoder_layer(p, x_BTD, attend, *, cfg, kernel, tile):
  """`attend(p, h_BTD)` is this layer's attention block (`attention.attention` with its window bound)."""
  h = rms_norm(x_BTD, p["attn_norm"], cfg.rms_norm_eps)
  x_BTD = x_BTD + attend(p, h)
  x_BTD = with_logical_constraint(x_BTD, ("batch", "seq", "act_embed"))
  h = rms_norm(x_BTD, p["mlp_norm"], cfg.rms_norm_eps)
  y, logits_XE = moe(p, h, top_k=cfg.num_experts_per_tok, limit=cfg.swiglu_limit, alpha=cfg.swiglu_alpha,
                     kernel=kernel, tile=tile)
  x_BTD = with_logical_constraint(x_BTD + y, ("batch", "seq", "act_embed"))
  return x_BTD, logits_XE
