"""Tiny random transformers gpt-oss models for the HF interop tests, and a writer of the real MXFP4 on-disk
layout (`_blocks`/`_scales` experts, bf16 elsewhere, sharded with an index) built on `mxfp4.quantize`."""

from __future__ import annotations

import json
import os

import numpy as np

from numina_jax.hf import mxfp4
from numina_jax.hf.keymap import MXFP4_EXPERT_TENSORS

# Every dimension distinct: 6 query heads of 16 over 2 kv heads, hidden 48, expert width 40, 5 experts top-2,
# window 7 shorter than the 23-token sequence.
TINY = dict(vocab_size=300, hidden_size=48, intermediate_size=40, num_hidden_layers=4, num_attention_heads=6,
            num_key_value_heads=2, head_dim=16, num_local_experts=5, num_experts_per_tok=2, sliding_window=7,
            max_position_embeddings=4096, pad_token_id=0, eos_token_id=1,
            rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0,
                              original_max_position_embeddings=64, truncate=False))
# MXFP4 groups 32 input elements: hidden and expert width must be multiples of 32.
TINY_MXFP4 = dict(TINY, hidden_size=64, intermediate_size=96)
SEQ = 23


def tiny_hf_model(seed: int = 0, **overrides):
  """A transformers GptOssForCausalLM (fp32, eval) with every parameter re-drawn: weights N(0, 0.1), biases and
  sinks N(0, 0.3) so they matter, norm weights around 1."""
  import torch
  from transformers import GptOssConfig as HfConfig, GptOssForCausalLM

  torch.manual_seed(seed)
  model = GptOssForCausalLM(HfConfig(**{**TINY, **overrides})).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.normal_(0, 0.3 if ("bias" in name or "sinks" in name) else 0.1)
      if "norm" in name:
        p.add_(1.0)
  return model


def token_ids(vocab: int, batch: int = 2, seq: int = SEQ, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, vocab, (batch, seq))


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(ids)).logits.float().numpy()


def write_mxfp4_checkpoint(model, out_dir: str, n_files: int = 2) -> None:
  """Writes `model` the way the released gpt-oss checkpoint is stored: expert weights as MXFP4 `_blocks`
  [E, out, in/32, 16] and `_scales` [E, out, in/32] (uint8), every other tensor bf16, a config.json with the
  quantization block, the tensors spread over `n_files` zero-numbered shards with an index."""
  import torch
  from safetensors.torch import save_file

  os.makedirs(out_dir, exist_ok=True)
  tensors = {}
  for name, t in model.state_dict().items():
    if any(name.endswith(s) for s in MXFP4_EXPERT_TENSORS):
      w_ckpt = t.detach().float().numpy().transpose(0, 2, 1)  # dense [E, in, out] -> stored [E, out, in]
      blocks, scales = mxfp4.quantize(w_ckpt)
      tensors[name + "_blocks"] = torch.from_numpy(blocks)
      tensors[name + "_scales"] = torch.from_numpy(scales)
    else:
      tensors[name] = t.detach().to(torch.bfloat16).contiguous()
  names = sorted(tensors)
  files = [f"model-{k:05d}-of-{n_files - 1:05d}.safetensors" for k in range(n_files)]
  weight_map = {}
  for k, file in enumerate(files):
    part = names[k::n_files]
    save_file({n: tensors[n] for n in part}, os.path.join(out_dir, file), metadata={"format": "pt"})
    weight_map.update({n: file for n in part})
  total = sum(t.numel() * t.element_size() for t in tensors.values())
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  config = model.config.to_dict()
  config["torch_dtype"] = config["dtype"] = "bfloat16"
  config["quantization_config"] = {
      "quant_method": "mxfp4",
      "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                 "model.embed_tokens", "lm_head"]}
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)


def shared_path(relpath: str):
  """A file under the shared folder next to the checkout (NUMINA_SHARED overrides), or a pytest skip."""
  import pathlib

  import pytest

  root = os.environ.get("NUMINA_SHARED") or pathlib.Path(__file__).resolve().parents[2] / "shared"
  path = pathlib.Path(root) / relpath
  if not path.exists():
    pytest.skip(f"needs {path}")
  return path
