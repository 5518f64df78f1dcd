"""The HLO reader: whole-program FLOPs and collective bytes per device, with every loop body counted as often as its
loop runs, held to hand counts on CPU and on a TPU topology compiled from this host."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import tpu_devices
from numina_jax import hlo

F32 = 4  # bytes


def scanned_collectives(devices, trips: int) -> str:
  """A shard_map over 4 devices whose scan body all-gathers f32[8,128] into f32[32,128], reduce-scatters an
  f32[32,128] back to f32[8,128] and all-reduces an f32[16]."""
  mesh = jax.make_mesh((4,), ("x",), devices=devices[:4])

  def body(carry, _):
    a_8C, b_16 = carry
    g_32C = jax.lax.all_gather(a_8C, "x", tiled=True)
    s_8C = jax.lax.psum_scatter(g_32C * 2.0, "x", tiled=True)
    return (s_8C + a_8C, jax.lax.psum(b_16 + jnp.sum(s_8C), "x")), None

  def f(a, b):
    return jax.lax.scan(body, (a, b), None, length=trips)[0]

  fn = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("x"), P()), out_specs=(P("x"), P())))
  a = jax.ShapeDtypeStruct((32, 128), jnp.float32, sharding=NamedSharding(mesh, P("x")))
  b = jax.ShapeDtypeStruct((16,), jnp.float32, sharding=NamedSharding(mesh, P()))
  return fn.lower(a, b).compile().as_text()


def test_collective_bytes_inside_a_scan_on_cpu():
  got = hlo.analyze(scanned_collectives(jax.devices(), trips=3), 4)
  assert [lp.trips for lp in got.loops] == [3]
  c = got.collectives
  # all-gather: the gathered 32 x 128 f32 per trip; on a ring each device passes on 3 of the 4 parts.
  assert (c["all-gather"].count, c["all-gather"].bytes, c["all-gather"].ici_bytes) == (3, 3 * 32 * 128 * F32,
                                                                                      3 * 24 * 128 * F32)
  # reduce-scatter: the 32 x 128 operand, 3/4 of it sent; all-reduce: 16 floats, reduce-scatter + all-gather.
  assert (c["reduce-scatter"].count, c["reduce-scatter"].bytes, c["reduce-scatter"].ici_bytes) == (
      3, 3 * 32 * 128 * F32, 3 * 24 * 128 * F32)
  assert (c["all-reduce"].count, c["all-reduce"].bytes, c["all-reduce"].ici_bytes) == (3, 3 * 64, 3 * 2 * 48)
  assert c["all-to-all"].count == c["collective-permute"].count == 0


def test_collective_bytes_inside_a_scan_on_a_tpu_topology():
  got = hlo.analyze(scanned_collectives(tpu_devices(), trips=5), 4)
  assert [lp.trips for lp in got.loops] == [5]  # read from the loop's compare and counter, not a backend hint
  c = got.collectives
  assert (c["all-gather"].count, c["all-gather"].bytes) == (5, 5 * 32 * 128 * F32)
  # TPU's compiler may turn the small reduce-scatter into an all-reduce and a slice; the bytes reduced are the same.
  assert c["reduce-scatter"].bytes + c["all-reduce"].bytes == 5 * (32 * 128 + 16) * F32
  assert c["reduce-scatter"].count + c["all-reduce"].count == 10


def test_tpu_fused_reduce_scatter_of_a_scanned_gradient():
  """The gradient of weights all-gathered inside a scan comes back through TPU's all-reduce-scatter fusion (an
  all-reduce inside a fused computation, sliced): counted as a reduce-scatter of the full f32 gradient per layer."""
  devices = tpu_devices()
  mesh = jax.make_mesh((4,), ("x",), devices=devices, axis_types=(jax.sharding.AxisType.Explicit,))
  layers = 6

  def loss(w_LCC, x_BC):
    def body(h, w_CC):
      return h @ jax.sharding.reshard(w_CC, P()), None
    return jnp.sum(jax.lax.scan(body, x_BC, w_LCC)[0])

  w = jax.ShapeDtypeStruct((layers, 128, 128), jnp.float32, sharding=NamedSharding(mesh, P(None, "x", None)))
  x = jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=NamedSharding(mesh, P("x", None)))
  with jax.set_mesh(mesh):
    text = jax.jit(jax.grad(loss)).lower(w, x).compile().as_text()
  got = hlo.analyze(text, 4)
  assert sorted(lp.trips for lp in got.loops) == [layers, layers]
  rs = got.collectives["reduce-scatter"]
  assert (rs.count, rs.bytes) == (layers, layers * 128 * 128 * F32)
  assert got.collectives["all-gather"].count == layers


def scanned_matmuls(outer: int, inner: int) -> tuple[str, float]:
  """`inner` matmuls [64,128] x [128,128] in a scan nested in a scan of `outer`: (HLO text, XLA's own FLOPs)."""
  def f(w_CC, x_BC):
    def inner_body(h, _):
      return jnp.tanh(h @ w_CC), None

    def outer_body(h, _):
      return jax.lax.scan(inner_body, h, None, length=inner)[0], None
    return jax.lax.scan(outer_body, x_BC, None, length=outer)[0]

  compiled = jax.jit(f).lower(jax.ShapeDtypeStruct((128, 128), jnp.float32),
                              jax.ShapeDtypeStruct((64, 128), jnp.float32)).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return compiled.as_text(), float(cost["flops"])


def test_whole_program_flops_count_nested_loops_by_their_trips():
  per_matmul = 2 * 64 * 128 * 128
  for outer, inner in ((2, 3), (3, 5)):
    text, xla_once = scanned_matmuls(outer, inner)
    got = hlo.analyze(text, 1)
    assert sorted(lp.trips for lp in got.loops) == sorted([outer, inner])
    # The matmuls plus the elementwise tanh and loop counters: within 1% of the matmuls alone.
    assert got.xla_flops == pytest.approx(outer * inner * per_matmul, rel=0.01)
  # XLA's own analysis counts each loop body once, whatever the trips.
  assert xla_once < 2 * per_matmul


def test_parse_errors_name_the_problem():
  with pytest.raises(ValueError, match="no ENTRY computation"):
    hlo.analyze("HloModule m\n", 1)
  ins = hlo._parse_instruction("  %ag = f32[8]{0} all-gather(%p), replica_groups=weird, dimensions={0}")
  with pytest.raises(ValueError, match="replica groups of ag"):
    hlo.group_size(ins, 8)
