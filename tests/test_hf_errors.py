"""Broken checkpoints fail before anything is placed on a device, with messages naming the tensor or file."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from helpers import TINY_HF
from numina_jax.hf.keymap import expected_hf_names, ENTRY_BY_NAME, split_layer
from numina_jax.hf.load import CheckpointError, load_pretrained_params
from numina_jax.model.config import GptOssConfig


def _cfg_dict():
  cfg = GptOssConfig.from_hf_dict({**TINY_HF, "model_type": "gpt_oss"})
  return cfg, cfg.to_hf_dict()


def _write(directory, tensors, config, n_files=2):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  names = sorted(tensors)
  weight_map = {}
  for k in range(n_files):
    file = f"model-{k + 1:05d}-of-{n_files:05d}.safetensors"
    save_file({n: tensors[n] for n in names[k::n_files]}, os.path.join(directory, file))
    weight_map.update({n: file for n in names[k::n_files]})
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
  """A valid dense checkpoint of random numbers (no torch needed), as (dir, tensors, config)."""
  cfg, config = _cfg_dict()
  rng = np.random.default_rng(0)
  tensors = {}
  for name in expected_hf_names(cfg):
    _, pattern = split_layer(name)
    tensors[name] = rng.normal(size=ENTRY_BY_NAME[pattern].hf_shape(cfg)).astype(np.float32)
  path = str(tmp_path_factory.mktemp("good"))
  _write(path, tensors, config)
  return path, tensors, config


def _variant(tmp_path, good, *, drop=(), add=None, replace=None, config=None):
  _, tensors, cfg = good
  tensors = {k: v for k, v in tensors.items() if k not in drop}
  tensors.update(add or {})
  tensors.update(replace or {})
  path = str(tmp_path / "ckpt")
  _write(path, tensors, config or cfg)
  return path


def test_good_checkpoint_loads(good):
  params, cfg = load_pretrained_params(good[0], progress=False)
  np.testing.assert_array_equal(np.asarray(params["layers/sinks"][2]), good[1]["model.layers.2.self_attn.sinks"])


def test_missing_tensors_are_listed(good, tmp_path):
  path = _variant(tmp_path, good, drop=("model.layers.2.self_attn.sinks", "lm_head.weight"))
  with pytest.raises(CheckpointError, match="2 tensors missing") as e:
    load_pretrained_params(path, progress=False)
  assert "model.layers.2.self_attn.sinks" in str(e.value) and "lm_head.weight" in str(e.value)


def test_unexpected_tensors_are_listed(good, tmp_path):
  path = _variant(tmp_path, good, add={"model.layers.0.mlp.shared_expert.weight": np.zeros(3, np.float32),
                                       "model.layers.9.self_attn.sinks": np.zeros(6, np.float32)})
  with pytest.raises(CheckpointError, match="unexpected") as e:
    load_pretrained_params(path, progress=False)
  assert "model.layers.0.mlp.shared_expert.weight" in str(e.value)
  assert "model.layers.9.self_attn.sinks" in str(e.value)  # layer 9 of a 4-layer model


def test_shape_mismatch_names_tensor_and_shapes(good, tmp_path):
  path = _variant(tmp_path, good, replace={"model.layers.1.self_attn.k_proj.weight": np.zeros((40, 32), np.float32)})
  with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight: got \(40, 32\), "
                                            r"expected \(32, 40\)"):
    load_pretrained_params(path, progress=False)


def test_mxfp4_pairs_and_widths(good, tmp_path):
  name = "model.layers.0.mlp.experts.down_proj"
  path = _variant(tmp_path, good, drop=(name,), add={name + "_blocks": np.zeros((8, 40, 1, 16), np.uint8)})
  with pytest.raises(CheckpointError, match=name + "_scales"):
    load_pretrained_params(path, progress=False)
  shutil.rmtree(path)
  path = _variant(tmp_path, good, drop=(name,), add={name + "_blocks": np.zeros((8, 40, 1, 16), np.uint8),
                                                    name + "_scales": np.zeros((8, 40, 1), np.uint8)})
  # The expert width (24) of this config is no multiple of the MXFP4 group (32).
  with pytest.raises(CheckpointError, match=name + "_blocks: MXFP4 needs the input width 24"):
    load_pretrained_params(path, progress=False)


def test_wrong_model_type(good, tmp_path):
  path = _variant(tmp_path, good, config=dict(good[2], model_type="llama"))
  with pytest.raises(ValueError, match="model_type is 'llama'; only 'gpt_oss'"):
    load_pretrained_params(path, progress=False)


@pytest.mark.parametrize("keep", [20, -100])
def test_truncated_file_is_named(good, tmp_path, keep):
  path = _variant(tmp_path, good)
  victim = os.path.join(path, "model-00002-of-00002.safetensors")
  data = open(victim, "rb").read()
  open(victim, "wb").write(data[:keep])
  with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*truncated"):
    load_pretrained_params(path, progress=False)


def test_index_problems_name_the_file(good, tmp_path):
  path = _variant(tmp_path, good)
  index_path = os.path.join(path, "model.safetensors.index.json")
  original = json.load(open(index_path))
  # A file the index lists but the folder lacks.
  index = json.loads(json.dumps(original))
  index["weight_map"]["model.norm.weight"] = "model-00003-of-00002.safetensors"
  json.dump(index, open(index_path, "w"))
  with pytest.raises(FileNotFoundError, match="model-00003-of-00002.safetensors"):
    load_pretrained_params(path, progress=False)
  # A tensor the index maps to the shard that does not hold it.
  index = json.loads(json.dumps(original))
  held = index["weight_map"]["model.norm.weight"]
  wrong = next(f for f in set(original["weight_map"].values()) if f != held)
  assert "model.norm.weight" not in load_file(os.path.join(path, wrong))
  index["weight_map"]["model.norm.weight"] = wrong
  json.dump(index, open(index_path, "w"))
  with pytest.raises(CheckpointError, match=rf"model\.norm\.weight -> {wrong}"):
    load_pretrained_params(path, progress=False)


def test_missing_paths(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
    load_pretrained_params(str(tmp_path / "nope"), progress=False)
  (tmp_path / "empty").mkdir()
  json.dump(_cfg_dict()[1], open(tmp_path / "empty" / "config.json", "w"))
  with pytest.raises(FileNotFoundError, match="neither model.safetensors.index.json nor model.safetensors"):
    load_pretrained_params(str(tmp_path / "empty"), progress=False)
  (tmp_path / "noconfig").mkdir()
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_pretrained_params(str(tmp_path / "noconfig"), progress=False)
