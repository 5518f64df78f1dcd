"""Load a Hugging Face gpt-oss checkpoint (dense or MXFP4 safetensors, a local folder or a Hub id) into a
`GptOss`, streaming every parameter straight into its sharding: each device shard is read from the files on its
own (layer range, expert range, head range, ...) in pieces of bounded size, so the host holds a few pieces at most."""

from __future__ import annotations

import functools
import json
import math
import mmap
import os
import struct
from typing import Any, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from numina_jax.hf import keymap, mxfp4
from numina_jax.model.config import GptOssConfig
from numina_jax.model.params import param_specs
from numina_jax.model.transformer import GptOss
from numina_jax.sharding import param_shardings

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# What a Hub download fetches: the HF-format weights, config and tokenizer; not `original/` or `metal/`.
HUB_PATTERNS = ("config.json", "generation_config.json", "model*.safetensors", INDEX_FILE,
                "tokenizer*", "special_tokens_map.json", "chat_template*")

_NP_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "U8": np.uint8, "I8": np.int8, "I32": np.int32, "I64": np.int64}
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_BLOCKS, _SCALES = "_blocks", "_scales"


class CheckpointError(ValueError):
  """The checkpoint's files do not hold a gpt-oss model matching its config."""


def _listing(names: Iterable[str], limit: int = 12) -> str:
  names = sorted(names)
  shown = ", ".join(names[:limit])
  return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# Locating the checkpoint ---------------------------------------------------------------------------------
def resolve_checkpoint(path_or_id: str | os.PathLike, *, revision: str | None = None,
                       cache_dir: str | None = None) -> str:
  """A local checkpoint folder: `path_or_id` itself if it is a folder, else a Hub snapshot of that repo id."""
  raw = os.fspath(path_or_id)
  if "://" in raw:  # the reader memory-maps the safetensors files, which needs them on a local disk
    raise FileNotFoundError(f"{raw}: Hugging Face checkpoints are read from a local folder or the Hub; copy it "
                            f"first (gcloud storage cp -r {raw} DIR) and pass DIR")
  path = os.path.expanduser(raw)
  if os.path.isdir(path):
    return path
  if os.path.exists(path):
    raise NotADirectoryError(f"{path} is a file; expected a checkpoint folder holding config.json and "
                             "safetensors files")
  from huggingface_hub import snapshot_download  # only a Hub id needs it
  from huggingface_hub.utils import HFValidationError, validate_repo_id

  looks_local = raw.startswith((".", "/", "~")) or raw.count("/") > 1 or os.sep != "/" and os.sep in raw
  try:
    validate_repo_id(raw)
  except HFValidationError:
    looks_local = True
  if looks_local:
    raise FileNotFoundError(f"no checkpoint folder at {path} (and it is not a Hugging Face Hub repo id)")
  try:
    return snapshot_download(raw, revision=revision, cache_dir=cache_dir, allow_patterns=list(HUB_PATTERNS))
  except Exception as e:  # offline, unknown repo, gated repo, ...: one clear message
    raise FileNotFoundError(f"{raw} is not a local folder, and fetching it from the Hugging Face Hub failed: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


# Reading tensors -------------------------------------------------------------------------------------------
class _TensorInfo:
  __slots__ = ("file", "shape", "dtype", "begin", "end")

  def __init__(self, file, shape, dtype, begin, end):
    self.file, self.shape, self.dtype, self.begin, self.end = file, tuple(shape), dtype, begin, end


def _read_region(path: str, info: _TensorInfo, index: tuple[slice, ...]) -> np.ndarray:
  """A copy of `tensor[index]` (unit-step slices) of a C-ordered tensor stored in `path`. Only the bytes from the
  window's first to its last element are mapped, and unmapped before returning: nothing of the file stays
  resident in this process."""
  dtype = np.dtype(_NP_DTYPES[info.dtype])
  index = tuple(index) + (slice(None),) * (len(info.shape) - len(index))
  spans = []
  for s, n in zip(index, info.shape):
    start, stop, step = s.indices(n)
    if step != 1:
      raise ValueError(f"windowed reads need unit-step slices, got {s}")
    spans.append((start, max(start, stop)))
  shape = tuple(b - a for a, b in spans)
  if 0 in shape:
    return np.empty(shape, dtype)
  strides = [dtype.itemsize * math.prod(info.shape[k + 1:]) for k in range(len(info.shape))]
  lo = info.begin + sum(a * st for (a, _), st in zip(spans, strides))
  hi = info.begin + sum((b - 1) * st for (_, b), st in zip(spans, strides)) + dtype.itemsize
  base = lo - lo % mmap.ALLOCATIONGRANULARITY
  with open(path, "rb") as f:  # populated up front: one call instead of a page fault per 4 KiB
    mapped = mmap.mmap(f.fileno(), hi - base, offset=base, prot=mmap.PROT_READ,
                       flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
  view = None
  try:
    view = np.ndarray(shape, dtype, buffer=mapped, offset=lo - base, strides=strides)
    return np.array(view, order="C")
  finally:
    del view  # the mapping can only close once no array points into it
    mapped.close()


class _LazyTensor:
  """One tensor of a checkpoint file; indexing it with slices reads just that window (see `_read_region`)."""

  def __init__(self, path: str, info: _TensorInfo):
    self.path, self.info = path, info

  @property
  def shape(self) -> tuple[int, ...]:
    return self.info.shape

  def __getitem__(self, index) -> np.ndarray:
    return _read_region(self.path, self.info, index if isinstance(index, tuple) else (index,))


def _read_header(path: str) -> tuple[int, dict[str, Any]]:
  """(data start offset, header dict) of a safetensors file; names the file when it is truncated or corrupt."""
  size = os.path.getsize(path)
  try:
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      if n > size - 8:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, file "
                              f"of {size})")
      header = json.loads(f.read(n))
  except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({e})") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: corrupt safetensors file (header is not a JSON object)")
  start = 8 + n
  for name, info in header.items():
    if name == "__metadata__":
      continue
    end = info.get("data_offsets", [0, math.inf])[1] if isinstance(info, dict) else math.inf
    if start + end > size:
      raise CheckpointError(f"{path}: truncated safetensors file (tensor {name!r} ends at byte "
                            f"{start + end}, the file has {size})")
  return start, header


class SafetensorsCheckpoint:
  """The tensors of a checkpoint folder (`model.safetensors.index.json` + shards, or one `model.safetensors`),
  read lazily by slice; nothing is loaded until asked for."""

  def __init__(self, directory: str):
    self.directory = directory
    index_path = os.path.join(directory, INDEX_FILE)
    single_path = os.path.join(directory, SINGLE_FILE)
    if os.path.exists(index_path):
      try:
        with open(index_path) as f:
          weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid safetensors index ({type(e).__name__}: {e})") from None
    elif os.path.exists(single_path):
      weight_map = None
    else:
      raise FileNotFoundError(f"{directory} holds neither {INDEX_FILE} nor {SINGLE_FILE}")

    files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
    absent = [f for f in files if not os.path.exists(os.path.join(directory, f))]
    if absent:
      raise FileNotFoundError(f"{index_path} lists files that do not exist in {directory}: {_listing(absent)}")

    self.tensors: dict[str, _TensorInfo] = {}
    for file in files:
      path = os.path.join(directory, file)
      start, header = _read_header(path)
      try:  # safetensors' own checks of the header (offsets, dtypes); the data is read by `_read_region`
        with safe_open(path, framework="numpy"):
          pass
      except SafetensorError as e:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({e})") from None
      for name, info in header.items():
        if name == "__metadata__":
          continue
        if weight_map is not None and weight_map.get(name) != file:
          continue  # stray copies in other shards: the index is authoritative
        begin, end = info["data_offsets"]
        self.tensors[name] = _TensorInfo(file, info["shape"], info["dtype"], start + begin, start + end)
    if weight_map is not None:
      lost = [n for n, f in weight_map.items() if n not in self.tensors]
      if lost:
        raise CheckpointError(f"{index_path} maps tensors to files that do not contain them: "
                              + "; ".join(f"{n} -> {weight_map[n]}" for n in sorted(lost)[:12])
                              + (f"; ... ({len(lost) - 12} more)" if len(lost) > 12 else ""))

  def __contains__(self, name: str) -> bool:
    return name in self.tensors

  def slice_handle(self, name: str) -> _LazyTensor:
    """A lazy, sliceable view of one tensor (reads only what is indexed)."""
    info = self.tensors[name]
    if info.dtype not in _NP_DTYPES:
      raise CheckpointError(f"tensor {name!r} has unsupported dtype {info.dtype}")
    return _LazyTensor(os.path.join(self.directory, info.file), info)

  def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    return self.slice_handle(name)[() if index is None else index]

  def read_dense(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """`name` in the dense HF layout; MXFP4 expert weights ([E, out, in] blocks) are dequantized and
    transposed to the dense [E, in, out] on the fly, reading only the window `index` covers."""
    if name in self.tensors:
      return self.read(name, index)
    se, s_in, s_out = index
    w = mxfp4.dequantize_window(self.slice_handle(name + _BLOCKS), self.slice_handle(name + _SCALES),
                                experts=se, rows=s_out, cols=s_in)
    return w.transpose(0, 2, 1)


# Checking names and shapes ---------------------------------------------------------------------------------
def _mxfp4_shapes(entry: keymap.Entry, cfg: GptOssConfig):
  """(blocks shape, scales shape) of an MXFP4 expert tensor, or None when its input width cannot be MXFP4."""
  E, n_in, n_out = entry.hf_shape(cfg)
  if n_in % mxfp4.GROUP:
    return None
  groups = n_in // mxfp4.GROUP
  return (E, n_out, groups, mxfp4.BYTES_PER_GROUP), (E, n_out, groups)


def check_tensors(ckpt: SafetensorsCheckpoint, cfg: GptOssConfig) -> dict[str, str]:
  """Every expected tensor present with its shape, nothing unexpected; returns {dense name: 'dense'|'mxfp4'}."""
  quantized = {f"model.layers.{{i}}.{t}" for t in keymap.MXFP4_EXPERT_TENSORS}
  found: dict[str, str] = {}
  unexpected, bad_shape, bad_dtype = [], [], []

  def check(name, got, want):
    if tuple(got) != tuple(want):
      bad_shape.append(f"{name}: got {tuple(got)}, expected {tuple(want)}")

  for name, info in ckpt.tensors.items():
    base, kind = name, "dense"
    for suffix in (_BLOCKS, _SCALES):
      if name.endswith(suffix):
        base, kind = name[:-len(suffix)], suffix
    layer, pattern = keymap.split_layer(base)
    entry = keymap.ENTRY_BY_NAME.get(pattern)
    if (entry is None or (kind != "dense" and pattern not in quantized)
        or (entry.per_layer and not 0 <= layer < cfg.num_hidden_layers)):
      unexpected.append(name)
      continue
    if kind == "dense":
      found[name] = "dense"
      check(name, info.shape, entry.hf_shape(cfg))
      if info.dtype not in _FLOAT_DTYPES:
        bad_dtype.append(f"{name}: {info.dtype} (expected a float type)")
    else:
      found.setdefault(base, "")
      found[base] += kind
      shapes = _mxfp4_shapes(entry, cfg)
      if shapes is None:
        bad_shape.append(f"{name}: MXFP4 needs the input width {entry.hf_shape(cfg)[1]} to be a multiple of "
                         f"{mxfp4.GROUP}")
      else:
        check(name, info.shape, shapes[0] if kind == _BLOCKS else shapes[1])
      if info.dtype != "U8":
        bad_dtype.append(f"{name}: {info.dtype} (MXFP4 {kind[1:]} must be U8)")

  kinds, missing = {}, []
  for name in keymap.expected_hf_names(cfg):
    got = found.get(name)
    if got == "dense":
      kinds[name] = "dense"
    elif got in (_BLOCKS + _SCALES, _SCALES + _BLOCKS):
      kinds[name] = "mxfp4"
    elif got == _BLOCKS:
      missing.append(name + _SCALES)
    elif got == _SCALES:
      missing.append(name + _BLOCKS)
    else:
      missing.append(name)
  where = ckpt.directory
  if missing:
    raise CheckpointError(f"{where}: {len(missing)} tensors missing from the checkpoint: {_listing(missing)}")
  if unexpected:
    raise CheckpointError(f"{where}: {len(unexpected)} unexpected tensors in the checkpoint (not part of "
                          f"gpt-oss with this config): {_listing(unexpected)}")
  if bad_shape:
    raise CheckpointError(f"{where}: shape mismatch for {len(bad_shape)} tensors (name: got, expected): "
                          + "; ".join(bad_shape[:12]) + (" ..." if len(bad_shape) > 12 else ""))
  if bad_dtype:
    raise CheckpointError(f"{where}: unsupported dtypes: " + "; ".join(bad_dtype[:12]))
  return kinds


# From HF windows to our parameters -------------------------------------------------------------------------
def _heads(s: slice, width: int) -> slice:
  return slice(s.start * width, s.stop * width)


def _qkv_weight(ckpt, name, idx, cfg):
  sd, sn, sh = idx  # ours [D, n, H] from HF [n*H, D]
  w = ckpt.read(name, (_heads(sn, cfg.head_dim), sd))
  return (w.reshape(sn.stop - sn.start, cfg.head_dim, -1)[:, sh].transpose(2, 0, 1),)


def _qkv_bias(ckpt, name, idx, cfg):
  sn, sh = idx  # ours [n, H] from HF [n*H]
  return (ckpt.read(name, (_heads(sn, cfg.head_dim),)).reshape(-1, cfg.head_dim)[:, sh],)


def _o_weight(ckpt, name, idx, cfg):
  sn, sh, sd = idx  # ours [N, H, D] from HF [D, N*H]
  w = ckpt.read(name, (sd, _heads(sn, cfg.head_dim)))
  return (w.reshape(w.shape[0], -1, cfg.head_dim)[:, :, sh].transpose(1, 2, 0),)


def _gate_up(ckpt, name, idx, cfg):
  *lead, si = idx  # ours gate, up [..., I] from HF [..., 2I] interleaved (2j gate, 2j+1 up)
  w = ckpt.read_dense(name, (*lead, _heads(si, 2)))
  return w[..., 0::2], w[..., 1::2]


def _same(ckpt, name, idx, cfg):
  return (ckpt.read_dense(name, idx),)


def _transposed(ckpt, name, idx, cfg):
  return (ckpt.read(name, tuple(reversed(idx))).T,)


# One windowed reader per layout of the weight map (`keymap.LAYOUTS`).
WINDOWS = {"same": _same, "transposed": _transposed, "heads_in": _qkv_weight, "heads_bias": _qkv_bias,
           "heads_out": _o_weight, "interleaved": _gate_up}
assert set(WINDOWS) == set(keymap.LAYOUTS), "every layout of the weight map needs a windowed reader"


def read_window(ckpt: SafetensorsCheckpoint, cfg: GptOssConfig, entry: keymap.Entry, layer: int | None,
                index: tuple[slice, ...]) -> tuple[np.ndarray, ...]:
  """`entry`'s targets (ours, one layer) restricted to `index` (unit-step slices over the per-layer shape),
  reading from the files only the part of the HF tensor that window needs."""
  name = entry.hf_name.format(i=layer) if entry.per_layer else entry.hf_name
  return WINDOWS[entry.layout](ckpt, name, index, cfg)


def _concrete(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  out = []
  for s, n in zip(index, shape):
    start, stop, step = s.indices(n)
    assert step == 1, index
    out.append((start, stop))
  return tuple(out)


# Host bytes of one piece (over all targets of an entry, counted in fp32 as dequantization and casts work in it):
# the loader holds about three pieces' worth of temporaries beyond the parameters.
CHUNK_BYTES = 64 << 20

def _pieces(want: tuple[int, ...], lead: int, axis: int, rows: int) -> Iterator[tuple[tuple[int, int], ...]]:
  """The pieces a device shard of shape `want` is read in, as (start, stop) per axis relative to the shard: one
  index of the layer axis (when `lead` is 1) at a time, `rows` indices of axis `lead + axis` at a time."""
  for layer in range(want[0]) if lead else [None]:
    for lo in range(0, want[lead + axis], rows):
      span = [(0, n) for n in want]
      if lead:
        span[0] = (layer, layer + 1)
      span[lead + axis] = (lo, min(lo + rows, want[lead + axis]))
      yield tuple(span)


def _read_piece(ckpt, cfg, entry, spans, piece, np_dtype) -> list[np.ndarray]:
  """The targets of `entry` over `piece` (relative spans) of the device shard at `spans`, in `np_dtype`; per-layer
  pieces keep their layer axis."""
  where = [(a + p0, a + p1) for (a, _), (p0, p1) in zip(spans, piece)]
  lead = 1 if entry.per_layer else 0
  layer = where[0][0] if lead else None
  parts = read_window(ckpt, cfg, entry, layer, tuple(slice(a, b) for a, b in where[lead:]))
  want = tuple(b - a for a, b in piece)
  assert all(p.shape == want[lead:] for p in parts), (entry.hf_name, [p.shape for p in parts], want)
  return [_contiguous(p, np_dtype).reshape(want) for p in parts]


def _contiguous(a: np.ndarray, dtype, tile: int = 256) -> np.ndarray:
  """A C-ordered copy of `a` in `dtype`. A strided (transposed) source is copied tile by tile in its own dtype, so
  source and destination stay in cache, then cast contiguously: about 2x a plain strided casting copy."""
  if a.flags.c_contiguous or a.ndim < 2:
    return np.ascontiguousarray(a).astype(dtype, copy=False)
  out = np.empty(a.shape, a.dtype)
  for i in range(0, a.shape[-2], tile):
    for j in range(0, a.shape[-1], tile):
      out[..., i:i + tile, j:j + tile] = a[..., i:i + tile, j:j + tile]
  return out.astype(dtype, copy=False)


@functools.lru_cache(maxsize=None)
def _writer(mesh: Mesh, spec: P):
  """Writes each device's piece into the same window of its own shard, in place (the buffer is donated); one
  compilation serves every device of the mesh."""
  def write(buf, piece, starts):
    return jax.lax.dynamic_update_slice(buf, piece, starts)
  return jax.jit(jax.shard_map(write, mesh=mesh, in_specs=(spec, spec, P()), out_specs=spec), donate_argnums=0)


def _fills_on_host(devices) -> bool:
  """Whether these devices keep their buffers in host memory (CPU): a shard is then filled where it will live."""
  return all(d.platform == "cpu" for d in devices)


_ALIGN = 64  # XLA:CPU adopts host buffers aligned to this without a copy


def _host_buffer(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  nbytes = math.prod(shape) * dtype.itemsize
  raw = np.empty(nbytes + _ALIGN, np.uint8)
  start = -raw.ctypes.data % _ALIGN
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def _place(ckpt, cfg, entry, names, specs, shardings, np_dtype, chunk_bytes) -> list[jax.Array]:
  """Builds the parameters `names` of one weight-map entry, reading each device shard in pieces of at most about
  `chunk_bytes` along the entry's row axis, so the host holds a piece or two beyond the parameters:
  - on CPU devices (whose memory is host memory) each shard is filled piece by piece in a host buffer that the
    device then adopts without a copy;
  - elsewhere a shard within `chunk_bytes` is assembled on the host and copied over whole, and a larger one goes
    piece by piece to its devices, each piece written there in place into a zero buffer (one layer of stacked
    experts is 3 GiB in fp32: no host ever holds it whole)."""
  shape = specs[names[0]].shape
  sharding = shardings[names[0]]
  assert all(specs[n].shape == shape and shardings[n] == sharding for n in names), names
  index_map = sharding.addressable_devices_indices_map(shape)
  groups: dict[tuple[tuple[int, int], ...], list[jax.Device]] = {}
  for device, index in index_map.items():
    groups.setdefault(_concrete(index, shape), []).append(device)
  lead = 1 if entry.per_layer else 0
  axis = entry.row_axis  # a range of it is one contiguous run of the file
  want = tuple(b - a for a, b in next(iter(groups)))
  assert all(tuple(b - a for a, b in spans) == want for spans in groups), (entry.hf_name, list(groups))
  n_rows = want[lead + axis]
  row = len(names) * max(np_dtype.itemsize, 4) * math.prod(want[lead:]) // n_rows  # host bytes of one row
  shards: list[dict[jax.Device, jax.Array]] = [{} for _ in names]

  if _fills_on_host(index_map) or row * n_rows * (want[0] if lead else 1) <= chunk_bytes:
    for spans, devices in groups.items():
      bufs = [_host_buffer(want, np_dtype) for _ in names]
      for piece in _pieces(want, lead, axis, min(n_rows, max(1, chunk_bytes // row))):
        for buf, part in zip(bufs, _read_piece(ckpt, cfg, entry, spans, piece, np_dtype)):
          buf[tuple(slice(a, b) for a, b in piece)] = part
      for k, buf in enumerate(bufs):
        for device in devices:  # CPU devices share the (immutable) buffer; others copy it
          shards[k][device] = jax.device_put(buf, device, may_alias=True)
      # Wait for the copies so the host buffers of this shard can go before the next one is read.
      jax.block_until_ready([shards[k][d] for k in range(len(names)) for d in devices])
      del bufs
  else:
    # Writes go through a mesh: the sharding's own, or one per device for other kinds of sharding.
    if isinstance(sharding, NamedSharding):
      targets = [sharding]
    else:
      targets = [NamedSharding(Mesh(np.array([d]), ("device",)), P()) for d in index_map]
    bufs = [[jnp.zeros(shape if t is sharding else want, np_dtype, device=t) for t in targets] for _ in names]
    # Each step reads one piece per distinct shard (group) before the write: together they stay within chunk_bytes.
    rows = min(n_rows, max(1, chunk_bytes // (row * len(groups))))
    for piece in _pieces(want, lead, axis, rows):
      local = [{} for _ in names]
      for spans, devices in groups.items():
        for k, part in enumerate(_read_piece(ckpt, cfg, entry, spans, piece, np_dtype)):
          for device in devices:
            local[k][device] = jax.device_put(part, device)
        # The host copy of this shard's piece can go before the next shard's is read.
        jax.block_until_ready([local[k][d] for k in range(len(names)) for d in devices])
      size = tuple(b - a for a, b in piece)
      starts = tuple(a for a, _ in piece)
      for k in range(len(names)):
        for t, target in enumerate(targets):
          devices = list(target.addressable_devices_indices_map(bufs[k][t].shape))
          global_shape = tuple(n * (g // w) for n, g, w in zip(size, bufs[k][t].shape, want))
          piece_k = jax.make_array_from_single_device_arrays(global_shape, target, [local[k][d] for d in devices])
          bufs[k][t] = _writer(target.mesh, target.spec)(bufs[k][t], piece_k, starts)
      jax.block_until_ready(bufs)
      del local
    for k in range(len(names)):
      for buf in bufs[k]:
        shards[k].update({s.device: s.data for s in buf.addressable_shards})
  return [jax.make_array_from_single_device_arrays(shape, sharding, [p[d] for d in index_map]) for p in shards]


def load_pretrained_params(path_or_hub_id, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None, *,
                           shardings: Mapping[str, jax.sharding.Sharding] | None = None,
                           revision: str | None = None, progress: bool = True, chunk_bytes: int = CHUNK_BYTES
                           ) -> tuple[dict[str, jax.Array], GptOssConfig]:
  """Our flat `{name: array}` parameters (in `dtype`) and config from an HF checkpoint.

  With `mesh`, each parameter lands in its `numina_jax.sharding.param_shardings` sharding (or pass
  `shardings` explicitly); without, on the default device, one parameter at a time. Device shards larger than
  `chunk_bytes` are read and transferred in pieces of about that size, which bounds the host memory used beyond
  the parameters themselves.
  """

  directory = resolve_checkpoint(path_or_hub_id, revision=revision)
  cfg = GptOssConfig.from_pretrained(directory)
  specs = param_specs(cfg)
  if shardings is None:
    if mesh is not None:
      shardings = param_shardings(specs, mesh)
    else:
      single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      shardings = {k: single for k in specs}
  np_dtype = np.dtype(jnp.dtype(dtype))
  ckpt = SafetensorsCheckpoint(directory)
  check_tensors(ckpt, cfg)

  params: dict[str, jax.Array] = {}
  L = cfg.num_hidden_layers
  with tqdm(total=len(keymap.expected_hf_names(cfg)), desc="loading tensors", unit="tensor",
            disable=not progress) as bar:
    for entry in keymap.ENTRIES:
      names = [("layers/" if entry.per_layer else "") + t for t in entry.targets]
      bar.set_postfix_str(entry.hf_name.replace("{i}", "*"), refresh=False)
      for name, arr in zip(names, _place(ckpt, cfg, entry, names, specs, shardings, np_dtype, chunk_bytes)):
        params[name] = arr
      bar.update(L if entry.per_layer else 1)
  assert set(params) == set(specs)
  return params, cfg


def load_pretrained(path_or_hub_id, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None, *,
                    param_dtype=None, revision: str | None = None, progress: bool = True, **model_kwargs):
  """A `GptOss` from a Hugging Face checkpoint folder or Hub id (dense or MXFP4 safetensors).

  `dtype` is the compute dtype; parameters are stored in `param_dtype` (default: `dtype`). Extra keyword
  arguments go to `GptOss` (remat_policy, moe_kernel, ...).
  """

  param_dtype = dtype if param_dtype is None else param_dtype
  params, cfg = load_pretrained_params(path_or_hub_id, param_dtype, mesh, revision=revision,
                                       progress=progress)
  return GptOss(cfg, params=params, param_dtype=param_dtype, dtype=dtype, **model_kwargs)
