"""The gpt-oss decoder as a Flax NNX module whose forward pass scans over (sliding, full) layer pairs."""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from numina_jax.model import attention as attn_lib, layers, moe
from numina_jax.model.config import GptOssConfig, yarn_inv_freq
from numina_jax.model.params import PER_LAYER, TOP_LEVEL, ParamSpec, init_params, param_specs
from numina_jax.sharding import with_logical_constraint

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_out": jax.checkpoint_policies.save_only_these_names("qkv_proj", "out_proj", "mlp_out"),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(d) -> jnp.dtype:
  if isinstance(d, str):
    if d not in DTYPES:
      raise ValueError(f"unknown dtype {d!r}; choose one of {', '.join(DTYPES)}")
    return jnp.dtype(DTYPES[d])
  return jnp.dtype(d)


def forward(params: Mapping[str, jax.Array], input_ids_BT, cfg: GptOssConfig, *, positions_BT=None,
            segment_ids_BT=None, dtype=jnp.float32, remat_policy: str = "none", moe_kernel: str = "auto",
            moe_tile: int = 0, moe_capacity_factor: float = 0.0, attention: str = "auto",
            return_router_logits: bool = False, return_hidden: bool = False, return_moe_dropped: bool = False):
  """Logits [B, T, V] from a flat `{name: array}` parameter dict, then, if asked, router logits [L, B*T, E] and
  the number of MoE assignments dropped by `moe_capacity_factor` (over all layers).

  `segment_ids` (0 = padding) keep packed documents from attending to each other; `positions` restart per
  document. Both default to a single unpacked sequence. `attention` picks the attention implementation
  (`attention.IMPLEMENTATIONS`; all give the same values).
  """
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f"unknown remat_policy {remat_policy!r}; choose one of {', '.join(REMAT_POLICIES)}")
  dtype = as_dtype(dtype)
  kernel = moe.resolve_moe_kernel(moe_kernel)
  attn_impl = attn_lib.resolve_attention(attention)
  B, T = input_ids_BT.shape
  if positions_BT is None:
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones((B, T), jnp.int32)

  # Gather the table's hidden axis first (FSDP gathers weights anyway): with `fsdp` on both the table's hidden
  # axis and the batch, the partitioner could otherwise only replicate the lookup.
  embed_VD = with_logical_constraint(params["embed"], ("vocab", None))
  x_BTD = jnp.take(embed_VD, input_ids_BT, axis=0).astype(dtype)
  x_BTD = with_logical_constraint(x_BTD, ("batch", "seq", "act_embed"))
  inv_freq, attn_factor = yarn_inv_freq(cfg)
  cos, sin = layers.rope_cos_sin(positions_BT, inv_freq, attn_factor, dtype)
  attend = functools.partial(attn_lib.attention, cos=cos, sin=sin, segment_ids_BT=segment_ids_BT, impl=attn_impl)
  sliding, full = functools.partial(attend, window=cfg.sliding_window), functools.partial(attend, window=None)
  layer_fn = functools.partial(layers.decoder_layer, cfg=cfg, kernel=kernel, tile=moe_tile,
                               capacity_factor=moe_capacity_factor)

  def pair(x, pp):
    # pp: per-layer params with a leading axis of 2: the sliding layer, then the full layer.
    x, logits_s, dropped_s = layer_fn(jax.tree.map(lambda a: a[0], pp), x, sliding)
    x, logits_f, dropped_f = layer_fn(jax.tree.map(lambda a: a[1], pp), x, full)
    return x, (jnp.stack([logits_s, logits_f]) if return_router_logits else None, dropped_s + dropped_f)

  policy = REMAT_POLICIES[remat_policy]
  if remat_policy != "none":
    pair = jax.checkpoint(pair, policy=policy, prevent_cse=False)
  stacked = {k: params[f"layers/{k}"] for k in PER_LAYER}
  paired = jax.tree.map(lambda a: a.reshape(a.shape[0] // 2, 2, *a.shape[1:]), stacked)
  x_BTD, (router, dropped) = jax.lax.scan(pair, x_BTD, paired)

  h_BTD = layers.rms_norm(x_BTD, params["final_norm"], cfg.rms_norm_eps)
  if return_hidden:
    out = h_BTD
  else:
    out = jnp.einsum("btd,dv->btv", h_BTD, params["lm_head"].astype(dtype),
                     preferred_element_type=jnp.float32).astype(dtype)
    out = with_logical_constraint(out, ("batch", "seq", "act_vocab"))
  extras = []
  if return_router_logits:
    extras.append(router.reshape(cfg.num_hidden_layers, B * T, -1))
  if return_moe_dropped:
    extras.append(jnp.sum(dropped))
  return (out, *extras) if extras else out


class GptOss(nnx.Module):
  """gpt-oss for causal LM. Parameters are `nnx.Param`s named as in `param_specs`, each carrying its logical
  axes as metadata (`logical_axes`); per-layer parameters live in `self.layers`, stacked on axis 0."""

  def __init__(self, cfg: GptOssConfig, *, rngs: nnx.Rngs | None = None, param_dtype="float32",
               dtype="float32", remat_policy: str = "none", moe_kernel: str = "auto", moe_tile: int = 0,
               attention: str = "auto", params: Mapping[str, jax.Array] | None = None):
    self.cfg = cfg
    self.dtype = as_dtype(dtype)
    self.param_dtype = as_dtype(param_dtype)
    self.remat_policy = remat_policy
    self.moe_kernel = moe_kernel
    self.moe_tile = moe_tile
    self.attention = attention
    specs = param_specs(cfg)
    if params is None:
      rngs = rngs if rngs is not None else nnx.Rngs(0)
      params = init_params(cfg, rngs.params(), self.param_dtype)
    check_params(params, specs)
    self.layers = nnx.Dict({k: nnx.Param(params[f"layers/{k}"], logical_axes=specs[f"layers/{k}"].logical_axes)
                            for k in PER_LAYER})
    for k in TOP_LEVEL:
      setattr(self, k, nnx.Param(params[k], logical_axes=specs[k].logical_axes))

  def params_dict(self) -> dict[str, jax.Array]:
    """The flat `{name: array}` view of the parameters (names as in `param_specs`)."""
    out = {k: getattr(self, k)[...] for k in TOP_LEVEL}
    out.update({f"layers/{k}": self.layers[k][...] for k in PER_LAYER})
    return out

  def __call__(self, input_ids_BT, *, positions=None, segment_ids=None, return_router_logits=False,
               return_hidden=False):
    return forward(self.params_dict(), input_ids_BT, self.cfg, positions_BT=positions,
                   segment_ids_BT=segment_ids, dtype=self.dtype, remat_policy=self.remat_policy,
                   moe_kernel=self.moe_kernel, moe_tile=self.moe_tile, attention=self.attention,
                   return_router_logits=return_router_logits, return_hidden=return_hidden)


def check_params(params: Mapping[str, jax.Array], specs: Mapping[str, ParamSpec]) -> None:
  missing = sorted(set(specs) - set(params))
  extra = sorted(set(params) - set(specs))
  if missing or extra:
    raise ValueError(f"parameter set does not match the model: missing {missing}, unexpected {extra}")
  for name, spec in specs.items():
    if tuple(params[name].shape) != spec.shape:
      raise ValueError(f"parameter {name!r} has shape {tuple(params[name].shape)}, expected {spec.shape}")


def abstract_model(cfg: GptOssConfig, param_dtype="bfloat16") -> GptOss:
  """The model with `ShapeDtypeStruct` leaves: shapes and dtypes without allocating anything."""
  return nnx.eval_shape(lambda: GptOss(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype))
