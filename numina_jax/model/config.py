"""gpt-oss model configuration: read from a Hugging Face `config.json`, or built for tiny tests and demos."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclasses.dataclass(frozen=True)
class GptOssConfig:
  """Architecture hyperparameters; field names follow the Hugging Face config where one exists."""

  vocab_size: int = 201088
  hidden_size: int = 2880
  intermediate_size: int = 2880  # per expert
  num_hidden_layers: int = 24
  num_attention_heads: int = 64
  num_key_value_heads: int = 8
  head_dim: int = 64
  num_local_experts: int = 32
  num_experts_per_tok: int = 4
  sliding_window: int = 128
  rms_norm_eps: float = 1e-5
  swiglu_limit: float = 7.0
  swiglu_alpha: float = 1.702
  rope_theta: float = 150000.0
  rope_factor: float = 32.0
  rope_beta_fast: float = 32.0
  rope_beta_slow: float = 1.0
  rope_original_max_position_embeddings: int = 4096
  rope_truncate: bool = False
  max_position_embeddings: int = 131072
  router_aux_loss_coef: float = 0.9
  initializer_range: float = 0.02
  pad_token_id: int | None = 199999
  eos_token_id: int | None = 200002
  bos_token_id: int | None = None
  layer_types: tuple[str, ...] = ()

  def __post_init__(self):
    if not self.layer_types:
      object.__setattr__(
          self, "layer_types",
          tuple(SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers)))
    self.validate()

  def validate(self) -> None:
    def need(cond: bool, msg: str):
      if not cond:
        raise ValueError(f"invalid gpt-oss config: {msg}")

    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts",
                 "num_experts_per_tok", "sliding_window"):
      value = getattr(self, name)
      need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
           f"{name} must be a positive integer, got {value!r}")
    for name in ("rms_norm_eps", "rope_factor", "rope_original_max_position_embeddings", "swiglu_limit"):
      need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)!r}")
    need(self.rope_theta > 1, f"rope_theta must be > 1, got {self.rope_theta!r}")
    need(self.num_attention_heads % self.num_key_value_heads == 0,
         f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
         f"num_key_value_heads ({self.num_key_value_heads})")
    need(self.num_experts_per_tok <= self.num_local_experts,
         f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_local_experts "
         f"({self.num_local_experts})")
    need(self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim}")
    need(len(self.layer_types) == self.num_hidden_layers,
         f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
    expected = tuple(SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers))
    need(self.layer_types == expected and self.num_hidden_layers % 2 == 0,
         "layers must alternate sliding_attention, full_attention (an even count, sliding first): "
         "the decoder scans (sliding, full) pairs")

  # Derived sizes ------------------------------------------------------------------------------
  @property
  def num_layer_pairs(self) -> int:
    return self.num_hidden_layers // 2

  # Hugging Face interop -----------------------------------------------------------------------
  @classmethod
  def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "GptOssConfig":
    if d.get("model_type") != "gpt_oss":
      raise ValueError(f"{source}: model_type is {d.get('model_type')!r}; only 'gpt_oss' is supported")
    rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    theta = d.get("rope_theta", rope.get("rope_theta", 150000.0))
    if rope.get("rope_type", "yarn") != "yarn":
      raise ValueError(f"{source}: rope type {rope.get('rope_type')!r} is not supported (gpt-oss uses yarn)")
    experts = d.get("num_local_experts", d.get("num_experts"))
    top_k = d.get("num_experts_per_tok", d.get("experts_per_token"))
    eos = d.get("eos_token_id")
    if isinstance(eos, list):
      eos = eos[0]
    try:
      return cls(
          vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
          intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
          num_attention_heads=d["num_attention_heads"], num_key_value_heads=d["num_key_value_heads"],
          head_dim=d.get("head_dim", d["hidden_size"] // d["num_attention_heads"]),
          num_local_experts=experts, num_experts_per_tok=top_k,
          sliding_window=d.get("sliding_window", 128), rms_norm_eps=d.get("rms_norm_eps", 1e-5),
          swiglu_limit=d.get("swiglu_limit", 7.0), swiglu_alpha=d.get("swiglu_alpha", 1.702),
          rope_theta=float(theta), rope_factor=float(rope.get("factor", 32.0)),
          rope_beta_fast=float(rope.get("beta_fast", 32.0)),
          rope_beta_slow=float(rope.get("beta_slow", 1.0)),
          rope_original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 4096)),
          rope_truncate=bool(rope.get("truncate", True)),
          max_position_embeddings=d.get("max_position_embeddings", 131072),
          router_aux_loss_coef=d.get("router_aux_loss_coef", 0.9),
          initializer_range=d.get("initializer_range", 0.02),
          pad_token_id=d.get("pad_token_id"), eos_token_id=eos, bos_token_id=d.get("bos_token_id"),
          layer_types=tuple(d.get("layer_types") or ()),
      )
    except KeyError as e:
      raise ValueError(f"{source}: required field {e.args[0]!r} is missing") from None

  @classmethod
  def from_pretrained(cls, path: str) -> "GptOssConfig":
    """Reads `config.json` from a checkpoint directory (or the file itself)."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
      raise FileNotFoundError(f"no config.json at {file}")
    with open(file) as f:
      return cls.from_hf_dict(json.load(f), source=file)

  def to_hf_dict(self) -> dict[str, Any]:
    """A `config.json` for transformers' GptOssForCausalLM (no quantization block: weights are dense)."""
    return {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
        "attention_bias": True, "attention_dropout": 0.0,
        "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
        **({"bos_token_id": self.bos_token_id} if self.bos_token_id is not None else {}),
        "experts_per_token": self.num_experts_per_tok, "num_experts_per_tok": self.num_experts_per_tok,
        "num_local_experts": self.num_local_experts, "head_dim": self.head_dim,
        "hidden_act": "silu", "hidden_size": self.hidden_size,
        "initial_context_length": self.rope_original_max_position_embeddings,
        "initializer_range": self.initializer_range, "intermediate_size": self.intermediate_size,
        "layer_types": list(self.layer_types), "max_position_embeddings": self.max_position_embeddings,
        "num_attention_heads": self.num_attention_heads, "num_hidden_layers": self.num_hidden_layers,
        "num_key_value_heads": self.num_key_value_heads, "output_router_logits": False,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_scaling": {
            "beta_fast": self.rope_beta_fast, "beta_slow": self.rope_beta_slow,
            "factor": self.rope_factor,
            "original_max_position_embeddings": self.rope_original_max_position_embeddings,
            "rope_type": "yarn", "truncate": self.rope_truncate,
        },
        "rope_theta": self.rope_theta, "router_aux_loss_coef": self.router_aux_loss_coef,
        "sliding_window": self.sliding_window, "swiglu_limit": self.swiglu_limit,
        "tie_word_embeddings": False, "use_cache": True, "vocab_size": self.vocab_size,
    }


# Presets --------------------------------------------------------------------------------------
def tiny_config(**overrides) -> GptOssConfig:
  """A small config with every dimension distinct (tests, the CPU demo)."""
  base = dict(vocab_size=512, hidden_size=48, intermediate_size=40, num_hidden_layers=4,
              num_attention_heads=6, num_key_value_heads=2, head_dim=16, num_local_experts=5,
              num_experts_per_tok=2, sliding_window=7, rope_original_max_position_embeddings=64,
              max_position_embeddings=4096, pad_token_id=0, eos_token_id=1)
  base.update(overrides)
  return GptOssConfig(**base)


# YaRN RoPE ------------------------------------------------------------------------------------
def yarn_inv_freq(cfg: GptOssConfig) -> tuple[np.ndarray, float]:
  """Inverse frequencies [head_dim/2] (fp32) and attention factor of YaRN, as transformers computes them."""
  dim, base, factor = cfg.head_dim, cfg.rope_theta, cfg.rope_factor

  def correction_dim(num_rotations: float) -> float:
    return (dim * math.log(cfg.rope_original_max_position_embeddings / (num_rotations * 2 * math.pi))
            / (2 * math.log(base)))

  low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
  if cfg.rope_truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  # fp32 exponents as transformers builds them; the power itself in float64, rounded once (numpy's fp32 power
  # is up to 1 ulp off, which the blend below turned into 2 ulps from transformers' inv_freq).
  exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  pos_freqs = (np.float64(base) ** exponents.astype(np.float64)).astype(np.float32)
  inv_extrapolation = np.float32(1.0) / pos_freqs
  inv_interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
  extrapolation_factor = np.float32(1) - ramp.astype(np.float32)
  inv = inv_interpolation * (1 - extrapolation_factor) + inv_extrapolation * extrapolation_factor
  attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
  return inv.astype(np.float32), attention_factor
