"""Export our parameters as a dense Hugging Face gpt-oss checkpoint (what transformers' `save_pretrained`
writes): sharded safetensors streamed tensor by tensor from the devices, an index, config and generation
config, and optionally the tokenizer."""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from numina_jax import storage
from numina_jax.hf import keymap
from numina_jax.hf.load import INDEX_FILE
from numina_jax.model.config import GptOssConfig
from numina_jax.model.params import param_specs

_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_CHUNK_BYTES = 256 << 20  # host staging per write for the big tensors (experts, embeddings)

# Token ids of the released gpt-oss tokenizer (o200k_harmony), used when the vocabulary is the real one.
REAL_VOCAB_SIZE = 201088
REAL_GENERATION_CONFIG = {"bos_token_id": 199998, "do_sample": True,
                          "eos_token_id": [200002, 199999, 200012], "pad_token_id": 199999}

def parse_size(size: int | str) -> int:
  """'5GB' -> 5e9 bytes (decimal units as transformers uses; 'GiB' etc. are binary)."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
  if not m:
    raise ValueError(f"cannot parse size {size!r}; use e.g. 5GB, 500MB or a byte count")
  unit = m.group(2).rstrip("B") if m.group(2) not in ("", "B") else ""
  scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
           "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
  return int(float(m.group(1)) * scale)


def _fetch(x, index: tuple, np_dtype: np.dtype) -> np.ndarray:
  """One slice of a (possibly sharded, on-device) array, cast on the device, copied to the host."""
  if isinstance(x, jax.Array):
    if not x.is_fully_addressable:
      return _gather(x, index, np_dtype)
    return np.asarray(jax.device_get(x[index].astype(np_dtype)))
  return np.asarray(x[index]).astype(np_dtype)


@functools.lru_cache(maxsize=None)
def _replicating_slice(mesh):
  def take(x, starts, *, sizes, dtype):
    return jax.lax.dynamic_slice(x, starts, sizes).astype(dtype)
  return jax.jit(take, static_argnames=("sizes", "dtype"), out_shardings=NamedSharding(mesh, P()))


def _gather(x: jax.Array, index: tuple, np_dtype: np.dtype) -> np.ndarray:
  """A slice of an array sharded over several processes: every process runs this collective (the slice is
  replicated to all of them), so every process must fetch the same slices in the same order."""
  if not isinstance(x.sharding, NamedSharding):
    raise TypeError(f"cannot gather an array with {type(x.sharding).__name__} across processes; use a NamedSharding")
  index = index + (slice(None),) * (x.ndim - len(index))
  starts, sizes, squeeze = [], [], []
  for axis, (i, n) in enumerate(zip(index, x.shape)):
    if isinstance(i, slice):
      lo, hi, step = i.indices(n)
      assert step == 1, index
      starts.append(lo)
      sizes.append(hi - lo)
    else:
      starts.append(int(i))
      sizes.append(1)
      squeeze.append(axis)
  # Start indices are traced, so each (shape, dtype) of slice compiles once, not once per layer or row block.
  out = _replicating_slice(x.sharding.mesh)(x, np.asarray(starts, np.int32), sizes=tuple(sizes),
                                            dtype=np.dtype(np_dtype).name)
  return np.asarray(out.addressable_data(0)).reshape([s for a, s in enumerate(sizes) if a not in squeeze])


def _hf_chunks(params: Mapping[str, Any], cfg: GptOssConfig, entry: keymap.Entry, layer: int | None,
               np_dtype: np.dtype) -> Iterator[np.ndarray]:
  """The HF tensor of `entry` for one layer in row blocks (along its axis 0), in order."""
  prefix = "layers/" if entry.per_layer else ""
  sources = [params[prefix + t] for t in entry.targets]
  lead = (layer,) if entry.per_layer else ()
  hf_shape = tuple(entry.hf_shape(cfg))
  axis = entry.row_axis
  n_ours = sources[0].shape[len(lead) + axis]
  per = entry.rows_per_index(cfg)  # HF rows per index of our row axis (head_dim where heads are flattened)
  row_bytes = int(np.prod(hf_shape[1:])) * np_dtype.itemsize * per
  if row_bytes * n_ours <= _CHUNK_BYTES:
    parts = tuple(_fetch(s, lead, np_dtype) for s in sources)
    yield keymap.ours_to_hf({prefix + t: p for t, p in zip(entry.targets, parts)}, cfg, layer, entry)
    return
  step = max(1, _CHUNK_BYTES // row_bytes)
  for r0 in range(0, n_ours, step):
    r1 = min(r0 + step, n_ours)
    index = lead + (slice(None),) * axis + (slice(r0, r1),)
    parts = tuple(_fetch(s, index, np_dtype) for s in sources)
    out = entry.to_hf(parts, cfg)
    assert tuple(out.shape) == ((r1 - r0) * per, *hf_shape[1:]), (entry.hf_name, out.shape, hf_shape)
    yield np.ascontiguousarray(out)


def _plan(cfg: GptOssConfig, itemsize: int, max_bytes: int) -> list[list[tuple[str, keymap.Entry, int | None]]]:
  """Tensors in file order (embeddings, layer by layer, final norm, lm_head), packed greedily into shards."""
  glob = {e.hf_name: e for e in keymap.ENTRIES if not e.per_layer}
  order = [("model.embed_tokens.weight", glob["model.embed_tokens.weight"], None)]
  for i in range(cfg.num_hidden_layers):
    order += [(e.hf_name.format(i=i), e, i) for e in keymap.ENTRIES if e.per_layer]
  order += [(n, glob[n], None) for n in ("model.norm.weight", "lm_head.weight")]
  shards, size = [[]], 0
  for item in order:
    nbytes = int(np.prod(item[1].hf_shape(cfg))) * itemsize
    if shards[-1] and size + nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(item)
    size += nbytes
  return shards


def _header(items, cfg: GptOssConfig, st_dtype: str, itemsize: int) -> tuple[bytes, int]:
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, entry, _ in items:
    shape = [int(s) for s in entry.hf_shape(cfg)]
    end = offset + int(np.prod(shape)) * itemsize
    header[name] = {"dtype": st_dtype, "shape": shape, "data_offsets": [offset, end]}
    offset = end
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
  return len(raw).to_bytes(8, "little") + raw, offset


def generation_config(cfg: GptOssConfig) -> dict[str, Any]:
  if cfg.vocab_size == REAL_VOCAB_SIZE:
    return dict(REAL_GENERATION_CONFIG)
  out = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
  return {k: v for k, v in out.items() if v is not None}


def _prepare_dir(out_dir: str, overwrite: bool) -> None:
  out = storage.path(out_dir)
  storage.refresh(out_dir)
  if out.exists() and not out.is_dir():
    raise NotADirectoryError(f"{out_dir} exists and is not a folder")
  names = storage.listdir(out_dir)
  if names:
    if not overwrite:
      raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True (--overwrite) to write into it")
    # Stale shards of an earlier export with a different shard count would confuse loaders.
    for f in names:
      if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json", f):
        storage.remove(storage.join(out_dir, f))
  storage.makedirs(out_dir)


def save_pretrained(model_or_params, out_dir: str, dtype=jnp.bfloat16, *, cfg: GptOssConfig | None = None,
                    tokenizer=None, max_shard_size: int | str = "5GB", overwrite: bool = False,
                    progress: bool = True) -> str:
  """Writes a dense HF checkpoint of a `GptOss` (or of a flat params dict, with `cfg`) to `out_dir`.

  Each HF tensor is one layer's slice copied from the devices (the experts and embeddings in row blocks), so
  the host holds one tensor at a time. `tokenizer` is a tokenizer object or a path/Hub id to copy it from.
  Refuses a non-empty `out_dir` unless `overwrite`. On several hosts every host must call this with the same
  parameters: each tensor is gathered from its shards on all hosts, and process 0 writes the files.
  """
  if isinstance(model_or_params, Mapping):
    params = model_or_params
    if cfg is None:
      raise ValueError("save_pretrained(params, ...) needs cfg= (a GptOssConfig)")
  else:
    params = model_or_params.params_dict()
    cfg = model_or_params.cfg if cfg is None else cfg
  specs = param_specs(cfg)
  missing, extra = sorted(set(specs) - set(params)), sorted(set(params) - set(specs))
  if missing or extra:
    raise ValueError(f"parameters do not match the config: missing {missing}, unexpected {extra}")
  for name, spec in specs.items():
    if tuple(params[name].shape) != spec.shape:
      raise ValueError(f"parameter {name!r} has shape {tuple(params[name].shape)}, expected {spec.shape}")
  np_dtype = np.dtype(jnp.dtype(dtype))
  if np_dtype.name not in _ST_DTYPES:
    raise ValueError(f"cannot export in {np_dtype.name}; choose one of {', '.join(_ST_DTYPES)}")
  st_dtype = _ST_DTYPES[np_dtype.name]
  shards = _plan(cfg, np_dtype.itemsize, parse_size(max_shard_size))
  if jax.process_index() != 0:
    # Parameters sharded over several hosts are gathered tensor by tensor with all hosts taking part; only
    # process 0 writes.
    for items in shards:
      for _, entry, layer in items:
        for _ in _hf_chunks(params, cfg, entry, layer, np_dtype):
          pass
    return out_dir
  _prepare_dir(out_dir, overwrite)

  weight_map, total = {}, 0
  with tqdm(total=sum(len(s) for s in shards), desc="writing tensors", unit="tensor",
            disable=not progress) as bar:
    for k, items in enumerate(shards):
      file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
      header, nbytes = _header(items, cfg, st_dtype, np_dtype.itemsize)
      # Whole or not at all: a failure mid-shard leaves no truncated file under the final name.
      with storage.open_write(storage.join(out_dir, file), "wb") as f:
        f.write(header)
        written = 0
        for name, entry, layer in items:
          for chunk in _hf_chunks(params, cfg, entry, layer, np_dtype):
            f.write(chunk.tobytes())
            written += chunk.nbytes
          weight_map[name] = file
          bar.update(1)
        assert written == nbytes, (file, written, nbytes)
      total += nbytes

  storage.write_text(storage.join(out_dir, INDEX_FILE),
                     json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
  config = cfg.to_hf_dict()
  config["torch_dtype"] = config["dtype"] = np_dtype.name
  storage.write_text(storage.join(out_dir, "config.json"), json.dumps(config, indent=2))
  storage.write_text(storage.join(out_dir, "generation_config.json"),
                     json.dumps(generation_config(cfg), indent=2))
  if tokenizer is not None:
    _save_tokenizer(tokenizer, out_dir)
  return out_dir


def _save_tokenizer(tokenizer, out_dir: str) -> None:
  """The tokenizer files, written by transformers into a local folder (it writes only there), then copied."""
  if isinstance(tokenizer, (str, os.PathLike)):
    from transformers import AutoTokenizer  # heavy (seconds), and only for a tokenizer given by name
    tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
  if not storage.is_remote(out_dir):
    tokenizer.save_pretrained(out_dir)
    return
  with tempfile.TemporaryDirectory(prefix="numina-tokenizer-") as tmp:
    tokenizer.save_pretrained(tmp)
    for f in sorted(Path(tmp).rglob("*")):
      if f.is_file():
        storage.upload(f, storage.join(out_dir, *f.relative_to(tmp).parts))
