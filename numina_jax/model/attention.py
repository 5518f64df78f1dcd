"""gpt-oss attention (spec: shared/spec/gpt-oss.md, section 3.3): projections, RoPE, and a softmax core with a
learned sink per head, in interchangeable implementations that give the same values."""

# Axis legend: B batch, T query positions, S key positions, D hidden, N query heads, K kv heads, G query heads
# per kv head, H head dim; n query blocks, t / s positions inside a query block / key band.

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from numina_jax.model.layers import apply_rope, dense
from numina_jax.sharding import logical_to_spec

F32 = jnp.float32

# `dense` materializes every [T, S] score and masks them (the reference); `xla` computes only the blocks of
# scores the mask can reach (sliding layers: a band of key blocks per query block; full layers: the lower
# triangle of block pairs); `splash` is the Pallas TPU kernel, which skips masked blocks itself.
IMPLEMENTATIONS = ("auto", "xla", "dense", "splash")

# Block sizes of the XLA path, measured on the CPU bench config (seq 1024, window 128; benchmarks/README.md):
# sliding layers in 64-query blocks against a 192-key band; full layers in 256-token blocks (10 of the 16 tiles).
XLA_SLIDING_BLOCK = 64
XLA_CAUSAL_BLOCK = 256
# Splash tiles: TPU lanes are 128 wide (the kernel requires multiples of 128 for key blocks); larger tiles
# amortize the per-step overhead. Sequences are padded up to a multiple of the tile.
SPLASH_BLOCK = 512


def target_platform() -> str:
  """The platform the code is being compiled for: the context mesh's devices (a TPU topology compiled from a
  CPU host counts as TPU), else the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.default_backend()


def resolve_attention(name: str) -> str:
  """`auto` -> `splash` on TPU, `xla` elsewhere; other names are checked and returned."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {name!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
  if name == "auto":
    return "splash" if target_platform() == "tpu" else "xla"
  return name


def attention(p, x_BTD, cos, sin, segment_ids_BT, *, window: int | None, impl: str = "xla", block: int = 0):
  """Grouped-query self-attention with q/k/v/o biases and a learned per-head sink in the softmax denominator.

  Token i sees token j when j <= i, both are in the same segment, and (sliding layers) i - j < window. The
  compute dtype is x's.
  """
  q_BTNH = checkpoint_name(dense(x_BTD, p["q_w"], p["q_b"], "btd,dnh->btnh"), "qkv_proj")
  k_BTKH = checkpoint_name(dense(x_BTD, p["k_w"], p["k_b"], "btd,dkh->btkh"), "qkv_proj")
  v_BTKH = checkpoint_name(dense(x_BTD, p["v_w"], p["v_b"], "btd,dkh->btkh"), "qkv_proj")
  q_BTNH, k_BTKH = apply_rope(q_BTNH, cos, sin), apply_rope(k_BTKH, cos, sin)
  o_BTNH = self_attention(q_BTNH, k_BTKH, v_BTKH, p["sinks"], segment_ids_BT, window=window, impl=impl,
                          block=block)
  out = dense(o_BTNH, p["o_w"], p["o_b"], "btnh,nhd->btd")
  return checkpoint_name(out, "out_proj")


def self_attention(q_BTNH, k_BTKH, v_BTKH, sinks_N, segment_ids_BT, *, window: int | None, impl: str = "xla",
                   block: int = 0):
  """The attention core over rotated q, k, v (in the compute dtype): o [B, T, N, H].

  `window` None is causal attention; an int keeps the last `window` keys, self included. `block` overrides the
  implementation's block size (0: its default).
  """
  impl = resolve_attention(impl)
  T = q_BTNH.shape[1]
  if window is not None and window >= T:
    window = None  # every key a causal mask allows is inside the window
  if impl == "splash":
    return splash_attention(q_BTNH, k_BTKH, v_BTKH, sinks_N, segment_ids_BT, window=window,
                            block=block or SPLASH_BLOCK)
  q_BTKGH = _group(q_BTNH, k_BTKH.shape[2])
  if impl == "xla":
    block = block or (XLA_CAUSAL_BLOCK if window is None else XLA_SLIDING_BLOCK)
  if impl == "dense" or T <= block:  # a sequence within one block has nothing to skip
    o_BTKGH = masked_attention(q_BTKGH, k_BTKH, v_BTKH, sinks_N, attention_mask(segment_ids_BT, window))
  elif window is None:
    o_BTKGH = _causal_folded(q_BTKGH, k_BTKH, v_BTKH, sinks_N, segment_ids_BT, block)
  else:
    o_BTKGH = _sliding_banded(q_BTKGH, k_BTKH, v_BTKH, sinks_N, segment_ids_BT, window, block)
  return o_BTKGH.reshape(q_BTNH.shape)


def _group(q_BTNH, K: int):
  B, T, N, H = q_BTNH.shape
  return q_BTNH.reshape(B, T, K, N // K, H)  # query head n uses kv head n // G


def attention_mask(segment_ids_BT, window: int | None, segment_ids_BS=None):
  """Boolean [B, T, S]: causal by index, same segment, and i - j < window when a window is given."""
  segment_ids_BS = segment_ids_BT if segment_ids_BS is None else segment_ids_BS
  i = jnp.arange(segment_ids_BT.shape[1])[:, None]
  j = jnp.arange(segment_ids_BS.shape[1])[None, :]
  allowed = j <= i
  if window is not None:
    allowed = allowed & (i - j < window)
  return allowed[None] & (segment_ids_BT[:, :, None] == segment_ids_BS[:, None, :])


def masked_attention(q_TKGH, k_SKH, v_SKH, sinks_N, mask_TS):
  """Softmax attention under an explicit boolean mask, any leading axes (`...`) shared by all arguments.

  q [..., T, K, G, H], k and v [..., S, K, H], mask [..., T, S] -> o [..., T, K, G, H] in q's dtype. Rounding as
  transformers' eager attention: scores rounded to the compute dtype, scaled there, masked with its most
  negative value, softmax in fp32 with the sink as one more logit whose probability is dropped, probabilities
  rounded to the compute dtype before the value matmul. A row with nothing allowed gives o = 0.
  """
  dtype = q_TKGH.dtype
  K, G, H = q_TKGH.shape[-3:]
  scores = jnp.einsum("...tkgh,...skh->...kgts", q_TKGH, k_SKH, preferred_element_type=F32).astype(dtype)
  scores = scores * jnp.asarray(H ** -0.5, dtype)
  scores = jnp.where(mask_TS[..., None, None, :, :], scores, jnp.finfo(dtype).min).astype(F32)
  # Folding the sink into the max and the denominator gives the values of concatenating a sink column and
  # dropping it after the softmax, without copying the scores twice.
  sinks = sinks_N.astype(dtype).astype(F32).reshape(K, G, 1, 1)
  m = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sinks)
  e = jnp.exp(scores - m)
  probs = (e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sinks - m))).astype(dtype)
  return jnp.einsum("...kgts,...skh->...tkgh", probs, v_SKH, preferred_element_type=F32).astype(dtype)


def _causal_folded(q_BTKGH, k_BTKH, v_BTKH, sinks_N, seg_BT, block: int):
  """Causal attention over the lower triangle of (query block, key block) pairs only, in uniform shapes.

  Query block p (of `n` blocks) needs key blocks 0..p and block n-1-p needs 0..n-1-p: n + 1 key blocks for the
  two together. So the triangle folds into n/2 rows of n + 1 slots, each slot one (query block, key block) pair
  (slot s of row p: query block p against key block s when s <= p, else query block n-1-p against key block
  s-p-1). Every slot is a [block, block] score tile; each query's softmax max and denominator are reduced over
  its own slots, so the values are the dense path's up to summation order.
  """
  B, T, K, G, H = q_BTKGH.shape
  dtype = q_BTKGH.dtype
  block = min(block, -(-T // 2))  # a short sequence is two blocks, not a padded pair of full ones
  n = 2 * -(-T // (2 * block))
  h = n // 2
  Tp = n * block

  def pad(x):  # padded keys come after every real query; padded queries are dropped at the end
    return jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2))

  p_, s_ = np.arange(h)[:, None], np.arange(n + 1)[None, :]
  low = s_ <= p_  # [h, n + 1]: the slot belongs to the row's lower query block
  kblk = np.where(low, s_, s_ - p_ - 1)
  qblk = np.where(low, p_, n - 1 - p_)

  qb = pad(q_BTKGH).reshape(B, n, block, K, G, H)
  segb = pad(seg_BT).reshape(B, n, block)

  def per_slot(x_B_n):  # [B, n, ...] query-block values -> [B, h, n + 1, ...] for each slot's query block
    lo, up = x_B_n[:, :h], x_B_n[:, h:][:, ::-1]
    sel = low.reshape(1, h, n + 1, *[1] * (x_B_n.ndim - 2))
    return jnp.where(sel, lo[:, :, None], up[:, :, None])

  def reduce_slots(x, op, fill):  # [B, h, n+1, ...] -> per-slot value of its query block's reduction over slots
    sel = low.reshape(1, h, n + 1, *[1] * (x.ndim - 3))
    lo = op(jnp.where(sel, x, fill), axis=2, keepdims=True)
    up = op(jnp.where(sel, fill, x), axis=2, keepdims=True)
    return jnp.where(sel, lo, up), lo, up

  q_s = per_slot(qb)
  k_s = pad(k_BTKH).reshape(B, n, block, K, H)[:, kblk]
  v_s = pad(v_BTKH).reshape(B, n, block, K, H)[:, kblk]
  i = qblk[:, :, None, None] * block + np.arange(block)[:, None]
  j = kblk[:, :, None, None] * block + np.arange(block)[None, :]
  mask = jnp.asarray(j <= i)[None] & (per_slot(segb)[..., :, None] == segb[:, kblk][..., None, :])

  # masked_attention's steps, with the max and the denominator reduced over a query block's slots.
  scores = jnp.einsum("...tkgh,...skh->...kgts", q_s, k_s, preferred_element_type=F32).astype(dtype)
  scores = scores * jnp.asarray(H ** -0.5, dtype)
  scores = jnp.where(mask[..., None, None, :, :], scores, jnp.finfo(dtype).min).astype(F32)
  sinks = sinks_N.astype(dtype).astype(F32).reshape(K, G, 1)
  m, _, _ = reduce_slots(jnp.max(scores, axis=-1), jnp.max, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.maximum(m, sinks))  # any m gives the same softmax; its gradient cancels
  e = jnp.exp(scores - m[..., None])
  l, _, _ = reduce_slots(jnp.sum(e, axis=-1), jnp.sum, 0.0)
  probs = (e / (l + jnp.exp(sinks - m))[..., None]).astype(dtype)
  o = jnp.einsum("...kgts,...skh->...tkgh", probs, v_s, preferred_element_type=F32)
  _, o_lo, o_up = reduce_slots(o, jnp.sum, 0.0)
  o = jnp.concatenate([o_lo[:, :, 0], o_up[:, ::-1, 0]], axis=1).astype(dtype)
  return o.reshape(B, Tp, K, G, H)[:, :T]


def _sliding_banded(q_BTKGH, k_BTKH, v_BTKH, sinks_N, seg_BT, window: int, block: int):
  """Sliding-window attention over blocks of `block` queries, each against the band of key blocks its window
  reaches (its own and the `ceil((window - 1) / block)` before it). The sequence is padded to whole blocks."""
  B, T, K, G, H = q_BTKGH.shape
  prev = -(-(window - 1) // block)
  n = -(-T // block)
  tail = n * block - T
  front = prev * block

  def pad(x, before):  # padded keys are masked by position below, padded queries dropped at the end
    return jnp.pad(x, [(0, 0), (before, tail)] + [(0, 0)] * (x.ndim - 2))

  def band(x):  # [B, T, ...] -> [B, n, (prev + 1) * block, ...]: key blocks j - prev .. j for query block j
    xb = pad(x, front).reshape(B, n + prev, block, *x.shape[2:])
    xs = jnp.stack([xb[:, i:i + n] for i in range(prev + 1)], axis=2)
    return xs.reshape(B, n, (prev + 1) * block, *x.shape[2:])

  q_BntKGH = pad(q_BTKGH, 0).reshape(B, n, block, K, G, H)
  k_BnsKH, v_BnsKH, segk_Bns = band(k_BTKH), band(v_BTKH), band(seg_BT)
  segq_Bnt = pad(seg_BT, 0).reshape(B, n, block)
  i = np.arange(n)[:, None, None] * block + np.arange(block)[None, :, None]
  j = np.arange(n)[:, None, None] * block - front + np.arange((prev + 1) * block)[None, None, :]
  static = (j >= 0) & (j <= i) & (i - j < window)  # [n, t, s]
  mask = jnp.asarray(static)[None] & (segq_Bnt[..., :, None] == segk_Bns[..., None, :])
  o = masked_attention(q_BntKGH, k_BnsKH, v_BnsKH, sinks_N, mask)
  return o.reshape(B, n * block, K, G, H)[:, :T]


# Splash (Pallas TPU kernel) ----------------------------------------------------------------------------------
def splash_attention(q_BTNH, k_BTKH, v_BTKH, sinks_N, segment_ids_BT, *, window: int | None,
                     block: int = SPLASH_BLOCK, interpret: bool | None = None):
  """Splash attention with sinks, under `shard_map` over the context mesh (batch over the batch axes, heads over
  `tensor`). Off TPU it runs the kernel in interpret mode (slow; for tests). q is scaled here: the kernel does
  not scale it."""
  if interpret is None:
    interpret = target_platform() != "tpu"
  B, T, N, H = q_BTNH.shape
  mesh = jax.sharding.get_abstract_mesh()
  batch_spec, head_spec = _splash_specs(mesh, B, k_BTKH.shape[2])
  tile, Tp = _splash_tiles(T, block)
  kernel = _splash_kernel(Tp, window, N // _axis_size(mesh, head_spec), tile, interpret)
  scale = jnp.asarray(H ** -0.5, q_BTNH.dtype)

  def local(q, k, v, seg, sinks):
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q * scale, k, v))  # [b, heads, T, H]
    seg = seg.astype(jnp.int32)
    if Tp != T:  # padded keys sit after every real query, so causality hides them
      q, k, v = (jnp.pad(a, [(0, 0), (0, 0), (0, Tp - T), (0, 0)]) for a in (q, k, v))
      seg = jnp.pad(seg, [(0, 0), (0, Tp - T)])
    sinks = sinks.astype(q.dtype).astype(F32)

    def one(q, k, v, seg):
      from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds  # as in _splash_kernel
      return kernel(q, k, v, segment_ids=SegmentIds(q=seg, kv=seg), sinks=sinks)

    return jnp.swapaxes(jax.vmap(one)(q, k, v, seg)[:, :, :T], 1, 2)

  if batch_spec is None and head_spec is None:
    return local(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, sinks_N)
  P = jax.sharding.PartitionSpec
  qkv = P(batch_spec, None, head_spec, None)
  # Pallas calls carry no varying-manual-axes types in this jax, hence check_vma=False.
  return jax.shard_map(local, in_specs=(qkv, qkv, qkv, P(batch_spec, None), P(head_spec)), out_specs=qkv,
                       check_vma=False)(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, sinks_N)


def _splash_specs(mesh, batch: int, kv_heads: int):
  """(batch, heads) mesh axes of the shard_map, from the logical rules; (None, None) without a mesh."""
  if mesh.empty or mesh.size == 1:
    return None, None
  batch_spec = logical_to_spec(("batch",), mesh=mesh, shape=(batch,))[0]
  # Query head n uses kv head n // G, so both head axes split the same way, and only when the kv heads divide.
  head_spec = logical_to_spec(("kv_heads",), mesh=mesh, shape=(kv_heads,))[0]
  return batch_spec, head_spec


def _axis_size(mesh, spec) -> int:
  if spec is None:
    return 1
  return math.prod(mesh.shape[a] for a in ((spec,) if isinstance(spec, str) else spec))


def _splash_tiles(T: int, block: int) -> tuple[int, int]:
  """(tile, padded length): one tile of T rounded up to the 128 lanes when T fits in a block, else `block`."""
  tile = 128 * -(-T // 128) if T <= block else block
  return tile, tile * -(-T // tile)


@functools.lru_cache(maxsize=None)
def _splash_kernel(T: int, window: int | None, heads: int, tile: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # Pallas TPU code: only for the splash path
  if window is None:
    mask = sa.CausalMask((T, T))
  else:
    # LocalMask's left size counts keys before the query, so window - 1 of them plus self make the window.
    mask = sa.LocalMask((T, T), window_size=(window - 1, 0), offset=0)
  blocks = sa.BlockSizes(block_q=tile, block_kv=tile, block_kv_compute=tile, block_q_dkv=tile,
                         block_kv_dkv=tile, block_kv_dkv_compute=tile, block_q_dq=tile, block_kv_dq=tile)
  return sa.make_splash_mha(sa.MultiHeadMask([mask] * heads), block_sizes=blocks, head_shards=1,
                            q_seq_shards=1, interpret=interpret)


def splash_train_flops(cfg, batch: int, seq: int, mesh, *, recompute: bool, block: int = SPLASH_BLOCK) -> float:
  """FLOPs per device of one training step's splash kernels, which XLA's cost analysis does not count.

  Counts the [tile, tile] tiles the kernels visit (those the causal or window mask reaches) times their
  matmuls: 2 forward (q.k, p.v), 7 backward (the dk/dv kernel: q.k, do.v, p.do, ds.q; the dq kernel: q.k,
  do.v, ds.k), and 2 more when remat recomputes the forward.
  """
  batch_spec, head_spec = _splash_specs(mesh, batch, cfg.num_key_value_heads)
  rows = batch // _axis_size(mesh, batch_spec)
  heads = cfg.num_attention_heads // _axis_size(mesh, head_spec)
  tile, Tp = _splash_tiles(seq, block)
  i, j = np.arange(Tp // tile)[:, None], np.arange(Tp // tile)[None, :]
  full = np.sum(j <= i)
  window = min(cfg.sliding_window, seq)
  # The nearest pair of a (query tile i, key tile j) is i * tile - (j + 1) * tile + 1 positions apart.
  sliding = np.sum((j <= i) & ((i - j - 1) * tile + 1 < window))
  matmuls = 2 + 7 + (2 if recompute else 0)
  per_tile = matmuls * 2 * tile * tile * cfg.head_dim
  return float(cfg.num_layer_pairs * (full + sliding) * per_tile * rows * heads)
