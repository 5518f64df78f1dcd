"""Tokenized sources cached on disk, so a large set is rendered and tokenized once, not on every start.

A cache entry lives in `<cache_dir>/<key>/`, where the key hashes the source's fingerprint, the rendering and
filter options, the bad-row policy and the tokenizer. It holds all documents' tokens (int32) and loss masks (uint8)
as flat memory-mapped files, the offsets of each row, and each row's status (kept, bad, filtered).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import shutil
import uuid
import weakref
from pathlib import Path

import numpy as np

from numina_jax.data import config as data_config
from numina_jax.data import harmony
from numina_jax.data.errors import BadRowError, RowContext
from numina_jax.data.sources import BadLine, RowFilter, RowSource, SourceSpec

CACHE_VERSION = 2  # 2: the final answer is found by eval.grading.last_boxed (`\boxed {`, `\fbox{`, escaped braces)
OK, BAD, FILTERED = 0, 1, 2
MAX_LOGGED_ERRORS = 20
_TOKENIZER_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def default_cache_dir() -> Path:
  return Path(os.environ.get("NUMINA_JAX_CACHE", Path.home() / ".cache" / "numina_jax" / "tokenized"))


def tokenizer_fingerprint(tokenizer) -> str:
  """Hash of the tokenizer's full definition (vocabulary, merges, special tokens)."""
  try:
    cached = _TOKENIZER_FINGERPRINTS.get(tokenizer)
  except TypeError:
    cached = None
  if cached is None:
    cached = hashlib.sha256(harmony._backend(tokenizer).to_str().encode()).hexdigest()
    try:
      _TOKENIZER_FINGERPRINTS[tokenizer] = cached
    except TypeError:
      pass
  return cached


@dataclasses.dataclass
class TokenizedSource:
  """The documents of one source: row i is tokens[offsets[i]:offsets[i+1]], kept when status[i] == OK."""

  name: str
  path: Path
  tokens: np.ndarray
  loss: np.ndarray
  offsets: np.ndarray
  status: np.ndarray
  meta: dict

  @property
  def num_rows(self) -> int:
    return len(self.status)

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)

  def kept_rows(self) -> np.ndarray:
    return np.flatnonzero(self.status == OK)

  def doc(self, row: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = self.offsets[row], self.offsets[row + 1]
    return self.tokens[a:b], self.loss[a:b]

  @classmethod
  def load(cls, path: Path) -> "TokenizedSource":
    meta = json.loads((path / "meta.json").read_text())

    def mmap(name, dtype):
      size = (path / name).stat().st_size
      return np.memmap(path / name, dtype=dtype, mode="r") if size else np.zeros(0, dtype)

    return cls(meta["name"], path, mmap("tokens.bin", np.int32), mmap("loss.bin", np.uint8),
               np.load(path / "offsets.npy"), np.load(path / "status.npy"), meta)


def cache_key(spec: SourceSpec, source: RowSource, opts: harmony.RenderOptions, row_filter: RowFilter,
              on_bad_row: str, tokenizer) -> str:
  payload = {"version": CACHE_VERSION, "source": source.fingerprint, "render": opts.key(),
             "filter": dataclasses.asdict(row_filter), "on_bad_row": on_bad_row,
             "tokenizer": tokenizer_fingerprint(tokenizer)}
  return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:32]


def render_options(spec: SourceSpec, data_cfg) -> harmony.RenderOptions:
  overrides = {k: v for k, v in spec.overrides if k in {f.name for f in dataclasses.fields(harmony.RenderOptions)}}
  return harmony.RenderOptions.from_config(data_cfg, **overrides)


def tokenize_source(spec: SourceSpec, source: RowSource, tokenizer, data_cfg=None) -> TokenizedSource:
  """Loads the cached tokenization of a source, or renders, tokenizes and caches it (with a progress bar)."""
  opts = render_options(spec, data_cfg)
  row_filter = RowFilter.for_source(spec, data_cfg)
  on_bad_row = data_config.get(data_cfg, "on_bad_row")
  if on_bad_row not in ("error", "skip"):
    raise ValueError(f"data.on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
  root = Path(data_config.get(data_cfg, "cache_dir") or default_cache_dir()).expanduser()
  path = root / cache_key(spec, source, opts, row_filter, on_bad_row, tokenizer)
  if (path / "meta.json").is_file():
    return TokenizedSource.load(path)
  root.mkdir(parents=True, exist_ok=True)
  tmp = root / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  try:
    _build(source, tokenizer, opts, row_filter, on_bad_row, data_cfg, tmp)
    try:
      os.rename(tmp, path)
    except OSError:  # another process finished the same entry first; theirs is identical
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return TokenizedSource.load(path)


def _build(source: RowSource, tokenizer, opts, row_filter, on_bad_row: str, data_cfg, out: Path) -> None:
  from tqdm.auto import tqdm
  renderer = harmony.renderer_for(tokenizer)
  batch_size = int(data_config.get(data_cfg, "tokenize_batch_size"))
  n = source.num_rows
  lengths = np.zeros(n, np.int64)
  status = np.zeros(n, np.int8)
  counts: collections.Counter = collections.Counter()
  errors: list[str] = []
  pending: list[tuple[int, harmony.Conversation]] = []

  with open(out / "tokens.bin", "wb") as ftok, open(out / "loss.bin", "wb") as floss:
    def flush():
      for (idx, conv), (ids, mask) in zip(pending, renderer.encode([c.messages for _, c in pending])):
        ftok.write(ids.tobytes())
        floss.write(mask.tobytes())
        lengths[idx] = len(ids)
        counts["tir_rows"] += conv.tir
        counts["no_boxed_rows"] += conv.no_boxed
      pending.clear()

    bar = tqdm(total=n, desc=f"tokenizing {source.name}", unit=" rows", disable=not data_config.get(
        data_cfg, "progress_bar"), mininterval=1.0)
    idx = -1
    for idx, row in enumerate(source.iter_rows()):
      if idx >= n:
        raise RuntimeError(f"{source.name}: more rows than the {n} counted; did the files change while reading?")
      ctx = RowContext(source.name, idx)
      try:
        if isinstance(row, BadLine):
          raise ctx.error(None, row.message, "bad_json")
        reason = row_filter.reason(row)
        if reason is not None:
          status[idx] = FILTERED
          counts[f"filtered:{reason}"] += 1
        else:
          pending.append((idx, harmony.row_conversation(row, opts, ctx)))
      except BadRowError as e:
        if on_bad_row == "error":
          raise
        status[idx] = BAD
        counts[f"bad_row:{e.reason}"] += 1
        if len(errors) < MAX_LOGGED_ERRORS:
          errors.append(str(e))
      if len(pending) >= batch_size:
        flush()
      bar.update(1)
    flush()
    bar.close()
  if idx + 1 != n:
    raise RuntimeError(f"{source.name}: read {idx + 1} rows, expected {n}")
  np.save(out / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
  np.save(out / "status.npy", status)
  meta = {"name": source.name, "fingerprint": source.fingerprint, "num_rows": n,
          "num_tokens": int(lengths.sum()), "kept_rows": int((status == OK).sum()),
          "counts": dict(sorted(counts.items())), "errors": errors}
  (out / "meta.json").write_text(json.dumps(meta, indent=1))
