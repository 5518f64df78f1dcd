"""Config: real sizes from the Hub config files (abstractly), validation messages, YaRN against transformers."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from helpers import require_shared
from numina_jax.model import GptOssConfig, abstract_model, count_params, forward, tiny_config
from numina_jax.model.config import yarn_inv_freq


def _hand_count(d: dict) -> int:
  """Parameter count from the checkpoint tensor table (spec section 2), written out from the raw JSON."""
  H, V, E = d["hidden_size"], d["vocab_size"], d["num_local_experts"]
  I, L, hd = d["intermediate_size"], d["num_hidden_layers"], d["head_dim"]
  q, kv = d["num_attention_heads"] * hd, d["num_key_value_heads"] * hd
  attn = (q * H + q) + 2 * (kv * H + kv) + (H * q + H) + d["num_attention_heads"]
  router = E * H + E
  experts = E * (H * 2 * I + 2 * I) + E * (I * H + H)
  per_layer = 2 * H + attn + router + experts
  return 2 * V * H + H + L * per_layer


@pytest.mark.parametrize("size,billions,exact", [("120b", 116.83, 116_829_156_672),
                                                 ("20b", 20.91, 20_914_757_184)])
def test_real_configs_build_abstractly(size, billions, exact):
  path = require_shared(f"hf/gpt-oss-{size}/config.json")
  raw = json.loads(path.read_text())
  cfg = GptOssConfig.from_pretrained(str(path.parent))
  model = abstract_model(cfg)
  leaves = jax.tree.leaves(model)
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing was allocated
  n = count_params(cfg)
  assert n == sum(int(np.prod(x.shape)) for x in leaves)
  assert n == _hand_count(raw) == exact
  assert round(n / 1e9, 2) == billions
  # The fields the spec lists, as read.
  assert (cfg.num_hidden_layers, cfg.num_local_experts) == ((36, 128) if size == "120b" else (24, 32))
  assert (cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads) == (2880, 64, 64, 8)
  assert (cfg.rope_theta, cfg.rope_factor, cfg.rope_truncate, cfg.sliding_window) == (150000.0, 32.0, False, 128)
  assert cfg.router_aux_loss_coef == 0.9 and cfg.swiglu_alpha == 1.702 and cfg.eos_token_id == 200002
  assert cfg.layer_types == tuple(raw["layer_types"])


@pytest.mark.parametrize("overrides,message", [
    (dict(num_attention_heads=7), "num_attention_heads (7) must be a multiple of num_key_value_heads (2)"),
    (dict(num_experts_per_tok=6), "num_experts_per_tok (6) exceeds num_local_experts (5)"),
    (dict(head_dim=15), "head_dim must be even for RoPE, got 15"),
    (dict(hidden_size=0), "hidden_size must be a positive integer, got 0"),
    (dict(intermediate_size=40.0), "intermediate_size must be a positive integer, got 40.0"),
    (dict(sliding_window=True), "sliding_window must be a positive integer, got True"),
    (dict(num_hidden_layers=3), "layers must alternate sliding_attention, full_attention"),
    (dict(layer_types=("full_attention", "sliding_attention") * 2),
     "layers must alternate sliding_attention, full_attention"),
    (dict(layer_types=("sliding_attention", "full_attention")), "layer_types has 2 entries for 4 layers"),
    (dict(rms_norm_eps=-1e-5), "rms_norm_eps must be positive, got -1e-05"),
    (dict(rope_factor=0.0), "rope_factor must be positive, got 0.0"),
    (dict(rope_theta=0.0), "rope_theta must be > 1, got 0.0"),
])
def test_config_validation_messages(overrides, message):
  with pytest.raises(ValueError, match="invalid gpt-oss config") as e:
    tiny_config(**overrides)
  assert message in str(e.value)


def test_hf_dict_errors():
  good = tiny_config().to_hf_dict()
  with pytest.raises(ValueError, match="model_type is 'llama'; only 'gpt_oss' is supported"):
    GptOssConfig.from_hf_dict({**good, "model_type": "llama"})
  missing = {k: v for k, v in good.items() if k != "hidden_size"}
  with pytest.raises(ValueError, match="required field 'hidden_size' is missing"):
    GptOssConfig.from_hf_dict(missing, source="x/config.json")
  with pytest.raises(ValueError, match="rope type 'linear' is not supported"):
    GptOssConfig.from_hf_dict({**good, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
  with pytest.raises(FileNotFoundError, match="no config.json at"):
    GptOssConfig.from_pretrained("/nonexistent/checkpoint")


def test_forward_option_errors():
  cfg = tiny_config(num_hidden_layers=2)
  ids = jnp.zeros((1, 3), jnp.int32)
  with pytest.raises(ValueError, match="unknown remat_policy 'some'; choose one of none, full"):
    forward({}, ids, cfg, remat_policy="some")
  with pytest.raises(ValueError, match="unknown moe_kernel 'fast'; choose one of auto, dense"):
    forward({}, ids, cfg, moe_kernel="fast")
  with pytest.raises(ValueError, match="unknown dtype 'fp8'; choose one of float32"):
    forward({}, ids, cfg, dtype="fp8")


def test_hf_dict_round_trip_through_transformers():
  cfg = tiny_config()
  assert GptOssConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
  # transformers 5 folds rope_scaling and rope_theta into rope_parameters; reading its dict gives cfg back.
  hf = transformers.GptOssConfig(**cfg.to_hf_dict())
  assert GptOssConfig.from_hf_dict(hf.to_dict()) == cfg


def _hf_yarn(cfg: GptOssConfig):
  hf = transformers.GptOssConfig(**cfg.to_hf_dict())
  inv, factor = ROPE_INIT_FUNCTIONS["yarn"](hf, torch.device("cpu"))
  return inv.numpy(), factor


def _ulps(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


@pytest.mark.parametrize("overrides", [
    {},  # the real gpt-oss rope: head_dim 64, theta 150000, factor 32, L0 4096, no truncation
    dict(rope_truncate=True),
    dict(head_dim=128, rope_theta=10000.0, rope_factor=8.0, rope_original_max_position_embeddings=8192,
         rope_beta_fast=16.0, rope_beta_slow=2.0),
    dict(head_dim=16, rope_original_max_position_embeddings=64),
    dict(head_dim=256, rope_theta=1e6),
])
def test_yarn_matches_transformers(overrides):
  cfg = GptOssConfig(**{**dict(hidden_size=64, num_hidden_layers=2, head_dim=64), **overrides})
  cfg = dataclasses.replace(cfg, max_position_embeddings=int(cfg.rope_factor * cfg.rope_original_max_position_embeddings))
  ours, our_factor = yarn_inv_freq(cfg)
  ref, ref_factor = _hf_yarn(cfg)
  assert ours.dtype == np.float32 and ours.shape == ref.shape == (cfg.head_dim // 2,)
  assert _ulps(ours, ref).max() <= 1, (ours, ref)
  assert our_factor == ref_factor


def test_yarn_hand_values():
  # Spec 3.3: ramp bounds 8.09..17.40 for the real config, so dims 0-8 keep b^(-2i/d) and 18-31 are divided
  # by 32; the attention factor is 0.1 ln 32 + 1.
  cfg = GptOssConfig(hidden_size=64, num_hidden_layers=2)
  inv, factor = yarn_inv_freq(cfg)
  i = np.arange(32, dtype=np.float64)
  ext = 150000.0 ** (-2 * i / 64)
  np.testing.assert_allclose(inv[:9], ext[:9], rtol=1e-6)
  np.testing.assert_allclose(inv[18:], ext[18:] / 32, rtol=1e-6)
  assert np.all((inv[9:18] < ext[9:18]) & (inv[9:18] > ext[9:18] / 32))
  assert factor == pytest.approx(1.3465735902799727, abs=1e-15)
  assert factor == 0.1 * math.log(32) + 1
