"""A KV cache for gpt-oss decoding and the one step that uses it: `extend` appends a chunk of tokens per row and
returns next-token logits with the same rounding as `model.forward` (prefill = a big chunk, decode = one token).

Axis legend (as model/layers.py): B rows, C chunk positions, P layer pairs, W ring slots of a sliding layer,
S cached positions of a full layer, D hidden, N query heads, K kv heads, G query heads per kv head, H head dim,
V vocab.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from numina_jax.model.config import GptOssConfig, yarn_inv_freq
from numina_jax.model.layers import apply_rope, dense, rms_norm, rope_cos_sin
from numina_jax.model.moe import moe, resolve_moe_kernel
from numina_jax.model.params import PER_LAYER
from numina_jax.sharding import named_sharding, with_logical_constraint

F32 = jnp.float32
KV_AXES = ("layers", "batch", "seq", "kv_heads", "head_dim")


class KVCache(NamedTuple):
  """Per-layer keys and values, stacked like the decoder's (sliding, full) layer pairs.

  Sliding layers keep a ring buffer: position p sits in slot p % W, and `slot_pos` records which position each
  slot holds (-1: empty), so the window mask stays exact after wrap-around. Full layers keep position p in slot p.
  Keys are stored after RoPE, in the compute dtype, as the full forward pass computes them.
  """
  sliding_k: jax.Array  # [P, B, W, K, H]
  sliding_v: jax.Array  # [P, B, W, K, H]
  full_k: jax.Array  # [P, B, S, K, H]
  full_v: jax.Array  # [P, B, S, K, H]
  slot_pos: jax.Array  # [B, W] int32: the position in each ring slot, -1 when empty
  length: jax.Array  # [B] int32: tokens cached per row, i.e. the position of the row's next token

  @property
  def batch(self) -> int:
    return self.length.shape[0]

  @property
  def max_len(self) -> int:
    return self.full_k.shape[2]

  @property
  def ring(self) -> int:
    return self.sliding_k.shape[2]


def _logical_axes() -> KVCache:
  return KVCache(KV_AXES, KV_AXES, KV_AXES, KV_AXES, ("batch", None), ("batch",))


def cache_shapes(cfg: GptOssConfig, batch: int, max_len: int, dtype) -> KVCache:
  """`ShapeDtypeStruct`s of a cache for `batch` rows of up to `max_len` positions."""
  P, K, H = cfg.num_layer_pairs, cfg.num_key_value_heads, cfg.head_dim
  W = min(cfg.sliding_window, max_len)  # a shorter cache never wraps, so fewer slots suffice
  kv = lambda n: jax.ShapeDtypeStruct((P, batch, n, K, H), jnp.dtype(dtype))
  return KVCache(kv(W), kv(W), kv(max_len), kv(max_len), jax.ShapeDtypeStruct((batch, W), jnp.int32),
                 jax.ShapeDtypeStruct((batch,), jnp.int32))


def cache_shardings(cfg: GptOssConfig, batch: int, max_len: int, mesh: jax.sharding.Mesh) -> KVCache:
  """Rows over the batch axes (data, fsdp, expert) and kv heads over `tensor`, where the sizes divide."""
  shapes = cache_shapes(cfg, batch, max_len, jnp.float32)
  return KVCache(*(named_sharding(mesh, axes, s.shape) for axes, s in zip(_logical_axes(), shapes)))


def init_cache(cfg: GptOssConfig, batch: int, max_len: int, dtype=jnp.float32,
               mesh: jax.sharding.Mesh | None = None) -> KVCache:
  """An empty cache, created in place on the devices (in its mesh shardings when `mesh` is given)."""
  return _cache_maker(cfg, batch, max_len, jnp.dtype(dtype), mesh)()


@functools.lru_cache(maxsize=64)
def _cache_maker(cfg, batch, max_len, dtype, mesh):
  shapes = cache_shapes(cfg, batch, max_len, dtype)

  def make():
    kv = [jnp.zeros(s.shape, s.dtype) for s in shapes[:4]]
    return KVCache(*kv, jnp.full(shapes.slot_pos.shape, -1, jnp.int32), jnp.zeros(shapes.length.shape, jnp.int32))

  out_shardings = cache_shardings(cfg, batch, max_len, mesh) if mesh is not None else None
  return jax.jit(make, out_shardings=out_shardings)  # one compilation per shape, not per call


def constrain(cache: KVCache) -> KVCache:
  """Pins a cache to its logical sharding inside a mesh context (a no-op outside one)."""
  return KVCache(*(with_logical_constraint(a, axes) for a, axes in zip(cache, _logical_axes())))


def take_rows(cache: KVCache, rows_b) -> KVCache:
  return KVCache(*(jnp.take(a, rows_b, axis=1) for a in cache[:4]), cache.slot_pos[rows_b], cache.length[rows_b])


def put_rows(cache: KVCache, rows_b, sub: KVCache) -> KVCache:
  """`cache` with rows `rows_b` (distinct) replaced by the rows of `sub`."""
  kv = [a.at[:, rows_b].set(s, unique_indices=True) for a, s in zip(cache[:4], sub[:4])]
  return KVCache(*kv, cache.slot_pos.at[rows_b].set(sub.slot_pos, unique_indices=True),
                 cache.length.at[rows_b].set(sub.length, unique_indices=True))


def copy_rows(cache: KVCache, src_r, dst_r) -> KVCache:
  """Row `dst_r[j]` becomes a copy of row `src_r[j]` (distinct destinations): n samples share one prefill."""
  return constrain(put_rows(cache, dst_r, take_rows(cache, src_r)))


def _write(cache_PBSKH, layer, slots_BC, new_BCKH):
  """Writes each row's chunk into its own slots of one layer; slots out of range are dropped.

  The batch axis is a scatter batching dimension, so a cache sharded over rows is updated where it lives.
  """
  B, C = slots_BC.shape
  idx = jnp.stack([jnp.broadcast_to(layer, (B, C)).astype(jnp.int32), slots_BC], axis=-1)
  dnums = lax.ScatterDimensionNumbers(
      update_window_dims=(2, 3), inserted_window_dims=(0, 2), scatter_dims_to_operand_dims=(0, 2),
      operand_batching_dims=(1,), scatter_indices_batching_dims=(0,))
  return lax.scatter(cache_PBSKH, idx, new_BCKH.astype(cache_PBSKH.dtype), dnums,
                     mode=lax.GatherScatterMode.FILL_OR_DROP)


def attend(q_BCNH, k_BSKH, v_BSKH, mask_BCS, sinks_N, dtype):
  """Grouped-query attention of a chunk's queries against cached keys, rounded as `layers.attention`: scores
  accumulated in fp32 and rounded to `dtype`, the sink folded into the fp32 softmax denominator."""
  B, C, N, H = q_BCNH.shape
  K = k_BSKH.shape[2]
  q_BCKGH = q_BCNH.reshape(B, C, K, N // K, H)
  scores = jnp.einsum("bckgh,bskh->bkgcs", q_BCKGH, k_BSKH, preferred_element_type=F32).astype(dtype)
  scores = scores * jnp.asarray(H ** -0.5, dtype)
  scores = jnp.where(mask_BCS[:, None, None], scores, jnp.finfo(dtype).min).astype(F32)
  sinks = sinks_N.astype(dtype).astype(F32).reshape(1, K, N // K, 1, 1)
  m = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sinks)
  e = jnp.exp(scores - m)
  probs = (e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sinks - m))).astype(dtype)
  o_BCKGH = jnp.einsum("bkgcs,bskh->bckgh", probs, v_BSKH, preferred_element_type=F32).astype(dtype)
  return o_BCKGH.reshape(B, C, N, H)


def extend(params, cache: KVCache, tokens_BC, n_new_B, reset_B, rows_B=None, *, cfg: GptOssConfig, dtype,
           kv_len: int, moe_kernel: str = "auto", moe_tile: int = 0, all_logits: bool = False):
  """Appends the first `n_new_B[b]` tokens of `tokens_BC[b]` to row b at its own position; the rest is padding.

  Returns `(logits, cache)`: logits [B, V] at each row's last new token (garbage for rows with no new token), or
  [B, C, V] at every chunk position with `all_logits`. `reset_B` empties a row first (a new sequence in a used
  slot). With `rows_B`, the chunk's rows are those rows of `cache` (distinct), and other rows are untouched.
  `kv_len` (static) bounds the full layers' attention to the first `kv_len` cached positions: it must be at least
  the longest row after this step. Decode is `C = 1`; prefill is a chunk as long as the prompts.
  """
  if rows_B is not None:
    logits, sub = extend(params, take_rows(cache, rows_B), tokens_BC, n_new_B, reset_B, cfg=cfg, dtype=dtype,
                         kv_len=kv_len, moe_kernel=moe_kernel, moe_tile=moe_tile, all_logits=all_logits)
    return logits, constrain(put_rows(cache, rows_B, sub))

  dtype = jnp.dtype(dtype)
  kernel = resolve_moe_kernel(moe_kernel)
  B, C = tokens_BC.shape
  W, Wc, S = cfg.sliding_window, cache.ring, cache.max_len
  if not 0 < kv_len <= S:
    raise ValueError(f"kv_len {kv_len} must be in [1, {S}] (the cache's max_len)")
  start_B = jnp.where(reset_B, 0, cache.length)
  end_B = start_B + n_new_B
  c = jnp.arange(C)
  pos_BC = start_B[:, None] + c[None]
  new_BC = c[None] < n_new_B[:, None]

  # Masks. Sliding layers attend to the ring as it was before this chunk, then to the chunk itself (the chunk
  # may overwrite ring slots its own early queries still need); full layers write first and read [0, kv_len).
  ring_pos_BW = jnp.where(reset_B[:, None], -1, cache.slot_pos)
  ring_ok = (ring_pos_BW[:, None, :] >= 0) & (pos_BC[:, :, None] - ring_pos_BW[:, None, :] < W)
  chunk_ok = new_BC[:, None, :] & (c[:, None] >= c[None, :])[None] & (c[:, None] - c[None, :] < W)[None]
  sliding_mask = jnp.concatenate([ring_ok, chunk_ok], axis=-1)  # [B, C, Wc + C]
  full_mask = jnp.arange(kv_len)[None, None, :] <= pos_BC[:, :, None]  # [B, C, kv_len]

  # Where each new token goes: padding (and, in the ring, tokens that a later one of the same chunk overwrites)
  # gets an out-of-range slot and is dropped, so every write lands in a distinct slot.
  full_slot_BC = jnp.where(new_BC, pos_BC, S)
  ring_keep_BC = new_BC & (pos_BC >= end_B[:, None] - Wc)
  ring_slot_BC = jnp.where(ring_keep_BC, pos_BC % Wc, Wc)
  slot_pos = jax.vmap(lambda p, s, v: p.at[s].set(v, mode="drop"))(ring_pos_BW, ring_slot_BC, pos_BC)

  embed_VD = with_logical_constraint(params["embed"], ("vocab", None))
  x_BCD = jnp.take(embed_VD, tokens_BC, axis=0).astype(dtype)
  x_BCD = with_logical_constraint(x_BCD, ("batch", "seq", "act_embed"))
  inv_freq, attn_factor = yarn_inv_freq(cfg)
  cos, sin = rope_cos_sin(pos_BC, inv_freq, attn_factor, dtype)

  def layer(p, x, attn_fn):
    h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    q = apply_rope(dense(h, p["q_w"], p["q_b"], "btd,dnh->btnh"), cos, sin)
    k = apply_rope(dense(h, p["k_w"], p["k_b"], "btd,dkh->btkh"), cos, sin)
    v = dense(h, p["v_w"], p["v_b"], "btd,dkh->btkh")
    o, written = attn_fn(q, k, v, p["sinks"])
    x = x + dense(o, p["o_w"], p["o_b"], "btnh,nhd->btd")
    x = with_logical_constraint(x, ("batch", "seq", "act_embed"))
    h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    y, _, _ = moe(p, h, top_k=cfg.num_experts_per_tok, limit=cfg.swiglu_limit, alpha=cfg.swiglu_alpha,
               kernel=kernel, tile=moe_tile)
    return with_logical_constraint(x + y, ("batch", "seq", "act_embed")), written

  def pair(carry, xs):
    x, sk, sv, fk, fv = carry
    pp, i = xs

    def sliding(q, k, v, sinks):
      keys = jnp.concatenate([sk[i], k.astype(sk.dtype)], axis=1)
      vals = jnp.concatenate([sv[i], v.astype(sv.dtype)], axis=1)
      o = attend(q, keys, vals, sliding_mask, sinks, dtype)
      return o, (_write(sk, i, ring_slot_BC, k), _write(sv, i, ring_slot_BC, v))

    def full(q, k, v, sinks):
      fk2, fv2 = _write(fk, i, full_slot_BC, k), _write(fv, i, full_slot_BC, v)
      o = attend(q, fk2[i, :, :kv_len], fv2[i, :, :kv_len], full_mask, sinks, dtype)
      return o, (fk2, fv2)

    x, (sk, sv) = layer(jax.tree.map(lambda a: a[0], pp), x, sliding)
    x, (fk, fv) = layer(jax.tree.map(lambda a: a[1], pp), x, full)
    return (x, sk, sv, fk, fv), None

  stacked = {k: params[f"layers/{k}"] for k in PER_LAYER}
  paired = jax.tree.map(lambda a: a.reshape(a.shape[0] // 2, 2, *a.shape[1:]), stacked)
  carry = (x_BCD, cache.sliding_k, cache.sliding_v, cache.full_k, cache.full_v)
  (x_BCD, sk, sv, fk, fv), _ = lax.scan(pair, carry, (paired, jnp.arange(cfg.num_layer_pairs)))

  if not all_logits:  # only each row's last new token is needed: norm and project B vectors, not B*C
    last_B = jnp.maximum(n_new_B - 1, 0)
    x_BCD = jnp.take_along_axis(x_BCD, last_B[:, None, None], axis=1)
  h = rms_norm(x_BCD, params["final_norm"], cfg.rms_norm_eps)
  logits = jnp.einsum("btd,dv->btv", h, params["lm_head"].astype(dtype), preferred_element_type=F32).astype(dtype)
  logits = with_logical_constraint(logits, ("batch", "seq", "act_vocab"))
  logits = logits if all_logits else logits[:, 0]
  return logits, constrain(KVCache(sk, sv, fk, fv, slot_pos, end_B))
