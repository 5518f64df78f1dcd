"""The Hugging Face <-> numina_jax weight map: one table, each entry with its transform and a shape check.

HF `nn.Linear` weights are [out, in]; ours are [in, ...] so einsums read naturally. The experts' gate/up
projection is one interleaved tensor in HF (column 2j is gate unit j, 2j+1 is up unit j); we keep gate and up
as two tensors. In the MXFP4 checkpoint the expert weights are stored [expert, out, in] as `_blocks`/`_scales`;
in a dense (transformers `save_pretrained`) checkpoint they are stored [expert, in, out] under the plain name.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

from numina_jax.model.config import GptOssConfig


@dataclasses.dataclass(frozen=True)
class Entry:
  """How one HF tensor becomes one or more of our parameters (for one layer, or a global tensor)."""
  hf_name: str                 # with `{i}` for the layer index
  targets: tuple[str, ...]     # our parameter names (per-layer ones without the `layers/` prefix)
  hf_shape: Callable[[GptOssConfig], tuple[int, ...]]
  to_ours: Callable[[np.ndarray, GptOssConfig], tuple[np.ndarray, ...]]
  to_hf: Callable[[tuple[np.ndarray, ...], GptOssConfig], np.ndarray]
  per_layer: bool = True


def _lin_in(n_out_heads: str):
  """HF Linear [heads*H, D] <-> ours [D, heads, H]."""
  def to_ours(w, c):
    n = getattr(c, n_out_heads)
    return (w.T.reshape(c.hidden_size, n, c.head_dim),)

  def to_hf(ws, c):
    (w,) = ws
    return w.reshape(c.hidden_size, -1).T
  return to_ours, to_hf


def _bias_heads(n_heads: str):
  def to_ours(b, c):
    return (b.reshape(getattr(c, n_heads), c.head_dim),)
  return to_ours, lambda bs, c: bs[0].reshape(-1)


_ident = (lambda w, c: (w,), lambda ws, c: ws[0])
_transpose = (lambda w, c: (w.T,), lambda ws, c: ws[0].T)


def _deinterleave(axis: int):
  def to_ours(w, c):
    idx = [slice(None)] * w.ndim
    idx[axis] = slice(0, None, 2)
    gate = w[tuple(idx)]
    idx[axis] = slice(1, None, 2)
    return gate, w[tuple(idx)]

  def to_hf(ws, c):
    gate, up = ws
    return np.stack([gate, up], axis=axis + 1 if axis >= 0 else axis).reshape(
        *gate.shape[:axis % gate.ndim], -1, *gate.shape[axis % gate.ndim + 1:])
  return to_ours, to_hf


def _attn_shape(n: str, bias: bool):
  if bias:
    return lambda c: (getattr(c, n) * c.head_dim,)
  return lambda c: (getattr(c, n) * c.head_dim, c.hidden_size)


P = "model.layers.{i}."
ENTRIES: tuple[Entry, ...] = (
    Entry("model.embed_tokens.weight", ("embed",), lambda c: (c.vocab_size, c.hidden_size), *_ident, False),
    Entry("model.norm.weight", ("final_norm",), lambda c: (c.hidden_size,), *_ident, False),
    Entry("lm_head.weight", ("lm_head",), lambda c: (c.vocab_size, c.hidden_size), *_transpose, False),
    Entry(P + "input_layernorm.weight", ("attn_norm",), lambda c: (c.hidden_size,), *_ident),
    Entry(P + "post_attention_layernorm.weight", ("mlp_norm",), lambda c: (c.hidden_size,), *_ident),
    Entry(P + "self_attn.q_proj.weight", ("q_w",), _attn_shape("num_attention_heads", False),
          *_lin_in("num_attention_heads")),
    Entry(P + "self_attn.q_proj.bias", ("q_b",), _attn_shape("num_attention_heads", True),
          *_bias_heads("num_attention_heads")),
    Entry(P + "self_attn.k_proj.weight", ("k_w",), _attn_shape("num_key_value_heads", False),
          *_lin_in("num_key_value_heads")),
    Entry(P + "self_attn.k_proj.bias", ("k_b",), _attn_shape("num_key_value_heads", True),
          *_bias_heads("num_key_value_heads")),
    Entry(P + "self_attn.v_proj.weight", ("v_w",), _attn_shape("num_key_value_heads", False),
          *_lin_in("num_key_value_heads")),
    Entry(P + "self_attn.v_proj.bias", ("v_b",), _attn_shape("num_key_value_heads", True),
          *_bias_heads("num_key_value_heads")),
    Entry(P + "self_attn.o_proj.weight", ("o_w",),
          lambda c: (c.hidden_size, c.num_attention_heads * c.head_dim),
          lambda w, c: (w.T.reshape(c.num_attention_heads, c.head_dim, c.hidden_size),),
          lambda ws, c: ws[0].reshape(-1, c.hidden_size).T),
    Entry(P + "self_attn.o_proj.bias", ("o_b",), lambda c: (c.hidden_size,), *_ident),
    Entry(P + "self_attn.sinks", ("sinks",), lambda c: (c.num_attention_heads,), *_ident),
    Entry(P + "mlp.router.weight", ("router_w",), lambda c: (c.num_local_experts, c.hidden_size), *_transpose),
    Entry(P + "mlp.router.bias", ("router_b",), lambda c: (c.num_local_experts,), *_ident),
    # Dense expert layout ([E, in, out]) as transformers' save_pretrained writes it.
    Entry(P + "mlp.experts.gate_up_proj", ("gate_w", "up_w"),
          lambda c: (c.num_local_experts, c.hidden_size, 2 * c.intermediate_size), *_deinterleave(-1)),
    Entry(P + "mlp.experts.gate_up_proj_bias", ("gate_b", "up_b"),
          lambda c: (c.num_local_experts, 2 * c.intermediate_size), *_deinterleave(-1)),
    Entry(P + "mlp.experts.down_proj", ("down_w",),
          lambda c: (c.num_local_experts, c.intermediate_size, c.hidden_size), *_ident),
    Entry(P + "mlp.experts.down_proj_bias", ("down_b",),
          lambda c: (c.num_local_experts, c.hidden_size), *_ident),
)

# MXFP4 checkpoints store these two as `<name>_blocks` + `<name>_scales`, dequantizing to [E, out, in]; the
# loader transposes them to the dense [E, in, out] layout and then applies the dense entry above.
MXFP4_EXPERT_TENSORS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def split_layer(name: str) -> tuple[int | None, str]:
  """'model.layers.3.self_attn.sinks' -> (3, 'model.layers.{i}.self_attn.sinks')."""
  m = _LAYER_RE.match(name)
  if not m:
    return None, name
  return int(m.group(1)), "model.layers.{i}." + m.group(2)


ENTRY_BY_NAME = {e.hf_name: e for e in ENTRIES}


def expected_hf_names(cfg: GptOssConfig) -> list[str]:
  names = []
  for e in ENTRIES:
    if e.per_layer:
      names += [e.hf_name.format(i=i) for i in range(cfg.num_hidden_layers)]
    else:
      names.append(e.hf_name)
  return names


def hf_to_ours(name: str, value: np.ndarray, cfg: GptOssConfig) -> dict[str, np.ndarray]:
  """Converts one HF tensor to our parameter slices: {'embed': ...} or {'layers/q_w': ...} (one layer)."""
  layer, pattern = split_layer(name)
  entry = ENTRY_BY_NAME.get(pattern)
  if entry is None:
    raise KeyError(f"unexpected tensor {name!r} in the checkpoint (no entry in the gpt-oss weight map)")
  want = entry.hf_shape(cfg)
  if tuple(value.shape) != tuple(want):
    raise ValueError(f"tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(want)} for this config")
  if entry.per_layer and not 0 <= layer < cfg.num_hidden_layers:
    raise KeyError(f"tensor {name!r} names layer {layer}, but the config has {cfg.num_hidden_layers} layers")
  outs = entry.to_ours(value, cfg)
  prefix = "layers/" if entry.per_layer else ""
  return {prefix + t: o for t, o in zip(entry.targets, outs)}


def ours_to_hf(params: dict[str, np.ndarray], cfg: GptOssConfig, layer: int | None, entry: Entry) -> np.ndarray:
  """The inverse of `hf_to_ours` for one entry; `params` holds the (per-layer sliced) source arrays."""
  prefix = "layers/" if entry.per_layer else ""
  out = entry.to_hf(tuple(params[prefix + t] for t in entry.targets), cfg)
  assert tuple(out.shape) == tuple(entry.hf_shape(cfg)), (entry.hf_name, out.shape)
  return np.ascontiguousarray(out)
