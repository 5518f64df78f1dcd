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


# How an HF tensor's axes map to ours. Each layout names its two transforms and its row axis: the axis of our
# (per-layer) array that runs along the HF tensor's axis 0, so a range of it is one contiguous run of the file. The
# loader's windowed readers (`load.WINDOWS`) and the exporter's streaming follow the layout, never the tensor name.
def _same_to_ours(w, c):
  return (w,)


def _same_to_hf(ws, c):
  return ws[0]


def _transposed_to_ours(w, c):  # HF Linear [out, in] -> ours [in, out]
  return (w.T,)


def _transposed_to_hf(ws, c):
  return ws[0].T


def _heads_in_to_ours(w, c):  # HF [n*H, D] -> ours [D, n, H]
  return (w.T.reshape(w.shape[1], -1, c.head_dim),)


def _heads_in_to_hf(ws, c):
  return ws[0].reshape(ws[0].shape[0], -1).T


def _heads_bias_to_ours(b, c):  # HF [n*H] -> ours [n, H]
  return (b.reshape(-1, c.head_dim),)


def _heads_bias_to_hf(bs, c):
  return bs[0].reshape(-1)


def _heads_out_to_ours(w, c):  # HF [D, N*H] -> ours [N, H, D]
  return (w.T.reshape(-1, c.head_dim, w.shape[0]),)


def _heads_out_to_hf(ws, c):
  return ws[0].reshape(-1, ws[0].shape[-1]).T


def _interleaved_to_ours(w, c):  # HF [..., 2I] interleaved (2j gate, 2j+1 up) -> ours gate, up [..., I]
  return w[..., 0::2], w[..., 1::2]


def _interleaved_to_hf(ws, c):
  gate, up = ws
  return np.stack([gate, up], axis=-1).reshape(*gate.shape[:-1], -1)


@dataclasses.dataclass(frozen=True)
class Layout:
  to_ours: Callable[[np.ndarray, GptOssConfig], tuple[np.ndarray, ...]]
  to_hf: Callable[[tuple[np.ndarray, ...], GptOssConfig], np.ndarray]
  row_axis: int             # our (per-layer) axis that runs along HF axis 0
  rows_per_index: str = ""  # config attribute: HF rows per index of that axis ("" for 1)


LAYOUTS: dict[str, Layout] = {
    "same": Layout(_same_to_ours, _same_to_hf, 0),
    "transposed": Layout(_transposed_to_ours, _transposed_to_hf, 1),
    "heads_in": Layout(_heads_in_to_ours, _heads_in_to_hf, 1, "head_dim"),
    "heads_bias": Layout(_heads_bias_to_ours, _heads_bias_to_hf, 0, "head_dim"),
    "heads_out": Layout(_heads_out_to_ours, _heads_out_to_hf, 2),
    "interleaved": Layout(_interleaved_to_ours, _interleaved_to_hf, 0),
}


@dataclasses.dataclass(frozen=True)
class Entry:
  """How one HF tensor becomes one or more of our parameters (for one layer, or a global tensor)."""
  hf_name: str                 # with `{i}` for the layer index
  targets: tuple[str, ...]     # our parameter names (per-layer ones without the `layers/` prefix)
  hf_shape: Callable[[GptOssConfig], tuple[int, ...]]
  layout: str                  # a key of LAYOUTS
  per_layer: bool = True

  def __post_init__(self):
    if self.layout not in LAYOUTS:
      raise ValueError(f"{self.hf_name}: unknown layout {self.layout!r}; one of {sorted(LAYOUTS)}")

  def to_ours(self, w: np.ndarray, cfg: GptOssConfig) -> tuple[np.ndarray, ...]:
    return LAYOUTS[self.layout].to_ours(w, cfg)

  def to_hf(self, ws: tuple[np.ndarray, ...], cfg: GptOssConfig) -> np.ndarray:
    return LAYOUTS[self.layout].to_hf(ws, cfg)

  @property
  def row_axis(self) -> int:
    """The axis of our (per-layer) parameter that runs along the HF tensor's axis 0."""
    return LAYOUTS[self.layout].row_axis

  def rows_per_index(self, cfg: GptOssConfig) -> int:
    """HF rows (axis 0) per index of our `row_axis`: head_dim where HF flattens heads into rows, else 1."""
    attr = LAYOUTS[self.layout].rows_per_index
    return getattr(cfg, attr) if attr else 1


def _attn_shape(n: str, bias: bool):
  if bias:
    return lambda c: (getattr(c, n) * c.head_dim,)
  return lambda c: (getattr(c, n) * c.head_dim, c.hidden_size)


P = "model.layers.{i}."
ENTRIES: tuple[Entry, ...] = (
    Entry("model.embed_tokens.weight", ("embed",), lambda c: (c.vocab_size, c.hidden_size), "same", False),
    Entry("model.norm.weight", ("final_norm",), lambda c: (c.hidden_size,), "same", False),
    Entry("lm_head.weight", ("lm_head",), lambda c: (c.vocab_size, c.hidden_size), "transposed", False),
    Entry(P + "input_layernorm.weight", ("attn_norm",), lambda c: (c.hidden_size,), "same"),
    Entry(P + "post_attention_layernorm.weight", ("mlp_norm",), lambda c: (c.hidden_size,), "same"),
    Entry(P + "self_attn.q_proj.weight", ("q_w",), _attn_shape("num_attention_heads", False), "heads_in"),
    Entry(P + "self_attn.q_proj.bias", ("q_b",), _attn_shape("num_attention_heads", True), "heads_bias"),
    Entry(P + "self_attn.k_proj.weight", ("k_w",), _attn_shape("num_key_value_heads", False), "heads_in"),
    Entry(P + "self_attn.k_proj.bias", ("k_b",), _attn_shape("num_key_value_heads", True), "heads_bias"),
    Entry(P + "self_attn.v_proj.weight", ("v_w",), _attn_shape("num_key_value_heads", False), "heads_in"),
    Entry(P + "self_attn.v_proj.bias", ("v_b",), _attn_shape("num_key_value_heads", True), "heads_bias"),
    Entry(P + "self_attn.o_proj.weight", ("o_w",),
          lambda c: (c.hidden_size, c.num_attention_heads * c.head_dim), "heads_out"),
    Entry(P + "self_attn.o_proj.bias", ("o_b",), lambda c: (c.hidden_size,), "same"),
    Entry(P + "self_attn.sinks", ("sinks",), lambda c: (c.num_attention_heads,), "same"),
    Entry(P + "mlp.router.weight", ("router_w",), lambda c: (c.num_local_experts, c.hidden_size), "transposed"),
    Entry(P + "mlp.router.bias", ("router_b",), lambda c: (c.num_local_experts,), "same"),
    # Dense expert layout ([E, in, out]) as transformers' save_pretrained writes it.
    Entry(P + "mlp.experts.gate_up_proj", ("gate_w", "up_w"),
          lambda c: (c.num_local_experts, c.hidden_size, 2 * c.intermediate_size), "interleaved"),
    Entry(P + "mlp.experts.gate_up_proj_bias", ("gate_b", "up_b"),
          lambda c: (c.num_local_experts, 2 * c.intermediate_size), "interleaved"),
    Entry(P + "mlp.experts.down_proj", ("down_w",),
          lambda c: (c.num_local_experts, c.intermediate_size, c.hidden_size), "same"),
    Entry(P + "mlp.experts.down_proj_bias", ("down_b",),
          lambda c: (c.num_local_experts, c.hidden_size), "same"),
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
