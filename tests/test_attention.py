"""Attention implementations against the dense reference: blockwise XLA (values and gradients of the whole block),
splash in interpret mode under shard_map on a batch x tensor mesh, and splash compiled for a TPU slice."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import tpu_devices
from numina_jax.model import attention as A
from numina_jax.model.layers import rope_cos_sin
from numina_jax.sharding import make_mesh

# Every size distinct: hidden 40, 6 query heads of 16 over 2 kv heads (3 per group), 37 tokens (no block size
# below divides it).
D, N, K, H, T = 40, 6, 2, 16, 37


def _params(seed=0):
  r = np.random.default_rng(seed)
  shapes = {"q_w": (D, N, H), "q_b": (N, H), "k_w": (D, K, H), "k_b": (K, H), "v_w": (D, K, H), "v_b": (K, H),
            "o_w": (N, H, D), "o_b": (D,), "sinks": (N,)}
  return {k: jnp.asarray(r.normal(0, 0.3 if k.endswith("_b") or k == "sinks" else 0.25, s), jnp.float32)
          for k, s in shapes.items()}


def _packed_segments(B, T):
  """Row 0: three documents then padding (segment 0); row 1: one document; row 2: two documents, no padding."""
  seg = np.ones((B, T), np.int32)
  seg[0, 9:] = 2
  seg[0, 20:] = 3
  seg[0, 31:] = 0
  seg[2, 16:] = 5
  return seg[:B]


def _inputs(B=3, seed=1, dtype=jnp.float32):
  r = np.random.default_rng(seed)
  x = jnp.asarray(r.normal(0, 1, (B, T, D)), dtype)
  seg = _packed_segments(B, T)
  # Positions restart per document, as packing writes them.
  pos = np.zeros((B, T), np.int32)
  for b in range(B):
    for i in range(1, T):
      pos[b, i] = pos[b, i - 1] + 1 if seg[b, i] == seg[b, i - 1] else 0
  cos, sin = rope_cos_sin(jnp.asarray(pos), np.geomspace(1, 1e-3, H // 2).astype(np.float32), 1.3, dtype)
  return x, cos, sin, jnp.asarray(seg)


@functools.lru_cache(maxsize=None)
def _block_fn(impl, window, block):
  """(out, grads wrt every parameter and x) of <attention(x), w> for a fixed random w."""
  def f(p, x, cos, sin, seg, w):
    out = A.attention(p, x, cos, sin, seg, window=window, impl=impl, block=block)
    return jnp.sum(out.astype(jnp.float32) * w), out
  return jax.jit(jax.grad(f, argnums=(0, 1), has_aux=True))


def _block(impl, window, block, p, inputs):
  x = inputs[0]
  w = jnp.asarray(np.random.default_rng(2).normal(0, 1, x.shape), jnp.float32)
  (gp, gx), out = _block_fn(impl, window, block)(p, *inputs, w)
  return np.asarray(out.astype(jnp.float32)), {**jax.tree.map(np.asarray, gp), "x": np.asarray(gx)}


@pytest.mark.parametrize("window,block", [
    (7, 8),    # the band is the query block and the one before it
    (13, 4),   # the band reaches three blocks back
    (None, 8),  # causal in query chunks
    (60, 8),   # a window longer than the sequence: the causal path
])
def test_blockwise_matches_dense(window, block):
  p, inputs = _params(), _inputs()
  ref, gref = _block("dense", window, 0, p, inputs)
  out, g = _block("xla", window, block, p, inputs)
  # Measured: outputs (scale 6) equal to 4e-6, gradients to 1e-6 of their scale (summation order only).
  np.testing.assert_allclose(out, ref, atol=2e-6 * np.abs(ref).max(), rtol=0)
  assert set(g) == set(gref) == set(p) | {"x"}
  for k in gref:
    assert np.abs(gref[k]).max() > 0, k
    np.testing.assert_allclose(g[k], gref[k], atol=1e-5 * max(1.0, np.abs(gref[k]).max()), rtol=0, err_msg=k)


def test_blockwise_bf16_matches_dense():
  # Same roundings in the same order: only the softmax sums are reduced differently.
  p = {k: v.astype(jnp.bfloat16) for k, v in _params().items()}
  inputs = _inputs(dtype=jnp.bfloat16)
  fwd = jax.jit(lambda p, x, cos, sin, seg, *, impl, window, block:
            A.attention(p, x, cos, sin, seg, window=window, impl=impl, block=block).astype(jnp.float32),
            static_argnames=("impl", "window", "block"))
  for window, block in [(7, 8), (None, 8)]:
    ref = np.asarray(fwd(p, *inputs, impl="dense", window=window, block=0))
    out = np.asarray(fwd(p, *inputs, impl="xla", window=window, block=block))
    scale = np.abs(ref).max()
    assert np.mean(np.abs(out - ref)) < 1e-3 * scale
    np.testing.assert_allclose(out, ref, atol=2 ** -6 * scale, rtol=0)  # 1-2 bf16 ulps at the worst element


def test_window_and_segments_hand_computed():
  # Window 3 (self and two back); documents [1, 1, 2, 2, 2] then one padding token (segment 0).
  seg = jnp.asarray([[1, 1, 2, 2, 2, 0]])
  want = np.array([[1, 0, 0, 0, 0, 0],
                   [1, 1, 0, 0, 0, 0],
                   [0, 0, 1, 0, 0, 0],
                   [0, 0, 1, 1, 0, 0],
                   [0, 0, 1, 1, 1, 0],
                   [0, 0, 0, 0, 0, 1]], bool)
  np.testing.assert_array_equal(np.asarray(A.attention_mask(seg, 3))[0], want)
  full = np.asarray(A.attention_mask(jnp.asarray([[1, 1, 1, 1]]), None))[0]
  np.testing.assert_array_equal(full, np.tril(np.ones((4, 4), bool)))


def test_sink_only_row_and_probabilities():
  # One query, one key: o = e^a v / (e^a + e^s) with a = q.k / sqrt(H); a sink of -inf-like size gives o = v.
  q = jnp.full((1, 1, 1, 1, 4), 0.5)
  k = jnp.full((1, 1, 1, 4), 1.0)
  v = jnp.asarray([[[[1.0, -2.0, 3.0, 0.5]]]])
  mask = jnp.ones((1, 1, 1), bool)
  a, s = 0.5 * 4 / 2, 0.7
  o = A.masked_attention(q, k, v, jnp.asarray([s]), mask)
  np.testing.assert_allclose(np.asarray(o)[0, 0, 0, 0], np.exp(a) / (np.exp(a) + np.exp(s)) * np.asarray(v)[0, 0, 0],
                             rtol=1e-6)
  # Nothing allowed: the row is zero, not NaN.
  o = A.masked_attention(q, k, v, jnp.asarray([s]), ~mask)
  np.testing.assert_array_equal(np.asarray(o), 0)


def test_unknown_implementation_is_an_error():
  with pytest.raises(ValueError, match="unknown attention implementation 'flash'; choose one of auto, xla"):
    A.resolve_attention("flash")
  assert A.resolve_attention("auto") == "xla"  # on CPU


# Splash (interpret mode on CPU) ------------------------------------------------------------------------------
# The smallest shapes with several kernel blocks: 200 tokens padded to two 128-token tiles; 4 query heads over
# 2 kv heads so the tensor axis splits both; batch 4 over fsdp.
SB, ST, SN, SK, SH = 4, 200, 4, 2, 16


def _splash_inputs():
  r = np.random.default_rng(3)
  q, k, v = (jnp.asarray(r.normal(0, 1, (SB, ST, n, SH)), jnp.float32) for n in (SN, SK, SK))
  sinks = jnp.asarray(r.normal(0, 0.5, (SN,)), jnp.float32)
  seg = np.ones((SB, ST), np.int32)
  seg[0, 70:] = 2
  seg[0, 150:] = 0
  seg[1, 129:] = 4  # a document boundary just past the first tile
  w = jnp.asarray(r.normal(0, 1, (SB, ST, SN, SH)), jnp.float32)
  return q, k, v, sinks, jnp.asarray(seg), w


def _core_grads(impl, window, block, q, k, v, sinks, seg, w):
  def f(q, k, v, sinks):
    o = A.self_attention(q, k, v, sinks, seg, window=window, impl=impl, block=block)
    return jnp.sum(o * w), o
  (_, o), g = jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, sinks)
  return o, g


@pytest.mark.parametrize("window", [None, 100])
def test_splash_under_shard_map_matches_xla(window):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 before importing jax)")
  q, k, v, sinks, seg, w = _splash_inputs()
  ref_o, ref_g = jax.jit(functools.partial(_core_grads, "xla", window, 0))(q, k, v, sinks, seg, w)
  mesh = make_mesh({"fsdp": 4, "tensor": 2})
  heads = NamedSharding(mesh, P(("data", "fsdp", "expert"), None, "tensor", None))
  rows = NamedSharding(mesh, P(("data", "fsdp", "expert")))
  args = jax.device_put((q, k, v, sinks, seg, w), (heads, heads, heads, NamedSharding(mesh, P("tensor")), rows,
                                                   heads))
  with jax.set_mesh(mesh):
    fn = jax.jit(functools.partial(_core_grads, "splash", window, 128))
    text = fn.lower(*args).as_text()
    o, g = fn(*args)
  # The kernel runs per shard: a manual computation (Shardy, jax's default) or its GSPMD lowering.
  assert ("sdy.manual_computation" if jax.config.jax_use_shardy_partitioner else "SPMDFullToShardShape") in text
  assert o.sharding.spec[0] is not None and o.sharding.spec[2] == "tensor"
  # Measured: outputs to 5e-7, gradients to 3e-6.
  np.testing.assert_allclose(np.asarray(o), np.asarray(ref_o), atol=5e-6, rtol=0)
  for name, a, b in zip(("dq", "dk", "dv", "dsinks"), g, ref_g):
    b = np.asarray(b)
    assert np.abs(b).max() > 0, name
    np.testing.assert_allclose(np.asarray(a), b, atol=2e-5 * max(1.0, np.abs(b).max()), rtol=0, err_msg=name)


def test_splash_sliding_mask_keeps_exactly_the_window():
  # LocalMask((window - 1, 0)) keeps window - 1 keys back plus self; (window, 0) would keep one key too many,
  # which a unit value on the first key of each row exposes.
  T, window = 128, 5
  q = jnp.zeros((1, T, 1, 8))
  k = jnp.zeros((1, T, 1, 8))
  v = jnp.asarray((np.arange(T) == 0).astype(np.float32)[None, :, None, None] * np.ones((1, T, 1, 8)))
  seg = jnp.ones((1, T), jnp.int32)
  o = A.splash_attention(q, k, v, jnp.asarray([-30.0]), seg, window=window, block=128)
  # Uniform scores: row i averages keys max(0, i - window + 1) .. i, so key 0 gets 1 / (i + 1) while i < window.
  got = np.asarray(o)[0, :, 0, 0]
  want = np.where(np.arange(T) < window, 1.0 / (np.arange(T) + 1), 0.0)
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_splash_compiles_for_tpu():
  mesh = make_mesh({"fsdp": 2, "tensor": 2}, tpu_devices("v5p:2x2x1"))
  B, T, N, Kh, Hd = 4, 1024, 8, 2, 64
  heads = NamedSharding(mesh, P(("data", "fsdp", "expert"), None, "tensor", None))
  rows = NamedSharding(mesh, P(("data", "fsdp", "expert")))
  bf16 = jnp.bfloat16
  args = (jax.ShapeDtypeStruct((B, T, N, Hd), bf16, sharding=heads),
          jax.ShapeDtypeStruct((B, T, Kh, Hd), bf16, sharding=heads),
          jax.ShapeDtypeStruct((B, T, Kh, Hd), bf16, sharding=heads),
          jax.ShapeDtypeStruct((N,), jnp.float32, sharding=NamedSharding(mesh, P("tensor"))),
          jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=rows))

  def loss(q, k, v, sinks, seg):
    full = A.self_attention(q, k, v, sinks, seg, window=None, impl="auto")
    sliding = A.self_attention(q, k, v, sinks, seg, window=128, impl="auto")
    return jnp.sum((full + sliding).astype(jnp.float32))

  with jax.set_mesh(mesh):
    assert A.resolve_attention("auto") == "splash"  # the mesh's devices decide, not this CPU host
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(*args)
    compiled = lowered.compile()
  hlo = compiled.as_text()
  assert "tpu_custom_call" in hlo  # the Mosaic kernels, not an XLA fallback
  assert compiled.memory_analysis() is not None


@pytest.mark.parametrize("seq", [1024, 2048, 300])
def test_splash_flops_count_the_tiles_the_kernel_visits(seq):
  from numina_jax.model import tiny_config
  cfg = tiny_config(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                    sliding_window=128)
  one = make_mesh({"fsdp": 1}, jax.devices()[:1])
  tile, Tp = A._splash_tiles(seq, A.SPLASH_BLOCK)
  # The tiles the kernel itself plans to visit (block_mask > 0), full and sliding.
  visited = sum(int((np.asarray(A._splash_kernel(Tp, w, 1, tile, True).fwd_mask_info.block_mask)[0] > 0).sum())
                for w in (None, cfg.sliding_window))
  per_tile = 2 * tile * tile * 64
  want = 2 * visited * per_tile * 9 * 4 * 8  # 2 layer pairs, 9 matmuls, 4 rows, 8 heads
  assert A.splash_train_flops(cfg, 4, seq, one, recompute=False) == want
  assert A.splash_train_flops(cfg, 4, seq, one, recompute=True) == want * 11 / 9
  if seq == 2048:  # by hand: 4 tiles of 512; causal visits 10 of 16, the 128-window only the diagonal and below
    assert visited == 10 + 7
  # Sharded 4 x 2: each device has 1 row and 4 of the 8 heads.
  assert A.splash_train_flops(cfg, 4, seq, make_mesh({"fsdp": 4, "tensor": 2}), recompute=False) == want / 8
