"""Shared test helpers: the tiny random transformers gpt-oss (with our config and flat params), its weights to ours
and back, the real MXFP4 checkpoint layout, the shared folder, and TPU slices described by libtpu."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import pytest

from numina_jax.hf.keymap import ENTRIES, MXFP4_EXPERT_TENSORS, hf_to_ours, ours_to_hf, split_layer
from numina_jax.model.config import GptOssConfig

# Every dimension distinct, so a wrong transpose or reshape cannot pass by accident: 6 query heads of 16 over
# 2 kv heads (3 per group), hidden 40, expert width 24, 8 experts top-5, vocab 301, window 7 < sequence 23.
TINY_HF = dict(
    vocab_size=301, hidden_size=40, intermediate_size=24, num_hidden_layers=4, num_attention_heads=6,
    num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=5, sliding_window=7,
    max_position_embeddings=64 * 32, pad_token_id=0, eos_token_id=1, router_aux_loss_coef=0.9,
    rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0,
                      original_max_position_embeddings=64, truncate=False),
)
# MXFP4 groups 32 input elements: the experts' input widths (hidden, expert width) must be multiples of 32.
MXFP4_OVERRIDES = dict(hidden_size=64, intermediate_size=96)
TINY_SEQ = 23


def shared_dir() -> Path:
  """The `shared` folder next to the repository checkout; `NUMINA_SHARED` overrides it."""
  env = os.environ.get("NUMINA_SHARED")
  return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


def require_shared(relpath: str) -> Path:
  """Path of `relpath` under the shared folder, or a skip that names the missing file."""
  path = shared_dir() / relpath
  if not path.exists():
    pytest.skip(f"needs {path} (set NUMINA_SHARED to the shared folder)")
  return path


def hf_state_to_params(state_dict: Mapping[str, object], cfg: GptOssConfig) -> dict[str, np.ndarray]:
  """A transformers gpt-oss `state_dict` (dense experts) -> our flat `{name: array}` dict, layers stacked.

  Goes through `numina_jax.hf.keymap.hf_to_ours` tensor by tensor and checks that every layer of every
  per-layer parameter was filled exactly once.
  """
  top: dict[str, np.ndarray] = {}
  per_layer: dict[str, dict[int, np.ndarray]] = {}
  for name, t in state_dict.items():
    value = t.detach().cpu().float().numpy() if hasattr(t, "detach") else np.asarray(t)
    layer, _ = split_layer(name)
    for k, v in hf_to_ours(name, value, cfg).items():
      if k.startswith("layers/"):
        slot = per_layer.setdefault(k, {})
        assert layer not in slot, f"{name} fills {k}[{layer}] twice"
        slot[layer] = v
      else:
        assert k not in top, f"{name} fills {k} twice"
        top[k] = v
  L = cfg.num_hidden_layers
  out = dict(top)
  for k, slot in per_layer.items():
    assert sorted(slot) == list(range(L)), f"{k}: layers {sorted(slot)} of {L}"
    out[k] = np.stack([slot[i] for i in range(L)])
  return out


def hf_model_from_params(params: Mapping[str, object], cfg: GptOssConfig):
  """transformers' GptOssForCausalLM (fp32, eval) holding our flat `params`, through the inverse keymap; every
  tensor of the model is set (a strict `load_state_dict`)."""
  import torch
  from transformers import GptOssConfig as HFConfig, GptOssForCausalLM
  host = {k: np.array(v, np.float32) for k, v in params.items()}  # writable copies: torch shares their memory
  state = {}
  for entry in ENTRIES:
    for layer in (range(cfg.num_hidden_layers) if entry.per_layer else [None]):
      sliced = {k: (v[layer] if entry.per_layer and k.startswith("layers/") else v) for k, v in host.items()}
      name = entry.hf_name.format(i=layer) if entry.per_layer else entry.hf_name
      state[name] = torch.from_numpy(ours_to_hf(sliced, cfg, layer, entry))
  model = GptOssForCausalLM(HFConfig(**cfg.to_hf_dict())).eval()
  model.load_state_dict(state, strict=True)
  return model


def randomize_hf_model(model, seed: int = 0):
  """Re-initializes every parameter with noise large enough to matter: weights ~0.1, biases and sinks ~0.3,
  norm weights 1 +- 0.1 (the default init leaves biases at zero and norms at one, hiding layout bugs)."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      std = 0.3 if (name.endswith("bias") or name.endswith("sinks")) else 0.1
      p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
      if "norm" in name:
        p.add_(1.0)
  return model


def tiny_hf_model(seed: int = 0, **overrides):
  """(transformers GptOssForCausalLM in fp32 eval mode, our GptOssConfig, our fp32 params) for `TINY_HF` with
  `overrides` (e.g. `**MXFP4_OVERRIDES`), every parameter re-drawn by `randomize_hf_model`."""
  import torch
  from transformers import GptOssConfig as HFConfig, GptOssForCausalLM
  torch.manual_seed(seed)
  hf_cfg = HFConfig(**{**TINY_HF, **overrides})
  model = randomize_hf_model(GptOssForCausalLM(hf_cfg).eval(), seed)
  cfg = GptOssConfig.from_hf_dict(hf_cfg.to_dict())
  return model, cfg, hf_state_to_params(model.state_dict(), cfg)


def token_ids(vocab: int, batch: int = 2, seq: int = TINY_SEQ, seed: int = 0) -> np.ndarray:
  """Uniform random token ids [batch, seq]."""
  return np.random.RandomState(seed).randint(0, vocab, (batch, seq))


def hf_logits(model, ids: np.ndarray, **kwargs) -> np.ndarray:
  """transformers' logits (as fp32 numpy) for `ids`; `kwargs` go to the model (position_ids, attention_mask)."""
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(ids), **kwargs).logits.float().numpy()


def write_mxfp4_checkpoint(model, out_dir: str, n_files: int = 2) -> None:
  """Writes `model` the way the released gpt-oss checkpoint is stored: expert weights as MXFP4 `_blocks`
  [E, out, in/32, 16] and `_scales` [E, out, in/32] (uint8, from `mxfp4.quantize`), every other tensor bf16, a
  config.json with the quantization block, the tensors spread over `n_files` zero-numbered shards with an index."""
  import torch
  from safetensors.torch import save_file

  from numina_jax.hf import mxfp4

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


def random_params(cfg: GptOssConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """fp32 params for `cfg` straight from the spec table, with the same noise levels as `randomize_hf_model`."""
  from numina_jax.model.params import param_specs
  rng = np.random.default_rng(seed)
  out = {}
  for name, spec in param_specs(cfg).items():
    base = name.split("/")[-1]
    std = 0.3 if (base.endswith("_b") or base == "sinks") else 0.1
    v = rng.normal(0.0, std, spec.shape).astype(np.float32)
    out[name] = v + 1.0 if base.endswith("norm") else v
  return out


def tpu_devices(topology: str = "v5p:2x2x1") -> list:
  """The devices of a TPU slice described by libtpu on this host (to compile for, not to run on), or a skip."""
  # Another process compiling for TPU at the same time holds libtpu's lock file.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
  except Exception as e:  # noqa: BLE001 - libtpu absent or unable to describe the topology
    pytest.skip(f"needs libtpu to describe the TPU slice {topology} ({type(e).__name__}: {e})")

