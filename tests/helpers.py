"""Shared test helpers: a tiny random transformers gpt-oss and its weights in our flat parameter layout."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np
import pytest

from numina_jax.hf.keymap import hf_to_ours, split_layer
from numina_jax.model.config import GptOssConfig

# Every dimension distinct, so a wrong transpose or reshape cannot pass by accident: 6 query heads of 16 over
# 2 kv heads (3 per group), hidden 40, expert width 24, 8 experts top-5, window 7 < sequence 23.
TINY_HF = dict(
    vocab_size=301, hidden_size=40, intermediate_size=24, num_hidden_layers=4, num_attention_heads=6,
    num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=5, sliding_window=7,
    max_position_embeddings=64 * 32, pad_token_id=0, eos_token_id=1, router_aux_loss_coef=0.9,
    rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0,
                      original_max_position_embeddings=64, truncate=False),
)
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
  """(transformers GptOssForCausalLM in fp32 eval mode, our GptOssConfig, our fp32 params)."""
  import torch
  from transformers import GptOssConfig as HFConfig, GptOssForCausalLM
  torch.manual_seed(seed)
  hf_cfg = HFConfig(**{**TINY_HF, **overrides})
  model = randomize_hf_model(GptOssForCausalLM(hf_cfg).eval(), seed)
  cfg = GptOssConfig.from_hf_dict(hf_cfg.to_dict())
  return model, cfg, hf_state_to_params(model.state_dict(), cfg)


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


# XLA's CPU backend spends most of a tiny model's test time in LLVM; its optimizations buy nothing at these sizes.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def jit(fn, **kwargs):
  """`jax.jit` with cheap compilation, for tests."""
  import jax
  return jax.jit(fn, compiler_options=COMPILER_OPTIONS, **kwargs)
