"""Sharding: sharded forward (and backward) equal one device on 8 fake CPU devices, the golden per-parameter
sharding of the 120b model on a 512-device mesh, and the mesh builder's error messages."""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from helpers import random_params, require_shared, tpu_devices
from numina_jax.model import GptOssConfig, forward, param_specs, tiny_config
from numina_jax.sharding import MESH_AXES, logical_to_spec, make_mesh, param_shardings

GOLDEN = Path(__file__).parent / "golden" / "sharding_120b.json"
GOLDEN_MESH = {"data": 1, "fsdp": 16, "expert": 8, "tensor": 4}  # 512 devices

# Sizes chosen to divide by the mesh axes below: hidden 32 (fsdp 8), 4 query heads (tensor 4), 2 kv heads
# (tensor 2; replicated under tensor 4), 8 experts (expert 2/4), width 24, vocab 160, batch 8.
CFG = tiny_config(vocab_size=160, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_local_experts=8,
                  num_experts_per_tok=3, sliding_window=5)
B, T = 8, 12
MESHES = [
    {"data": 8},
    {"fsdp": 8},
    {"fsdp": 2, "tensor": 4},
    {"expert": 2, "fsdp": 2, "tensor": 2},
    {"data": 2, "expert": 4},
]
BATCH = P(("data", "fsdp", "expert"))


def _loss(p, ids):
  logits = forward(p, ids, CFG)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)), logits


_fwd = jax.jit(lambda p, ids: forward(p, ids, CFG))
_grad = jax.jit(jax.value_and_grad(_loss, has_aux=True))


@pytest.fixture(scope="module")
def single_device():
  params = {k: jnp.asarray(v) for k, v in random_params(CFG, seed=7).items()}
  ids = jnp.asarray(np.random.RandomState(7).randint(0, CFG.vocab_size, (B, T)))
  one = jax.devices()[0]
  params, ids = jax.device_put((params, ids), one)
  return params, ids, np.asarray(_fwd(params, ids))


def _shard(mesh, params, ids):
  shardings = param_shardings(param_specs(CFG), mesh)
  return (jax.device_put(params, shardings), jax.device_put(ids, NamedSharding(mesh, BATCH)), shardings)


def test_eight_devices():
  assert len(jax.devices()) == 8 and jax.default_backend() == "cpu"


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_sharded_forward_matches_one_device(single_device, shape):
  params, ids, ref = single_device
  mesh = make_mesh(shape)
  sp, sids, shardings = _shard(mesh, params, ids)
  split = [k for k, v in sp.items() if v.addressable_shards[0].data.shape != v.shape]
  if set(shape) == {"data"}:
    assert not split  # pure data parallel replicates every parameter
  else:
    assert split, "no parameter is actually split on this mesh"
  assert sids.addressable_shards[0].data.shape[0] < B  # the batch is split on every mesh here
  with jax.set_mesh(mesh):
    out = _fwd(sp, sids)
  assert out.sharding.spec[0] is not None  # logits come out batch-sharded
  np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=0)


def test_sharded_gradients_match_one_device(single_device):
  params, ids, ref_logits = single_device
  (ref_loss, _), ref_grads = _grad(params, ids)
  mesh = make_mesh({"expert": 2, "fsdp": 2, "tensor": 2})
  sp, sids, shardings = _shard(mesh, params, ids)
  with jax.set_mesh(mesh):
    (loss, logits), grads = _grad(sp, sids)
  np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=2e-5, rtol=0)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  for k, g in grads.items():
    ref = np.asarray(ref_grads[k])
    np.testing.assert_allclose(np.asarray(g), ref, atol=1e-5 * max(1.0, np.abs(ref).max()), rtol=0, err_msg=k)


# Golden per-parameter sharding of the 120b model ---------------------------------------------------------------
def _config_120b() -> GptOssConfig:
  # The gpt-oss defaults with the 120b depth and expert count (spec section 1).
  return GptOssConfig(num_hidden_layers=36, num_local_experts=128)


def _table(cfg: GptOssConfig) -> dict:
  mesh = AbstractMesh(tuple(GOLDEN_MESH[a] for a in MESH_AXES), MESH_AXES)
  specs = param_specs(cfg)
  shardings = param_shardings(specs, mesh)
  params = {}
  for name, spec in specs.items():
    pspec = tuple(shardings[name].spec) + (None,) * (len(spec.shape) - len(shardings[name].spec))
    shard = [d // int(np.prod([GOLDEN_MESH[a] for a in ((p,) if isinstance(p, str) else (p or ()))]))
             for d, p in zip(spec.shape, pspec)]
    params[name] = {"shape": list(spec.shape), "logical": list(spec.logical_axes),
                    "spec": [list(p) if isinstance(p, tuple) else p for p in pspec], "shard": shard}
  return {"mesh": GOLDEN_MESH, "params": params}


def _dump(table: dict) -> str:
  """JSON with one line per parameter, so a diff names the parameters whose sharding changed."""
  rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in table["params"].items())
  return f'{{"mesh": {json.dumps(table["mesh"])},\n "params": {{\n{rows}\n }}\n}}\n'


def test_120b_config_is_the_released_one():
  # The golden table below is built from `_config_120b()` alone; this confirms that config is the release's.
  assert _config_120b() == GptOssConfig.from_pretrained(str(require_shared("hf/gpt-oss-120b/config.json")))


def test_golden_120b_sharding():
  table = _table(_config_120b())
  if os.environ.get("UPDATE_GOLDEN") == "1":
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(_dump(table))
  assert GOLDEN.exists(), f"{GOLDEN} is missing; create it with UPDATE_GOLDEN=1"
  golden = json.loads(GOLDEN.read_text())
  assert golden["mesh"] == table["mesh"]
  assert sorted(golden["params"]) == sorted(table["params"])
  for name, want in golden["params"].items():
    assert table["params"][name] == want, f"{name}: sharding changed; rerun with UPDATE_GOLDEN=1 if intended"


def test_golden_120b_facts():
  # Facts the table must show independently of how it was produced: every expert weight is split four ways
  # (expert x fsdp x tensor = 512 devices), and each device holds 1/512 of it.
  table = _table(_config_120b())["params"]
  for name in ("gate_w", "up_w", "down_w"):
    entry = table[f"layers/{name}"]
    assert entry["spec"][1] == "expert" and set(entry["spec"][2:]) == {"fsdp", "tensor"}
    assert np.prod(entry["shape"]) == 512 * np.prod(entry["shard"])
  assert table["embed"]["spec"] == ["tensor", "fsdp"] and table["embed"]["shard"] == [201088 // 4, 2880 // 16]
  assert table["layers/q_w"]["shard"] == [36, 2880 // 16, 64 // 4, 64]
  assert all(set(e["spec"]) == {None} for k, e in table.items() if k.endswith("norm"))


# Written by hand from DEFAULT_RULES (vocab -> tensor, embed -> fsdp, q/kv heads -> tensor, experts -> expert,
# mlp -> tensor; head_dim, layers and the router's expert axis replicated) for the 120b sizes (vocab 201088, hidden
# 2880, 64 query heads and 8 kv heads of 64, 128 experts of width 2880, 36 layers) on fsdp 16 x expert 8 x tensor 4,
# where every one of these sizes divides its mesh axes.
HAND_120B = {
    "embed": (P("tensor", "fsdp"), (201088 // 4, 2880 // 16)),
    "lm_head": (P("fsdp", "tensor"), (2880 // 16, 201088 // 4)),
    "layers/q_w": (P(None, "fsdp", "tensor", None), (36, 2880 // 16, 64 // 4, 64)),
    "layers/k_w": (P(None, "fsdp", "tensor", None), (36, 2880 // 16, 8 // 4, 64)),
    "layers/o_w": (P(None, "tensor", None, "fsdp"), (36, 64 // 4, 64, 2880 // 16)),
    "layers/gate_w": (P(None, "expert", "fsdp", "tensor"), (36, 128 // 8, 2880 // 16, 2880 // 4)),
    "layers/down_w": (P(None, "expert", "tensor", "fsdp"), (36, 128 // 8, 2880 // 4, 2880 // 16)),
    "layers/router_w": (P(None, "fsdp", None), (36, 2880 // 16, 128)),
    "layers/router_b": (P(None, None), (36, 128)),
}


def test_hand_written_120b_specs_match_the_rules_and_the_golden_table():
  mesh = AbstractMesh(tuple(GOLDEN_MESH[a] for a in MESH_AXES), MESH_AXES)
  shardings = param_shardings(param_specs(_config_120b()), mesh)
  golden = json.loads(GOLDEN.read_text())["params"]
  for name, (spec, shard) in HAND_120B.items():
    assert shardings[name].spec == spec, (name, shardings[name].spec)
    assert golden[name]["spec"] == list(spec) and golden[name]["shard"] == list(shard), (name, golden[name])


# Rules and mesh construction ------------------------------------------------------------------------------------
def test_logical_to_spec_rules():
  mesh = AbstractMesh((2, 2, 2, 1), MESH_AXES)
  # No mesh: the plain rule.
  assert logical_to_spec(("layers", "experts", "embed", "mlp")) == P(None, "expert", "fsdp", "tensor")
  # A size-1 mesh axis is dropped; a size that does not divide stays replicated.
  assert logical_to_spec(("embed", "mlp"), mesh=mesh, shape=(4, 4)) == P("fsdp", None)
  assert logical_to_spec(("embed",), mesh=mesh, shape=(3,)) == P(None)
  # A mesh axis is used once per array; batch takes what is left of (data, fsdp, expert).
  assert logical_to_spec(("embed", "batch"), mesh=mesh, shape=(4, 8)) == P("fsdp", ("data", "expert"))
  assert logical_to_spec(("batch",), mesh=mesh, shape=(8,)) == P(("data", "fsdp", "expert"))
  assert logical_to_spec(("batch",), mesh=mesh, shape=(2,)) == P("data")
  with pytest.raises(KeyError, match="logical axis 'heads' has no sharding rule"):
    logical_to_spec(("heads",))


def test_make_mesh():
  mesh = make_mesh({"fsdp": -1, "tensor": 2})
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 2}
  assert dict(make_mesh([2, 1, 2, 2]).shape) == {"data": 2, "fsdp": 1, "expert": 2, "tensor": 2}


@pytest.mark.parametrize("shape,message", [
    ({"fsdp": 4}, "mesh {'data': 1, 'fsdp': 4, 'expert': 1, 'tensor': 1} needs 4 devices, but 8 are available"),
    ({"fsdp": -1, "tensor": -1}, "at most one mesh axis may be -1"),
    ({"model": 8}, "unknown mesh axes ['model']; valid axes are ('data', 'fsdp', 'expert', 'tensor')"),
    ({"fsdp": -1, "tensor": 3}, "8 devices do not divide by the fixed mesh axes"),
    ({"fsdp": 0}, "mesh axis sizes must be positive or -1"),
    ([8, 1], "mesh shape needs 4 entries ('data', 'fsdp', 'expert', 'tensor'), got [8, 1]"),
])
def test_make_mesh_errors(shape, message):
  with pytest.raises(ValueError) as e:
    make_mesh(shape)
  assert message in str(e.value)


def test_a_tpu_mesh_follows_the_torus_even_where_an_axis_splits_a_physical_one():
  """The shipped v5p-128 mesh (fsdp 4 x expert 8 x tensor 2) needs a physical axis split; the tensor pairs are
  still torus neighbours, and an impossible layout is an error, never plain device order."""
  devices = tpu_devices("v5p:4x4x4")
  mesh = make_mesh({"fsdp": 4, "expert": 8, "tensor": 2}, devices)
  for pair in mesh.devices.reshape(-1, 2):
    a, b = (np.asarray(d.coords) for d in pair)
    assert np.abs(a - b).sum() == 1, (a, b)  # one ICI hop apart
  coords = {tuple(d.coords) for d in mesh.devices.flat}
  assert len(coords) == 64
  with pytest.raises(ValueError, match="cannot be laid out"):
    make_mesh({"fsdp": 3, "expert": 1}, devices[:3] * 1)


def test_a_parameter_that_does_not_divide_the_mesh_is_replicated_and_logged(caplog):
  mesh = make_mesh({"fsdp": 1, "tensor": 8})
  cfg = tiny_config(vocab_size=256, hidden_size=64, intermediate_size=32, num_attention_heads=8,
                    num_key_value_heads=2, head_dim=16, num_local_experts=4)
  with caplog.at_level("WARNING", logger="numina_jax"):
    shardings = param_shardings(param_specs(cfg), mesh)
  k_proj = "layers/k_w"
  assert "tensor" not in jax.tree.leaves(tuple(shardings[k_proj].spec))  # 2 KV heads on tensor 8: replicated
  assert any(k_proj in r.getMessage() and "do not divide" in r.getMessage() for r in caplog.records)
  q_proj = "layers/q_w"
  assert "tensor" in str(shardings[q_proj].spec)  # 8 query heads on tensor 8: split
