"""The MoE under shard_map on 8 fake CPU devices: every mesh gives the dense reference's values and gradients, a
capacity limit drops exactly the assignments it should and counts them, the CPU emulation of ragged_all_to_all
keeps the op's documented semantics, and a TPU compile keeps the real ragged-all-to-all with per-chip buffers."""

import functools
import math
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import random_params, tpu_devices
from multihost import cpu_env, free_port
from numina_jax.loss import loss_terms
from numina_jax.model import forward, param_specs, tiny_config
from numina_jax.model import moe
from numina_jax.sharding import logical_to_spec, make_mesh

# Hidden 32 divides by fsdp 8 and tensor 2, width 24 by tensor 2, 8 experts by expert 8; top-3 of 8.
CFG = tiny_config(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_local_experts=8,
                  num_experts_per_tok=3)
B, T = 8, 12  # 96 tokens: 12 per device on 8 devices
LIMIT, ALPHA = CFG.swiglu_limit, CFG.swiglu_alpha


def _layer_params(cfg, seed, **replace):
  """One layer's parameters (MoE and router), fp32, with the helpers' noise levels."""
  p = {k.split("/")[1]: v[0] for k, v in random_params(cfg, seed).items() if k.startswith("layers/")}
  p = {k: jnp.asarray(replace.get(k, v)) for k, v in p.items() if k in moe.EXPERT_PARAMS or k.startswith("router")}
  return p


def _layer_axes(cfg):
  return {k.split("/")[1]: s.logical_axes[1:] for k, s in param_specs(cfg).items() if k.startswith("layers/")}


def _inputs(cfg, seed):
  r = np.random.RandomState(seed)
  x = jnp.asarray(r.normal(size=(B, T, cfg.hidden_size)).astype(np.float32))
  cot = jnp.asarray(r.normal(size=(B, T, cfg.hidden_size)).astype(np.float32))
  return x, cot


@functools.lru_cache(maxsize=None)
def _value_and_grad(cfg, kernel, capacity_factor=0.0):
  """(out, dropped), grads of sum(out * cot) with respect to the layer params and the input."""
  def f(p, x, cot):
    out, _, dropped = moe.moe(p, x, top_k=cfg.num_experts_per_tok, limit=LIMIT, alpha=ALPHA, kernel=kernel,
                              capacity_factor=capacity_factor)
    return jnp.sum(out * cot), (out, dropped)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


@functools.lru_cache(maxsize=None)
def _forward(cfg, kernel, capacity_factor=0.0):
  """(out, dropped)."""
  def f(p, x):
    out, _, dropped = moe.moe(p, x, top_k=cfg.num_experts_per_tok, limit=LIMIT, alpha=ALPHA, kernel=kernel,
                              capacity_factor=capacity_factor)
    return out, dropped
  return jax.jit(f)


@functools.lru_cache(maxsize=None)
def _dense_masked(cfg):
  """The dense reference with some assignments removed, and its gradients."""
  def f(p, x, cot, keep_XK):
    h = x.reshape(-1, x.shape[-1])
    _, idx, weights = moe.route(p, h, cfg.num_experts_per_tok)
    out = moe.moe_dense(p, h, idx, weights, LIMIT, ALPHA, keep_XK=keep_XK).reshape(x.shape)
    return jnp.sum(out * cot), out
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


def _forward_jaxpr(cfg, kernel, p, x) -> str:
  return str(jax.make_jaxpr(lambda p, x: moe.moe(p, x, top_k=cfg.num_experts_per_tok, limit=LIMIT, alpha=ALPHA,
                                                 kernel=kernel))(p, x))


def _shard(mesh, cfg, p, *acts):
  """Layer params as the model shards them, activations split over the batch axes."""
  axes = _layer_axes(cfg)
  sp = {k: jax.device_put(v, NamedSharding(mesh, logical_to_spec(axes[k], mesh=mesh, shape=v.shape)))
        for k, v in p.items()}
  act = NamedSharding(mesh, logical_to_spec(("batch", "seq", "act_embed"), mesh=mesh, shape=acts[0].shape))
  return (sp, *(jax.device_put(a, act) for a in acts))


def _assert_close(got, want, what, scale_tol=1e-5):
  (_, (out, _)), grads = got
  (_, (ref_out, _)), ref_grads = want
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=1e-5, rtol=0, err_msg=f"{what}: output")
  for name, ref in list(ref_grads[0].items()) + [("x", ref_grads[1])]:
    g = grads[1] if name == "x" else grads[0][name]
    ref = np.asarray(ref)
    assert np.abs(ref).max() > 0, name
    np.testing.assert_allclose(np.asarray(g), ref, atol=scale_tol * max(1.0, np.abs(ref).max()), rtol=0,
                               err_msg=f"{what}: d{name}")


@pytest.fixture(scope="module")
def reference():
  p = _layer_params(CFG, seed=11)
  x, cot = _inputs(CFG, seed=11)
  one = jax.devices()[0]
  p, x, cot = jax.device_put((p, x, cot), one)
  return p, x, cot, _value_and_grad(CFG, "dense")(p, x, cot)


def test_expert_axes_match_param_specs():
  axes = _layer_axes(CFG)
  assert {k: axes[k] for k in moe.EXPERT_PARAMS} == moe.EXPERT_PARAMS


@pytest.mark.parametrize("kernel", ["tiled", "ragged"])  # gmm: on a mesh below (interpret mode is slow)
def test_local_kernels_match_dense(reference, kernel):
  p, x, cot, ref = reference
  _assert_close(_value_and_grad(CFG, kernel)(p, x, cot), ref, kernel)


MESHES = [
    ({"fsdp": 8}, "tiled"),  # expert axis 1: local tokens, all experts, weights gathered over fsdp
    ({"expert": 8}, "tiled"),
    ({"expert": 2, "fsdp": 4}, "tiled"),
    ({"expert": 4, "tensor": 2}, "tiled"),
    ({"expert": 2, "fsdp": 2, "tensor": 2}, "gmm"),  # megablox in interpret mode
    ({"data": 2, "expert": 4}, "ragged"),
]


@pytest.mark.parametrize("shape,kernel", MESHES, ids=lambda v: ",".join(f"{k}={n}" for k, n in v.items())
                         if isinstance(v, dict) else v)
def test_mesh_matches_dense_reference(reference, shape, kernel):
  p, x, cot, ref = reference
  mesh = make_mesh(shape)
  sp, sx, scot = _shard(mesh, CFG, p, x, cot)
  fn = _value_and_grad(CFG, kernel)
  with jax.set_mesh(mesh):
    jaxpr = _forward_jaxpr(CFG, kernel, sp, sx)
    got = fn(sp, sx, scot)
  # The block really ran under shard_map with its collectives: dispatch over experts, FSDP gathers, tensor sums.
  assert "shard_map" in jaxpr
  assert ("all_to_all" in jaxpr) == (mesh.shape["expert"] > 1)
  assert ("all_gather" in jaxpr) == (mesh.shape["fsdp"] > 1 or mesh.shape["expert"] > 1)
  assert ("reduce_scatter" in jaxpr) == (mesh.shape["tensor"] > 1)
  _assert_close(got, ref, str(shape))


def test_tensor_parallel_psum_when_hidden_does_not_split():
  # Hidden 27 does not divide by tensor 2: the row-parallel down projection is all-reduced instead of scattered.
  cfg = tiny_config(vocab_size=64, hidden_size=27, intermediate_size=24, num_hidden_layers=2, num_local_experts=8,
                    num_experts_per_tok=3)
  p = _layer_params(cfg, seed=12)
  x, cot = _inputs(cfg, seed=12)
  ref = _value_and_grad(cfg, "dense")(p, x, cot)
  mesh = make_mesh({"expert": 4, "tensor": 2})
  sp, sx, scot = _shard(mesh, cfg, p, x, cot)
  fn = _value_and_grad(cfg, "tiled")
  with jax.set_mesh(mesh):
    jaxpr = _forward_jaxpr(cfg, "tiled", sp, sx)
    got = fn(sp, sx, scot)
  assert "psum" in jaxpr and "reduce_scatter" not in jaxpr
  _assert_close(got, ref, "hidden 27, tensor 2")


# Capacity --------------------------------------------------------------------------------------------------------
def _kept(idx_XK, group: int, capacity: int) -> np.ndarray:
  """Each expert keeps the first `capacity` assignments of each group of `group` consecutive tokens."""
  keep = np.zeros(idx_XK.shape, bool)
  for start in range(0, idx_XK.shape[0], group):
    seen = {}
    for t in range(start, start + group):
      for k, e in enumerate(idx_XK[t]):
        seen[e] = seen.get(e, 0) + 1
        keep[t, k] = seen[e] <= capacity
  return keep


def test_capacity_drops_hand_computed():
  # Router weights 0 and biases 5, 4, 3, 0...: every token picks experts 0, 1 and 2. With factor 1 on
  # (expert 4, fsdp 2), a dispatch group is the 4 x 12 = 48 tokens of one fsdp row and each expert keeps
  # ceil(48 * 3 / 8) = 18 of its 48 assignments: 2 groups x 3 experts x 30 = 180 dropped of 288, and exactly the
  # first 18 tokens of each group keep their output. Without a mesh the group is all 96 tokens: 3 x (96 - 36).
  bias = np.zeros(8, np.float32)
  bias[:3] = [5, 4, 3]
  p = _layer_params(CFG, seed=13, router_w=np.zeros((32, 8), np.float32), router_b=bias)
  x, _ = _inputs(CFG, seed=13)
  fn = _forward(CFG, "tiled", 1.0)
  dense = np.asarray(_forward(CFG, "dense")(p, x)[0]).reshape(B * T, -1)
  out, dropped = fn(p, x)
  assert int(dropped) == 3 * (96 - 36)
  out = np.asarray(out).reshape(B * T, -1)
  np.testing.assert_allclose(out[:36], dense[:36], atol=1e-5, rtol=0)
  assert np.all(out[36:] == 0)

  mesh = make_mesh({"expert": 4, "fsdp": 2})
  sp, sx = _shard(mesh, CFG, p, x)
  with jax.set_mesh(mesh):
    out, dropped = fn(sp, sx)
  assert int(dropped) == 2 * 3 * (48 - 18)
  out = np.asarray(out).reshape(B * T, -1)
  kept_rows = np.r_[0:18, 48:66]
  np.testing.assert_allclose(out[kept_rows], dense[kept_rows], atol=1e-5, rtol=0)
  assert np.all(np.delete(out, kept_rows, axis=0) == 0)


@pytest.mark.parametrize("shape", [{"expert": 4, "fsdp": 2}, {"expert": 4, "tensor": 2}],
                         ids=["expert=4,fsdp=2", "expert=4,tensor=2"])
def test_capacity_equals_dense_with_the_dropped_assignments_removed(reference, shape):
  p, x, cot, _ = reference
  factor = 1.0
  h = np.asarray(x).reshape(B * T, -1)
  _, idx, _ = moe.route(p, jnp.asarray(h), CFG.num_experts_per_tok)
  mesh = make_mesh(shape)
  group = 4 * (B * T // (8 // shape.get("tensor", 1)))  # tokens split over the axes other than tensor
  capacity = math.ceil(factor * group * CFG.num_experts_per_tok / CFG.num_local_experts)
  keep = _kept(np.asarray(idx), group, capacity)
  assert 0 < (~keep).sum() < keep.size // 4  # some drops, not most
  want = _dense_masked(CFG)(p, x, cot, jnp.asarray(keep))
  sp, sx, scot = _shard(mesh, CFG, p, x, cot)
  with jax.set_mesh(mesh):
    got = _value_and_grad(CFG, "tiled", factor)(sp, sx, scot)
  assert int(got[0][1][1]) == (~keep).sum()
  (loss, out), grads = want
  _assert_close(got, ((loss, (out, None)), grads), "capacity 1.0")


def test_dropped_count_reaches_the_loss_metrics():
  # Every layer drops as in the hand-computed case above: 180 per layer without a mesh.
  params = {k: jnp.asarray(v) for k, v in random_params(CFG, seed=14).items()}
  bias = np.zeros(8, np.float32)
  bias[:3] = [5, 4, 3]
  params["layers/router_w"] = jnp.zeros_like(params["layers/router_w"])
  params["layers/router_b"] = jnp.broadcast_to(jnp.asarray(bias), params["layers/router_b"].shape)
  ids = np.random.RandomState(14).randint(0, CFG.vocab_size, (B, T))
  batch = {"input_ids": ids, "targets": ids, "loss_mask": np.ones((B, T), np.float32),
           "segment_ids": np.ones((B, T), np.int32), "positions": np.broadcast_to(np.arange(T), (B, T))}
  terms = jax.jit(functools.partial(loss_terms, model_cfg=CFG, dtype=jnp.float32, remat_policy="none",
                                moe_kernel="tiled", moe_tile=0, loss_chunk=0, aux_coef=0.0, z_coef=0.0,
                                moe_capacity_factor=1.0))
  _, metrics = terms(params, batch)
  assert float(metrics["moe_dropped"]) == CFG.num_hidden_layers * 3 * (96 - 36)


def test_dense_kernel_refuses_a_capacity():
  p = _layer_params(CFG, seed=15)
  x, _ = _inputs(CFG, seed=15)
  with pytest.raises(ValueError, match="moe_capacity_factor needs a grouped kernel"):
    moe.moe(p, x, top_k=3, limit=LIMIT, alpha=ALPHA, kernel="dense", capacity_factor=1.0)


# The whole model: router logits and the aux loss under a mesh ----------------------------------------------------
def test_router_logits_and_aux_loss_on_a_mesh():
  # The router runs on each device's own tokens and the loss reduces over all of them: same value as one device.
  params = {k: jnp.asarray(v) for k, v in random_params(CFG, seed=16).items()}
  ids = jnp.asarray(np.random.RandomState(16).randint(0, CFG.vocab_size, (B, T)))
  valid = jnp.ones((B * T,), bool)

  def aux(p, ids):
    logits, router = forward(p, ids, CFG, return_router_logits=True)
    return moe.load_balancing_loss(router, valid, CFG.num_experts_per_tok), logits, router

  fn = jax.jit(aux)
  ref, ref_logits, ref_router = fn(params, ids)
  mesh = make_mesh({"expert": 2, "fsdp": 2, "tensor": 2})
  shardings = {k: NamedSharding(mesh, logical_to_spec(s.logical_axes, mesh=mesh, shape=s.shape))
               for k, s in param_specs(CFG).items()}
  with jax.set_mesh(mesh):
    got, logits, router = fn(jax.device_put(params, shardings),
                             jax.device_put(ids, NamedSharding(mesh, P(("data", "fsdp", "expert")))))
  assert router.sharding.spec[1] is not None  # router logits stay split by token
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=2e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(router), np.asarray(ref_router), atol=2e-5, rtol=0)
  np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)


# ragged_all_to_all: the CPU emulation against the op's documented semantics --------------------------------------
def _emulated(n_dev, operand, output, *meta):
  mesh = jax.make_mesh((n_dev,), ("x",), devices=jax.devices()[:n_dev])
  fn = jax.shard_map(functools.partial(moe.ragged_all_to_all_emulated, axis_name="x"), mesh=mesh,
                     in_specs=(P("x"),) * 6, out_specs=P("x"))
  flat = lambda a: jax.device_put(np.concatenate(a), NamedSharding(mesh, P("x")))  # noqa: E731
  return np.asarray(jax.jit(fn)(flat(operand), flat(output), *map(flat, meta))).reshape(n_dev, -1)


def test_ragged_all_to_all_emulation_docstring_example():
  # The example in jax.lax.ragged_all_to_all's docstring, on an axis of size 2.
  got = _emulated(2, [[1, 2, 2], [3, 4, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]], [[0, 1], [0, 1]], [[1, 2], [1, 1]],
                  [[0, 0], [1, 2]], [[1, 1], [2, 1]])
  np.testing.assert_array_equal(got, [[1, 3, 0, 0], [2, 2, 4, 0]])


def test_ragged_all_to_all_emulation_random():
  # Random ragged sends on 8 devices against the documented send/receive loop, written out in numpy.
  S, N, R = 8, 16, 20
  r = np.random.RandomState(0)
  send = r.randint(0, 3, (S, S))  # send[i, j]: rows device i sends to device j
  operand = r.randint(1, 100, (S, N)).astype(np.int32)
  output = -np.ones((S, R), np.int32)
  in_off = np.stack([np.r_[0, np.cumsum(send[i])[:-1]] for i in range(S)])
  land = np.stack([np.cumsum(send, axis=0)[i] - send[i] + 1 for i in range(S)])  # leave row 0 untouched
  recv = send.T.copy()
  want = output.copy()
  for i in range(S):
    for j in range(S):
      want[j, land[i, j]:land[i, j] + send[i, j]] = operand[i, in_off[i, j]:in_off[i, j] + send[i, j]]
  got = _emulated(S, operand, output, in_off.astype(np.int32), send.astype(np.int32), land.astype(np.int32),
                  recv.astype(np.int32))
  np.testing.assert_array_equal(got, want)


# Two processes ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_with_the_expert_axis_across_them():
  # As on a multi-host slice: two processes of 4 CPU devices each form one 8-device mesh (expert 4 x tensor 2)
  # whose expert axis crosses the process boundary; the dispatch and its gradients run over the network.
  port = free_port()
  env = cpu_env(4)
  script = str(Path(__file__).with_name("moe_two_process.py"))
  procs = [subprocess.Popen([sys.executable, script, str(i), str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env) for i in range(2)]
  try:
    outs = [p.communicate(timeout=600)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i}:\n{out[-3000:]}"
    assert f"process {i}: MoE values and gradients match the dense reference" in out


# The real op, compiled for a TPU slice ---------------------------------------------------------------------------
def _tpu_moe_hlo(shape: dict, xb: int, xt: int) -> str:
  """The compiled TPU HLO of one MoE layer's forward (ragged kernel) on a v5p:2x2x1 mesh of `shape`."""
  mesh = make_mesh(shape, tpu_devices("v5p:2x2x1"))
  cfg = tiny_config(hidden_size=128, intermediate_size=128, num_local_experts=8, num_experts_per_tok=2)
  axes = _layer_axes(cfg)
  shapes = {k.split("/")[1]: s.shape[1:] for k, s in param_specs(cfg).items() if k.startswith("layers/")}
  p = {k: jax.ShapeDtypeStruct(shapes[k], jnp.bfloat16,
                               sharding=NamedSharding(mesh, logical_to_spec(axes[k], mesh=mesh, shape=shapes[k])))
       for k in list(moe.EXPERT_PARAMS) + ["router_w", "router_b"]}
  x = jax.ShapeDtypeStruct((xb, xt, 128), jnp.bfloat16,
                           sharding=NamedSharding(mesh, logical_to_spec(("batch", None, None), mesh=mesh,
                                                                        shape=(xb, xt, 128))))

  def f(p, x):
    return moe.moe(p, x, top_k=2, limit=LIMIT, alpha=ALPHA, kernel="ragged")[0]

  with jax.set_mesh(mesh):
    return jax.jit(f).lower(p, x).compile().as_text()


def test_tpu_tensor_reduce_runs_over_the_assignments_not_the_buffer():
  # expert 2 x tensor 2: tokens split over the 2 expert shards, 32 x 32 / 2 = 512 each, 1024 assignments (k 2);
  # the receive buffer is 2 peers x 512 x min(2, 4 local experts) = 2048 rows. The partial down projections come
  # back first and are reduced over the tensor axis on the 1024 assignment rows.
  from numina_jax import hlo
  text = _tpu_moe_hlo({"expert": 2, "tensor": 2}, 32, 32)
  module = hlo.parse_module(text)
  reduced_rows = set()
  for comp in module.computations.values():
    for ins in comp.instructions.values():
      kind = ins.opcode.removesuffix("-start")
      if kind in ("all-reduce", "reduce-scatter") and ins.operands:
        dims = hlo.shape_dims(comp.instructions[ins.operands[0]].shape)
        if dims[-1] == 128:
          reduced_rows.add(dims[0])
  assert reduced_rows == {1024}, reduced_rows


def test_tpu_compile_keeps_ragged_all_to_all_and_local_rows():
  xb, xt = 4, 32
  hlo = _tpu_moe_hlo({"expert": 2, "fsdp": 2}, xb, xt)
  assert hlo.count("ragged-all-to-all(") == 2  # dispatch and return
  # Each chip's grouped matmuls see its worst-case receive buffer: 2 peers x 32 local tokens x min(k=2, 4 local
  # experts) = 128 rows, not the 128 x 2 = 256 assignments of the whole batch.
  rows = re.findall(r"%ragged-dot\S* = f32\[(\d+),\d+\]", hlo)
  assert rows and {int(r) for r in rows} == {2 * (xb * xt // 4) * 2}, rows
  assert 2 * (xb * xt // 4) * 2 != xb * xt * 2
