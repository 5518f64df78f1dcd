"""The gpt-oss mixture of experts (spec: shared/spec/gpt-oss.md, sections 3.4 and 4): routing, grouped-matmul
kernels, expert-parallel dispatch with explicit collectives under `jax.shard_map`, and the load-balancing loss.

Axis legend: X tokens (local to a device under a mesh), K experts per token, A = X*K assignments, E experts,
F experts held by one device, S devices along the expert-parallel axes, D hidden, I expert intermediate, R rows
of the receive buffer, M rows handed to a grouped matmul.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from numina_jax.sharding import logical_to_spec

F32 = jnp.float32

# Logical axes of the per-layer expert weights, as `params.py` declares them (a test holds the two equal).
EXPERT_PARAMS = {
    "gate_w": ("experts", "embed", "mlp"),
    "gate_b": ("experts", "mlp"),
    "up_w": ("experts", "embed", "mlp"),
    "up_b": ("experts", "mlp"),
    "down_w": ("experts", "mlp", "embed"),
    "down_b": ("experts", "norm"),
}
GATHERED = ("embed", "norm")  # weight axes all-gathered inside the shard_map (FSDP); experts and mlp stay split


def _matmul(eq: str, x, w):
  """`einsum(eq, x, w)` accumulated in fp32 and rounded once to x's dtype (the model's matmul rounding)."""
  return jnp.einsum(eq, x, w.astype(x.dtype), preferred_element_type=F32).astype(x.dtype)


# Routing and the expert function ------------------------------------------------------------------------------
def route(p, h_XD, top_k: int):
  """Router logits [X, E]; top-k of the raw logits, softmax over those k (in the logits dtype)."""
  logits_XE = _matmul("xd,de->xe", h_XD, p["router_w"]) + p["router_b"].astype(h_XD.dtype)
  vals, idx_XK = jax.lax.top_k(logits_XE, top_k)
  weights_XK = jax.nn.softmax(vals.astype(F32), axis=-1).astype(h_XD.dtype)
  return logits_XE, idx_XK, weights_XK


def swiglu(gate, up, limit: float, alpha: float):
  gate = jnp.minimum(gate, limit)
  up = jnp.clip(up, -limit, limit)
  return (up + 1) * (gate * jax.nn.sigmoid(gate * alpha))


def combine(y_XKD, weights_XK):
  """Weighted sum over the k experts: multiply in the compute dtype, accumulate in fp32, round once."""
  return jnp.sum((y_XKD * weights_XK[..., None]).astype(F32), axis=1).astype(y_XKD.dtype)


def moe_dense(p, h_XD, idx_XK, weights_XK, limit, alpha, keep_XK=None):
  """Reference: every expert on every token, then pick each token's k outputs. O(E/k) wasted work.

  `keep_XK` (bool) removes assignments from the sum, as a capacity limit drops them.
  """
  dt = h_XD.dtype
  gate = _matmul("xd,edi->exi", h_XD, p["gate_w"]) + p["gate_b"][:, None].astype(dt)
  up = _matmul("xd,edi->exi", h_XD, p["up_w"]) + p["up_b"][:, None].astype(dt)
  y_EXD = _matmul("exi,eid->exd", swiglu(gate, up, limit, alpha), p["down_w"]) + p["down_b"][:, None].astype(dt)
  y_XKD = y_EXD[idx_XK, jnp.arange(h_XD.shape[0])[:, None]]
  if keep_XK is not None:
    y_XKD = jnp.where(keep_XK[..., None], y_XKD, 0)
  return combine(y_XKD, weights_XK)


# Grouped matmul kernels over expert-sorted rows ---------------------------------------------------------------
def auto_tile(assignments: int, experts: int) -> int:
  """Rows per tile: about a quarter of an expert's average group, a power of two in [16, 512].

  Small tiles waste matmul efficiency and copy each expert's weights once per tile; large tiles waste padding.
  """
  target = max(assignments / max(experts, 1) / 4, 1)
  return int(min(512, max(16, 2 ** round(math.log2(target)))))


def _group_of(end_F, rows):
  """The group of each row given the groups' cumulative ends; rows past the last end get the last group."""
  F = end_F.shape[0]
  return jnp.minimum(jnp.searchsorted(end_F, rows, side="right", method="compare_all"), F - 1).astype(jnp.int32)


def _ffn(x, mm, bias, limit, alpha):
  """gate/up, swiglu, down; the down projection comes back in fp32 without its bias, so that a tensor-parallel
  caller can reduce the partial sums before the single rounding."""
  gate = mm(x, "gate_w").astype(x.dtype) + bias("gate_b")
  up = mm(x, "up_w").astype(x.dtype) + bias("up_b")
  return mm(swiglu(gate, up, limit, alpha), "down_w")


def _ffn_ragged(x_MD, sizes_F, expert_M, w, limit, alpha):
  """`jax.lax.ragged_dot` (XLA's grouped matmul; the GPU path, slow on CPU)."""
  def mm(x, name):
    return jax.lax.ragged_dot(x, w[name].astype(x.dtype), sizes_F, preferred_element_type=F32)
  return _ffn(x_MD, mm, lambda name: w[name].astype(x_MD.dtype)[expert_M], limit, alpha)


# Megablox tiles (rows, contraction, output): the kernel reads the rows once per output tile and the weights once
# per row tile, so 128^3 tiles (its default) read the 120b layer's weights ~500 times per grouped matmul; these
# (MaxText's defaults) cut that 4x and the row re-reads 6x, in ~12 MiB of VMEM with double buffering.
GMM_TILE = (512, 512, 1024)


def _ffn_gmm(x_MD, sizes_F, expert_M, w, limit, alpha, interpret: bool):
  """The Pallas megablox grouped matmul (TPU; `interpret` runs it on CPU). Its row count must divide by the row
  tile, so the rows are padded. The kernel leaves rows outside every group unwritten, in its output and in its
  input gradient: both sides are masked, or garbage there would reach the biases' gradients."""
  from jax.experimental.pallas.ops.tpu import megablox  # Pallas TPU code: only for the gmm kernel

  M = x_MD.shape[0]
  tm = min(GMM_TILE[0], -(-M // 8) * 8)
  pad = -M % tm
  valid = (jnp.arange(M) < jnp.sum(sizes_F))[:, None]

  def mm(x, name):
    rhs = w[name].astype(x.dtype)
    k, n = rhs.shape[1:]
    lhs = jnp.pad(jnp.where(valid, x, 0), ((0, pad), (0, 0)))
    # The kernel accumulates in fp32 and rounds once on store: gate/up come out in the compute dtype directly.
    out = megablox.gmm(lhs, rhs, sizes_F, preferred_element_type=F32 if name == "down_w" else x.dtype,
                       tiling=(tm, min(GMM_TILE[1], k), min(GMM_TILE[2], n)), interpret=interpret)
    return jnp.where(valid, out[:M], 0)
  return _ffn(x_MD, mm, lambda name: w[name].astype(x_MD.dtype)[expert_M], limit, alpha)


def _ffn_tiled(x_MD, sizes_F, expert_M, w, limit, alpha, tile: int):
  """Dropless grouped FFN from ordinary batched matmuls (the CPU path: XLA's CPU `ragged_dot` is ~18x slower).

  Each expert's group is padded to a multiple of `tile` rows, so every tile belongs to one expert and a batched
  matmul runs each tile against its expert's weights. A row belongs to one group, so the padded length is
  statically bounded by M + F*(tile-1). `tile=0` picks the size from the shapes (`auto_tile`).
  """
  M, D = x_MD.shape
  F = sizes_F.shape[0]
  tile = max(1, min(tile or auto_tile(M, F), M))
  n_tiles = -(-(M + F * (tile - 1)) // tile)
  end_F = jnp.cumsum(sizes_F)
  padded_F = -(-sizes_F // tile) * tile
  padded_end_F = jnp.cumsum(padded_F)
  rows = jnp.arange(M)
  dest_M = (padded_end_F - padded_F)[expert_M] + rows - (end_F - sizes_F)[expert_M]
  # Rows outside every group get distinct out-of-range slots: dropped here, never computed.
  dest_M = jnp.where(rows < end_F[-1], dest_M, n_tiles * tile + rows)
  x_tCD = jnp.zeros((n_tiles * tile, D), x_MD.dtype).at[dest_M].set(x_MD, mode="drop", unique_indices=True)
  x_tCD = x_tCD.reshape(n_tiles, tile, D)
  tile_expert = _group_of(padded_end_F, jnp.arange(n_tiles) * tile)

  def mm(x, name):
    return jnp.einsum("tcd,tdf->tcf", x, w[name].astype(x.dtype)[tile_expert], preferred_element_type=F32)
  y_tCD = _ffn(x_tCD, mm, lambda name: w[name].astype(x_MD.dtype)[tile_expert][:, None], limit, alpha)
  return y_tCD.reshape(n_tiles * tile, -1)[jnp.minimum(dest_M, n_tiles * tile - 1)]


def grouped_ffn(x_MD, sizes_F, w, *, kernel: str, tile: int, limit: float, alpha: float, interpret: bool = False,
                reduce=None, partial: bool = False):
  """Expert FFN on rows sorted by expert: rows [start_f, start_f + sizes_F[f]) go through expert f (of the F
  in `w`); rows past sum(sizes_F) are padding and come out as zeros. `reduce` (tensor parallelism) maps the fp32
  partial down projection [M, D] to its reduced [M, D'] before rounding; `w["down_b"]` is [F, D']. `partial`
  returns that fp32 partial projection as is (no reduce, bias or rounding), for a caller that reduces later."""
  M = x_MD.shape[0]
  rows = jnp.arange(M)
  end_F = jnp.cumsum(sizes_F)
  expert_M = _group_of(end_F, rows)
  if kernel == "tiled":
    y = _ffn_tiled(x_MD, sizes_F, expert_M, w, limit, alpha, tile)
  elif kernel == "ragged":
    y = _ffn_ragged(x_MD, sizes_F, expert_M, w, limit, alpha)
  elif kernel == "gmm":
    y = _ffn_gmm(x_MD, sizes_F, expert_M, w, limit, alpha, interpret)
  else:
    raise ValueError(f"grouped_ffn: unknown kernel {kernel!r}")
  if partial:
    return jnp.where((rows < end_F[-1])[:, None], y, 0)
  if reduce is not None:
    y = reduce(y)
  y = y.astype(x_MD.dtype) + w["down_b"].astype(x_MD.dtype)[expert_M]
  return jnp.where((rows < end_F[-1])[:, None], y, 0)


GROUPED_KERNELS = ("ragged", "tiled", "gmm")
MOE_KERNELS = ("dense",) + GROUPED_KERNELS


def _platform() -> str:
  """The platform the computation is compiled for: the mesh's devices (a TPU slice compiled from a CPU host
  says tpu), else the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = getattr(mesh, "abstract_device", None) if mesh is not None and not mesh.empty else None
  return device.platform if device is not None else jax.default_backend()


def resolve_moe_kernel(name: str) -> str:
  """`auto` is the batched-matmul `tiled` kernel on CPU, megablox `gmm` on TPU and `ragged_dot` elsewhere."""
  if name == "auto":
    return {"cpu": "tiled", "tpu": "gmm"}.get(_platform(), "ragged")
  if name not in MOE_KERNELS:
    raise ValueError(f"unknown moe_kernel {name!r}; choose one of auto, {', '.join(MOE_KERNELS)}")
  if name == "gmm" and _platform() not in ("tpu", "cpu"):
    raise ValueError(f"moe_kernel 'gmm' is the TPU megablox kernel (interpreted on CPU for tests); on "
                     f"{_platform()} use ragged or auto")
  return name


# Dispatch -----------------------------------------------------------------------------------------------------
def _exclusive_cumsum(x, axis=0):
  return jnp.cumsum(x, axis=axis) - x


def ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
  """`jax.lax.ragged_all_to_all` from a padded `all_to_all` and a scatter, for XLA:CPU (which does not implement
  the op): each device sends its whole operand, offset per peer, and the receiver keeps the `recv_sizes` rows."""
  S = input_offsets.shape[0]
  N, R = operand.shape[0], output.shape[0]
  rows = jnp.arange(N)
  chunks_SN = operand[jnp.minimum(input_offsets[:, None] + rows[None], N - 1)]
  got_SN = jax.lax.all_to_all(chunks_SN, axis_name, 0, 0, tiled=True)
  at_S = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # where each source's rows land here
  spare_SN = R + jnp.arange(S * N).reshape(S, N)  # distinct out-of-range slots for the rows not kept
  dest_SN = jnp.where(rows[None] < recv_sizes[:, None], at_S[:, None] + rows[None], spare_SN)
  return output.at[dest_SN.reshape(S * N)].set(got_SN.reshape(S * N, *operand.shape[1:]), mode="drop",
                                              unique_indices=True)


def _expert_block(w, h_XD, idx_XK, weights_XK, *, kernel, tile, limit, alpha, capacity_factor, ep_axes, ep,
                  fsdp_axes, tp_axes, tp, scatter_tp, token_axes, platform):
  """One device's MoE: sort its assignments by expert, send each to the device holding its expert, run the
  grouped FFN over the local experts, send the results back, combine. Returns (out [X, D'], dropped count).

  Without a mesh every axis tuple is empty and this is plain local code.
  """
  X, K = idx_XK.shape
  dt = h_XD.dtype
  # Weights travel in the compute dtype; FSDP-gathered axes are gathered here, once per layer.
  w = {k: v.astype(dt) for k, v in w.items()}
  for name, axes in EXPERT_PARAMS.items():
    for dim, logical in enumerate(axes):
      if logical in GATHERED and fsdp_axes.get(name, {}).get(dim):
        w[name] = jax.lax.all_gather(w[name], fsdp_axes[name][dim], axis=dim, tiled=True)
  F = w["gate_w"].shape[0]
  E = F * ep
  A = X * K
  me = jax.lax.axis_index(ep_axes) if ep > 1 else 0

  flat_A = idx_XK.reshape(A)
  counts_E = jnp.bincount(flat_A, length=E).astype(jnp.int32)
  if ep > 1 or capacity_factor:
    counts_SE = jax.lax.all_gather(counts_E, ep_axes, axis=0, tiled=False) if ep > 1 else counts_E[None]
  if capacity_factor:
    # Each expert takes at most `capacity` assignments from its dispatch group (the devices along the expert axes),
    # the earliest first: devices in axis order, tokens in order. Every device computes the same table.
    capacity = math.ceil(capacity_factor * X * ep * K / E)
    kept_SE = jnp.clip(capacity - _exclusive_cumsum(counts_SE, axis=0), 0, counts_SE)
    send_E = kept_SE[me]
    by_expert_A = jnp.argsort(flat_A, stable=True)
    rank_A = jnp.zeros(A, jnp.int32).at[by_expert_A].set(
        jnp.arange(A, dtype=jnp.int32) - _exclusive_cumsum(counts_E)[flat_A[by_expert_A]], unique_indices=True)
    keep_A = rank_A < send_E[flat_A]
    dropped = A - jnp.sum(send_E)
    if token_axes:
      dropped = jax.lax.psum(dropped, token_axes)
    key_A = jnp.where(keep_A, flat_A, E + flat_A)  # kept rows first, by expert; dropped rows after them
    buffer_rows = min(ep * X * min(K, F), F * capacity)
  else:
    kept_SE = counts_SE if ep > 1 else None
    send_E = counts_E
    dropped = jnp.zeros((), jnp.int32)
    key_A = flat_A
    buffer_rows = ep * X * min(K, F)  # worst case: every local assignment of every peer lands here
  order_A = jnp.argsort(key_A, stable=True)
  xs_AD = h_XD[order_A // K]

  if tp_axes:
    if scatter_tp:
      D_out = h_XD.shape[1] // tp
      t = jax.lax.axis_index(tp_axes)
      w["down_b"] = jax.lax.dynamic_slice_in_dim(w["down_b"], t * D_out, D_out, axis=1)
      reduce = functools.partial(jax.lax.psum_scatter, axis_name=tp_axes, scatter_dimension=1, tiled=True)
    else:
      reduce = functools.partial(jax.lax.psum, axis_name=tp_axes)
  else:
    reduce = None
  # The partial down projections are reduced in fp32, as a single-device matmul accumulates them.
  ffn = functools.partial(grouped_ffn, w=w, kernel=kernel, tile=tile, limit=limit, alpha=alpha,
                          interpret=platform == "cpu", reduce=reduce)

  if ep == 1:
    ys_AD = ffn(xs_AD, send_E)
  else:
    a2a = ragged_all_to_all_emulated if platform == "cpu" else jax.lax.ragged_all_to_all
    blocks_SS = kept_SE.reshape(ep, ep, F).sum(-1)  # rows sent from device [i] to device [j]
    send_S, recv_S = blocks_SS[me], blocks_SS[:, me]
    send_off_S = _exclusive_cumsum(send_S)  # my rows for each peer, in my sorted rows
    recv_off_S = _exclusive_cumsum(recv_S)  # each peer's rows in my buffer
    land_S = _exclusive_cumsum(blocks_SS, axis=0)[me]  # where my rows land in each peer's buffer
    back_S = _exclusive_cumsum(blocks_SS, axis=1)[:, me]  # where each peer keeps the rows it sent me
    x_RD = a2a(xs_AD, jnp.zeros((buffer_rows, xs_AD.shape[1]), dt), send_off_S, send_S, land_S, recv_S,
               axis_name=ep_axes)
    # The buffer holds each peer's rows sorted by local expert; regroup them by local expert for the kernel.
    recv_SF = jax.lax.dynamic_slice_in_dim(kept_SE, me * F, F, axis=1)
    expert_R = jnp.repeat(jnp.tile(jnp.arange(F, dtype=jnp.int32), ep), recv_SF.reshape(-1),
                          total_repeat_length=buffer_rows)
    expert_R = jnp.where(jnp.arange(buffer_rows) < jnp.sum(recv_S), expert_R, F)
    perm_R = jnp.argsort(expert_R, stable=True)
    # With tensor parallelism the partial down projections travel back in fp32 and are reduced over the A
    # assignments, not over the R-row buffer sized for the worst case (ep x min(k, F) / k times as many rows).
    ys_RD = ffn(x_RD[perm_R], recv_SF.sum(0), partial=bool(tp_axes))
    y_RD = jnp.zeros_like(ys_RD).at[perm_R].set(ys_RD, unique_indices=True)
    ys_AD = a2a(y_RD, jnp.zeros((A, y_RD.shape[1]), y_RD.dtype), recv_off_S, recv_S, back_S, send_S,
                axis_name=ep_axes)
    if tp_axes:
      key_sorted_A = key_A[order_A]  # the expert of each returned row; E + e for a dropped one
      bias_ED = jax.lax.all_gather(w["down_b"], ep_axes, axis=0, tiled=True)
      ys_AD = reduce(ys_AD).astype(dt) + bias_ED.astype(dt)[jnp.minimum(key_sorted_A, E - 1)]
      ys_AD = jnp.where((key_sorted_A < E)[:, None], ys_AD, 0)

  y_AD = jnp.zeros_like(ys_AD).at[order_A].set(ys_AD, unique_indices=True)
  return combine(y_AD.reshape(X, K, -1), weights_XK), dropped


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _sharded_block(w, h_XD, idx_XK, weights_XK, mesh, **opts):
  """`_expert_block` under `jax.shard_map`: tokens split over the batch axes, experts over the expert axes,
  the expert intermediate over the tensor axes, and the hidden axis of the weights gathered over FSDP."""
  X, D = h_XD.shape
  specs = {k: logical_to_spec(EXPERT_PARAMS[k], mesh=mesh, shape=v.shape) for k, v in w.items()}
  token_axes = _axes(logical_to_spec(("batch",), mesh=mesh, shape=(X,))[0])
  ep_axes = _axes(specs["gate_w"][0])
  tp_axes = _axes(specs["gate_w"][2])
  for name, axes in EXPERT_PARAMS.items():
    for dim, logical in enumerate(axes):
      got = _axes(specs[name][dim])
      want = {"experts": ep_axes, "mlp": tp_axes}.get(logical)
      if want is not None and got != want:
        raise ValueError(f"MoE weight {name} is split over {got} on its {logical} axis, but the other expert "
                         f"weights over {want}; they must agree")
  if not set(ep_axes) <= set(token_axes):
    raise ValueError(f"expert parallelism over {ep_axes} needs the MoE's {X} tokens (batch x sequence) split over "
                     f"those axes too, but they split only over {token_axes or 'nothing'}: make batch x sequence "
                     f"divide by the batch mesh axes {dict(mesh.shape)}")
  ep = math.prod(mesh.shape[a] for a in ep_axes)
  tp = math.prod(mesh.shape[a] for a in tp_axes)
  scatter_tp = bool(tp_axes) and D % tp == 0
  fsdp_axes = {k: {d: _axes(s) for d, s in enumerate(specs[k]) if EXPERT_PARAMS[k][d] in GATHERED and s}
               for k in specs}
  tok = token_axes or None
  out_spec = P(tok, tp_axes if scatter_tp else None)
  body = functools.partial(_expert_block, ep_axes=ep_axes, ep=ep, fsdp_axes=fsdp_axes, tp_axes=tp_axes, tp=tp,
                           scatter_tp=scatter_tp, token_axes=token_axes, platform=_platform(), **opts)
  # check_vma=False: the Pallas kernel does not track varying manual axes. Cotangents of inputs replicated over
  # an axis are then summed over it, which is what every replicated input here needs.
  fn = jax.shard_map(body, mesh=mesh, in_specs=(specs, P(tok, None), P(tok, None), P(tok, None)),
                     out_specs=(out_spec, P()), check_vma=False)
  return fn(w, h_XD, idx_XK, weights_XK)


def moe(p, x_BTD, *, top_k, limit, alpha, kernel: str, tile: int = 0, capacity_factor: float = 0.0):
  """The MoE block: (out [B, T, D], router logits [B*T, E], dropped assignments).

  Under a mesh the experts run under `jax.shard_map` with the dispatch written out; without one, as local code.
  `capacity_factor` > 0 caps each expert at ceil(factor * tokens * k / E) assignments per dispatch group and
  drops (and counts) the rest; 0 is dropless.
  """
  B, T, D = x_BTD.shape
  h_XD = x_BTD.reshape(B * T, D)
  logits_XE, idx_XK, weights_XK = route(p, h_XD, top_k)
  if kernel == "dense":
    if capacity_factor:
      raise ValueError("moe_capacity_factor needs a grouped kernel (ragged, tiled or gmm), not the dense reference")
    out_XD, dropped = moe_dense(p, h_XD, idx_XK, weights_XK, limit, alpha), jnp.zeros((), jnp.int32)
  else:
    w = {k: p[k] for k in EXPERT_PARAMS}
    opts = dict(kernel=kernel, tile=tile, limit=limit, alpha=alpha, capacity_factor=capacity_factor)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or not mesh.shape:
      out_XD, dropped = _expert_block(w, h_XD, idx_XK, weights_XK, ep_axes=(), ep=1, fsdp_axes={}, tp_axes=(), tp=1,
                                      scatter_tp=False, token_axes=(), platform=_platform(), **opts)
    else:
      out_XD, dropped = _sharded_block(w, h_XD, idx_XK, weights_XK, mesh, **opts)
  return checkpoint_name(out_XD.reshape(B, T, -1), "mlp_out"), logits_XE, dropped


# Auxiliary loss -----------------------------------------------------------------------------------------------
def load_balancing_loss(router_logits_LXE, valid_X, top_k: int):
  """Switch-style auxiliary loss of transformers' gpt-oss (spec section 4), padding rows excluded."""
  E = router_logits_LXE.shape[-1]
  probs = jax.nn.softmax(router_logits_LXE.astype(F32), axis=-1)
  _, sel = jax.lax.top_k(probs, top_k)
  counts = jax.nn.one_hot(sel, E, dtype=F32).sum(axis=2)  # [L, X, E]; a token picks an expert once
  w = jnp.broadcast_to(valid_X.astype(F32)[None, :, None], counts.shape)
  n = jnp.maximum(jnp.sum(w[..., 0]), 1.0)
  f_E = jnp.sum(counts * w, axis=(0, 1)) / n
  p_E = jnp.sum(probs * w, axis=(0, 1)) / n
  return E * jnp.sum(f_E * p_E)
