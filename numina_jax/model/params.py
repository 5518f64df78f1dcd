"""Every gpt-oss parameter, declared once: shape, logical axes and initializer.

The model builds its `nnx.Param`s from this table, `sharding.py` maps the logical axes to mesh axes, and the
Hugging Face key map checks every loaded tensor against it. Per-layer tensors are stacked on a leading `layers`
axis so the decoder can scan over (sliding, full) layer pairs.

Axis legend: V vocab, D hidden (embed), N query heads, K kv heads, H head dim, E experts, I expert intermediate,
L layers.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from numina_jax.model.config import GptOssConfig

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  shape: tuple[int, ...]
  logical_axes: tuple[str | None, ...]
  init: str  # "normal" | "zeros" | "ones"

  def __post_init__(self):
    assert len(self.shape) == len(self.logical_axes), (self.shape, self.logical_axes)


# Parameters grouped as the model holds them: top-level, and per layer (stacked along `layers`).
TOP_LEVEL = ("embed", "final_norm", "lm_head")
PER_LAYER = ("attn_norm", "q_w", "q_b", "k_w", "k_b", "v_w", "v_b", "o_w", "o_b", "sinks",
             "mlp_norm", "router_w", "router_b", "gate_w", "gate_b", "up_w", "up_b", "down_w", "down_b")


def param_specs(cfg: GptOssConfig) -> dict[str, ParamSpec]:
  """Maps `name` (top-level) or `layers/name` (stacked per layer) to its spec."""
  V, D, N, K, H = (cfg.vocab_size, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                   cfg.head_dim)
  E, I, L = cfg.num_local_experts, cfg.intermediate_size, cfg.num_hidden_layers
  layer = {
      "attn_norm": ((D,), ("norm",), "ones"),
      "q_w": ((D, N, H), ("embed", "q_heads", "head_dim"), "normal"),
      "q_b": ((N, H), ("q_heads", "head_dim"), "zeros"),
      "k_w": ((D, K, H), ("embed", "kv_heads", "head_dim"), "normal"),
      "k_b": ((K, H), ("kv_heads", "head_dim"), "zeros"),
      "v_w": ((D, K, H), ("embed", "kv_heads", "head_dim"), "normal"),
      "v_b": ((K, H), ("kv_heads", "head_dim"), "zeros"),
      "o_w": ((N, H, D), ("q_heads", "head_dim", "embed"), "normal"),
      "o_b": ((D,), ("norm",), "zeros"),
      "sinks": ((N,), ("q_heads",), "normal"),
      "mlp_norm": ((D,), ("norm",), "ones"),
      "router_w": ((D, E), ("embed", "experts_router"), "normal"),
      "router_b": ((E,), ("experts_router",), "zeros"),
      "gate_w": ((E, D, I), ("experts", "embed", "mlp"), "normal"),
      "gate_b": ((E, I), ("experts", "mlp"), "zeros"),
      "up_w": ((E, D, I), ("experts", "embed", "mlp"), "normal"),
      "up_b": ((E, I), ("experts", "mlp"), "zeros"),
      "down_w": ((E, I, D), ("experts", "mlp", "embed"), "normal"),
      "down_b": ((E, D), ("experts", "norm"), "zeros"),
  }
  assert tuple(layer) == PER_LAYER
  specs = {
      "embed": ParamSpec((V, D), ("vocab", "embed"), "normal"),
      "final_norm": ParamSpec((D,), ("norm",), "ones"),
      "lm_head": ParamSpec((D, V), ("embed", "vocab"), "normal"),
  }
  for name, (shape, axes, init) in layer.items():
    specs[f"layers/{name}"] = ParamSpec((L, *shape), ("layers", *axes), init)
  return specs


def count_params(cfg: GptOssConfig) -> int:
  total = 0
  for spec in param_specs(cfg).values():
    n = 1
    for s in spec.shape:
      n *= s
    total += n
  return total


def init_params(cfg: GptOssConfig, key: jax.Array, param_dtype=jnp.float32, shardings=None) -> dict[str, jax.Array]:
  """The one random init: normal(0, initializer_range) matrices, zero biases, unit norms, a zero padding row in
  the embedding (as torch's padding_idx). With `shardings`, every array is created directly in its sharding
  (never whole on one device)."""
  specs = param_specs(cfg)

  def make():
    out = {}
    for i, (name, spec) in enumerate(sorted(specs.items())):
      out[name] = init_value(spec, jax.random.fold_in(key, i), param_dtype, cfg.initializer_range)
    pad = cfg.pad_token_id
    if pad is not None and 0 <= pad < cfg.vocab_size:
      out["embed"] = out["embed"].at[pad].set(0)
    return out

  return jax.jit(make, out_shardings=shardings)()


def init_value(spec: ParamSpec, key: jax.Array, dtype, std: float) -> jax.Array:
  if spec.init == "zeros":
    return jnp.zeros(spec.shape, dtype)
  if spec.init == "ones":
    return jnp.ones(spec.shape, dtype)
  return (std * jax.random.normal(key, spec.shape, jnp.float32)).astype(dtype)
