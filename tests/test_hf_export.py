"""Exporting to a dense HF checkpoint: load, export, reload in transformers, same logits; the file layout
matches transformers' own save_pretrained."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import hf_logits, tiny_hf_model, token_ids
from numina_jax.hf import load_pretrained, save_pretrained
from numina_jax.hf.export import REAL_GENERATION_CONFIG, generation_config, parse_size
from numina_jax.model.config import GptOssConfig
from numina_jax.sharding import make_mesh


def _headers(directory):
  from safetensors import safe_open
  out = {}
  for f in sorted(os.listdir(directory)):
    if f.endswith(".safetensors"):
      with safe_open(os.path.join(directory, f), framework="numpy") as h:
        for k in h.keys():
          s = h.get_slice(k)
          out[k] = (tuple(s.get_shape()), s.get_dtype())
  return out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  model, _, _ = tiny_hf_model(seed=3)
  path = str(tmp_path_factory.mktemp("hf_src"))
  model.save_pretrained(path)
  ids = token_ids(model.config.vocab_size, seed=3)
  return path, model, ids, hf_logits(model, ids)


def test_round_trip_through_transformers(source, tmp_path):
  from transformers import AutoModelForCausalLM

  path, model, ids, ref = source
  ours = load_pretrained(path, mesh=make_mesh({"fsdp": 2, "tensor": 2, "expert": 2}), progress=False)
  out = str(tmp_path / "export")
  save_pretrained(ours, out, dtype=jnp.float32, max_shard_size="150KB", progress=False)

  files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
  assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
  with open(os.path.join(out, "model.safetensors.index.json")) as f:
    index = json.load(f)
  assert set(index["weight_map"].values()) == set(files)
  assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
  # Same names, shapes (dense experts: gate_up_proj [E, D, 2I] interleaved) and dtype as transformers writes.
  assert _headers(out) == _headers(path)
  assert set(index["weight_map"]) == set(_headers(path))
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  assert "quantization_config" not in config and config["dtype"] == "float32" == config["torch_dtype"]

  reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  np.testing.assert_allclose(hf_logits(reloaded, ids), ref, atol=1e-4, rtol=0)
  sd, want = reloaded.state_dict(), model.state_dict()
  for name in want:
    assert torch.equal(sd[name], want[name]), name


def test_every_tensor_streamed_in_pieces_is_exact(source, tmp_path, monkeypatch):
  """With a staging budget below one row, every tensor is written piece by piece along its layout's row axis
  (heads of q/k/v, the hidden axis of o_proj, the vocabulary of lm_head, experts): the files equal the source's."""
  from safetensors.numpy import load_file
  from numina_jax.hf import export
  path, *_ = source
  monkeypatch.setattr(export, "_CHUNK_BYTES", 1)
  ours = load_pretrained(path, mesh=make_mesh({"fsdp": 2, "tensor": 2, "expert": 2}), progress=False)
  out = str(tmp_path / "export")
  save_pretrained(ours, out, dtype=jnp.float32, progress=False)
  want, got = {}, {}
  for directory, into in ((path, want), (out, got)):
    for f in os.listdir(directory):
      if f.endswith(".safetensors"):
        into.update(load_file(os.path.join(directory, f)))
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_bf16_export_of_params_dict(source, tmp_path):
  from numina_jax.hf.load import load_pretrained_params
  from safetensors import safe_open

  path, model, _, _ = source
  params, cfg = load_pretrained_params(path, progress=False)
  out = str(tmp_path / "bf16")
  with pytest.raises(ValueError, match="cfg"):
    save_pretrained(params, out)
  save_pretrained(params, out, cfg=cfg, progress=False)
  files = [f for f in os.listdir(out) if f.endswith(".safetensors")]
  assert files == ["model-00001-of-00001.safetensors"]
  want = model.state_dict()
  with safe_open(os.path.join(out, files[0]), framework="pt") as h:
    assert set(h.keys()) == set(want)
    for k in h.keys():
      t = h.get_tensor(k)
      assert t.dtype == torch.bfloat16 and torch.equal(t, want[k].to(torch.bfloat16)), k
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  with open(os.path.join(out, "generation_config.json")) as f:
    assert json.load(f) == {"eos_token_id": 1, "pad_token_id": 0}


def test_refuses_non_empty_dir_and_overwrites_stale_shards(source, tmp_path):
  from numina_jax.hf.load import load_pretrained_params

  params, cfg = load_pretrained_params(source[0], progress=False)
  out = tmp_path / "o"
  out.mkdir()
  (out / "model-00001-of-00009.safetensors").write_bytes(b"stale")
  (out / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match=str(out)):
    save_pretrained(params, str(out), cfg=cfg, progress=False)
  save_pretrained(params, str(out), cfg=cfg, overwrite=True, progress=False)
  assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model-00001-of-00001.safetensors",
                                     "model.safetensors.index.json", "notes.txt"]


def test_tokenizer_is_copied(source, tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import AutoTokenizer, PreTrainedTokenizerFast

  tok = Tokenizer(models.WordLevel({"<unk>": 0, "two": 1, "plus": 2, "four": 3}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok_dir = str(tmp_path / "tok")
  PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(tok_dir)
  from numina_jax.hf.load import load_pretrained_params
  params, cfg = load_pretrained_params(source[0], progress=False)
  out = str(tmp_path / "with_tok")
  save_pretrained(params, out, cfg=cfg, tokenizer=tok_dir, progress=False)
  assert AutoTokenizer.from_pretrained(out)("two plus two")["input_ids"] == [1, 2, 1]


def test_generation_config_and_sizes():
  assert generation_config(GptOssConfig()) == REAL_GENERATION_CONFIG
  assert REAL_GENERATION_CONFIG["eos_token_id"] == [200002, 199999, 200012]
  assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123
  assert parse_size("150KB") == 150_000
  with pytest.raises(ValueError, match="5 gigs"):
    parse_size("5 gigs")
