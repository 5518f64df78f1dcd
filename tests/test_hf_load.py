"""Loading HF gpt-oss checkpoints (dense, and the real MXFP4 layout) against transformers, with and without a
device mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P

from helpers import (MXFP4_OVERRIDES, hf_logits, hf_state_to_params, require_shared, tiny_hf_model, token_ids,
                     write_mxfp4_checkpoint)
from multihost import cpu_env, free_port
from numina_jax.hf import keymap
from numina_jax.hf.load import (SafetensorsCheckpoint, _writer, load_pretrained, load_pretrained_params,
                                read_window)
from numina_jax.model.config import GptOssConfig
from numina_jax.model.params import param_specs
from numina_jax.sharding import make_mesh, param_shardings


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
  model, _, _ = tiny_hf_model(seed=0)
  path = str(tmp_path_factory.mktemp("dense"))
  model.save_pretrained(path)
  ids = token_ids(model.config.vocab_size)
  return path, model, ids, hf_logits(model, ids)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
  """The real on-disk MXFP4 layout (vocab 300 so a tensor mesh axis of 2 splits it), and transformers'
  dequantizing load of it in fp32 as the reference."""
  from transformers import AutoModelForCausalLM, Mxfp4Config

  source, _, _ = tiny_hf_model(seed=1, **MXFP4_OVERRIDES, vocab_size=300)
  path = str(tmp_path_factory.mktemp("mxfp4"))
  write_mxfp4_checkpoint(source, path, n_files=2)
  ref = AutoModelForCausalLM.from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True),
                                             dtype=torch.float32).eval()
  ids = token_ids(ref.config.vocab_size, seed=1)
  return path, ref, ids, hf_logits(ref, ids)


def test_dense_logits_match_transformers(dense):
  path, model, ids, ref = dense
  ours = load_pretrained(path, progress=False)
  assert ours.cfg.sliding_window < ids.shape[1]
  assert all(a.dtype == jnp.float32 for a in ours.params_dict().values())
  out = np.asarray(ours(jnp.asarray(ids)))
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_dense_params_exact_and_bf16(dense):
  path, model, _, _ = dense
  cfg = GptOssConfig.from_pretrained(path)
  want = hf_state_to_params(model.state_dict(), cfg)
  params, _ = load_pretrained_params(path, progress=False)
  for name, w in want.items():
    np.testing.assert_array_equal(np.asarray(params[name]), w, err_msg=name)
  params16, _ = load_pretrained_params(path, "bfloat16", progress=False)
  for name, w in want.items():
    assert params16[name].dtype == jnp.bfloat16, name
    np.testing.assert_array_equal(np.asarray(params16[name]), w.astype(jnp.bfloat16), err_msg=name)


def test_mxfp4_dequantized_weights_and_logits_match_transformers(quantized):
  path, ref, ids, ref_logits = quantized
  ckpt = SafetensorsCheckpoint(path)
  assert len({info.file for info in ckpt.tensors.values()}) == 2
  assert ckpt.tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"].dtype == "U8"
  assert ckpt.tensors["model.layers.0.self_attn.sinks"].dtype == "BF16"
  model = load_pretrained(path, progress=False)
  want = hf_state_to_params(ref.state_dict(), model.cfg)
  got = model.params_dict()
  for name, w in want.items():
    np.testing.assert_array_equal(np.asarray(got[name]), w, err_msg=name)  # bit-exact dequantization
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), ref_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("which", ["dense", "quantized"])
def test_windows_match_the_keymap(which, request):
  """Every windowed read (what one device shard asks for) equals the keymap's full conversion, sliced."""
  path = request.getfixturevalue(which)[0]
  cfg = GptOssConfig.from_pretrained(path)
  ckpt = SafetensorsCheckpoint(path)
  rng = np.random.default_rng(0)
  specs = param_specs(cfg)
  for entry in keymap.ENTRIES:
    layer = 2 if entry.per_layer else None
    name = entry.hf_name.format(i=layer) if entry.per_layer else entry.hf_name
    dense_value = ckpt.read_dense(name, tuple(slice(None) for _ in entry.hf_shape(cfg)))
    full = keymap.hf_to_ours(name, dense_value, cfg)
    shape = specs[("layers/" if entry.per_layer else "") + entry.targets[0]].shape[1 if entry.per_layer else 0:]
    for _ in range(3):
      index = []
      for n in shape:
        a = int(rng.integers(0, n))
        index.append(slice(a, int(rng.integers(a + 1, n + 1))))
      index = tuple(index)
      parts = read_window(ckpt, cfg, entry, layer, index)
      for target, part in zip(entry.targets, parts):
        key = ("layers/" if entry.per_layer else "") + target
        np.testing.assert_array_equal(part, full[key][index], err_msg=f"{key} {index}")


def test_mesh_load_shardings_and_logits(quantized):
  path, _, ids, ref_logits = quantized
  mesh = make_mesh({"fsdp": 2, "tensor": 2, "expert": 2})
  model = load_pretrained(path, mesh=mesh, progress=False)
  params = model.params_dict()
  want = param_shardings(param_specs(model.cfg), mesh)
  for name, arr in params.items():
    assert arr.sharding.is_equivalent_to(want[name], arr.ndim), (name, arr.sharding, want[name])
  # The rules, spelled out for the tensors that matter most (E=8, D=64, I=96, V=300, 6 heads, 2 kv heads).
  assert params["layers/gate_w"].sharding.spec == P(None, "expert", "fsdp", "tensor")
  assert params["layers/down_w"].sharding.spec == P(None, "expert", "tensor", "fsdp")
  assert params["layers/q_w"].sharding.spec == P(None, "fsdp", "tensor", None)
  assert params["embed"].sharding.spec == P("tensor", "fsdp")
  assert len(params["layers/gate_w"].addressable_shards) == 8
  assert params["layers/gate_w"].addressable_shards[0].data.shape == (4, 4, 32, 48)
  single, _ = load_pretrained_params(path, progress=False)
  for name, arr in params.items():
    np.testing.assert_array_equal(np.asarray(arr), np.asarray(single[name]), err_msg=name)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), ref_logits, atol=1e-4, rtol=0)


def _mapped_files():
  with open("/proc/self/maps") as f:
    return {line.split()[-1] for line in f if line.rstrip().endswith(".safetensors")}


@pytest.mark.parametrize("on_host", [True, False], ids=["host_fill", "device_writes"])
def test_pieces_exact_and_nothing_stays_mapped(quantized, on_host, monkeypatch):
  """Shards larger than `chunk_bytes` are read in pieces, filled into a host buffer the CPU device adopts, or (as
  on TPU) written into device buffers in place: either way the values are transformers' (one device, fp32) and
  the one-piece load's (a mesh, bf16), and no checkpoint file is left mapped into the process afterwards."""
  from numina_jax.hf import load

  monkeypatch.setattr(load, "_fills_on_host", lambda devices: on_host)
  path, ref, _, _ = quantized
  cfg = GptOssConfig.from_pretrained(path)
  want = hf_state_to_params(ref.state_dict(), cfg)
  whole, _ = load_pretrained_params(path, "bfloat16", make_mesh({"fsdp": 2, "tensor": 2, "expert": 2}),
                                    progress=False)
  # 32 KiB: the embedding and lm_head (300 x 64) go in 128-row pieces with a ragged tail, the experts one expert
  # at a time, q_w a layer at a time; norms and biases stay whole.
  _writer.cache_clear()
  params, _ = load_pretrained_params(path, progress=False, chunk_bytes=32 << 10)
  for name, w in want.items():
    assert params[name].sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0]), name
    np.testing.assert_array_equal(np.asarray(params[name]), w, err_msg=name)
  pieces, _ = load_pretrained_params(path, "bfloat16", make_mesh({"fsdp": 2, "tensor": 2, "expert": 2}),
                                     progress=False, chunk_bytes=32 << 10)
  assert (_writer.cache_info().misses > 0) == (not on_host)  # the in-place device writes ran, or did not
  for name, arr in whole.items():
    assert pieces[name].sharding == arr.sharding, name
    np.testing.assert_array_equal(np.asarray(pieces[name]), np.asarray(arr), err_msg=name)
  assert not {f for f in _mapped_files() if f.startswith(path)}


# One of two hosts with 4 CPU devices each: loads into the 8-device mesh in small pieces and saves the shards it
# holds, keyed by parameter and global index.
HOST = """
import pickle
import sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import numpy as np
from numina_jax.hf import load
from numina_jax.hf.load import load_pretrained_params
from numina_jax.sharding import make_mesh
load._fills_on_host = lambda devices: False  # as on TPU: pieces written in place through the global mesh
params, _ = load_pretrained_params(sys.argv[3], "bfloat16", make_mesh({"fsdp": 2, "tensor": 2, "expert": 2}),
                                   progress=False, chunk_bytes=16 << 10)
shards = [(name, [(i.start, i.stop) for i in s.index], s.device.id, np.asarray(s.data))
          for name, arr in params.items() for s in arr.addressable_shards]
with open(sys.argv[4], "wb") as f:
  pickle.dump(shards, f)
"""


@pytest.mark.slow
def test_two_hosts_load_their_shards_in_pieces(quantized, tmp_path):
  """Two processes on 127.0.0.1 form one 8-device job; each reads only its own shards, large ones in pieces
  written in place through the global mesh, and together they hold transformers' values (in bf16) on every
  device exactly once."""
  import pickle
  import subprocess
  import sys

  path, ref, _, _ = quantized
  want = hf_state_to_params(ref.state_dict(), GptOssConfig.from_pretrained(path))
  port = free_port()
  env = cpu_env(4)
  hosts = [subprocess.Popen([sys.executable, "-c", HOST, f"127.0.0.1:{port}", str(i), path,
                             str(tmp_path / f"host{i}.pkl")], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in (0, 1)]
  try:
    outs = [h.communicate(timeout=300) for h in hosts]
  finally:
    for h in hosts:
      if h.poll() is None:
        h.kill()
  assert all(h.returncode == 0 for h in hosts), [err[-3000:] for _, err in outs]
  covered = {name: np.zeros(w.shape, np.int32) for name, w in want.items()}
  devices = set()
  for i in (0, 1):
    with open(tmp_path / f"host{i}.pkl", "rb") as f:
      shards = pickle.load(f)
    assert len(shards) == 4 * len(want)  # every parameter on each of the 4 local devices
    for name, spans, device, data in shards:
      index = tuple(slice(a, b) for a, b in spans)
      assert data.dtype == jnp.bfloat16, name  # exact: the checkpoint is bf16 and MXFP4, both exact in bf16
      np.testing.assert_array_equal(data, want[name][index].astype(jnp.bfloat16), err_msg=f"host {i}: {name}{spans}")
      covered[name][index] += 1
      devices.add(device)
  assert len(devices) == 8
  for name, count in covered.items():  # each element on every device of its replica group, none missed
    assert count.min() == count.max() > 0, name


def test_hub_ids_go_through_snapshot_download(dense, monkeypatch):
  import huggingface_hub

  calls = []

  def fake(repo_id, **kw):
    calls.append((repo_id, kw))
    return dense[0]

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
  params, cfg = load_pretrained_params("someorg/tiny-gpt-oss", "bfloat16", revision="main", progress=False)
  assert cfg.num_hidden_layers == 4 and params["embed"].dtype == jnp.bfloat16
  (repo, kw), = calls
  assert repo == "someorg/tiny-gpt-oss" and kw["revision"] == "main"
  patterns = kw["allow_patterns"]
  assert {"config.json", "model.safetensors.index.json", "model*.safetensors"} <= set(patterns)
  assert any(p.startswith("tokenizer") for p in patterns)


def test_without_mesh_params_sit_on_the_default_device(dense):
  # Without a mesh every parameter is a committed array on the default device.
  params, _ = load_pretrained_params(dense[0], progress=False)
  for arr in params.values():
    assert isinstance(arr, jax.Array) and arr.committed and arr.devices() == {jax.devices()[0]}


@pytest.mark.parametrize("size,layers,experts", [("20b", 24, 32), ("120b", 36, 128)])
def test_released_tensor_table(size, layers, experts):
  """The names and MXFP4 shapes the loader expects for the released configs, as in the spec's table."""
  from numina_jax.hf.load import _mxfp4_shapes

  cfg = GptOssConfig.from_pretrained(str(require_shared(f"hf/gpt-oss-{size}")))
  names = keymap.expected_hf_names(cfg)
  packed = [n for n in names if n.endswith(keymap.MXFP4_EXPERT_TENSORS)]
  assert len(names) + len(packed) == 19 * layers + 3  # blocks and scales count separately: 459 / 687
  gate_up = keymap.ENTRY_BY_NAME["model.layers.{i}.mlp.experts.gate_up_proj"]
  down = keymap.ENTRY_BY_NAME["model.layers.{i}.mlp.experts.down_proj"]
  assert _mxfp4_shapes(gate_up, cfg) == ((experts, 5760, 90, 16), (experts, 5760, 90))
  assert _mxfp4_shapes(down, cfg) == ((experts, 2880, 90, 16), (experts, 2880, 90))
  assert keymap.ENTRY_BY_NAME["model.layers.{i}.self_attn.o_proj.weight"].hf_shape(cfg) == (2880, 4096)
