"""Where rows come from: Hub datasets, local .jsonl/.json/.parquet files or directories, tfds, the shipped sample.

A source is read as a numbered sequence of rows (dicts); rows are only streamed once, when they are tokenized into
the on-disk cache, so a large set is never held in memory, and a host parses only the rows it owns. Names:

  "AI-MO/NuminaMath-CoT"       a Hub dataset, through `datasets.load_dataset(name, config, split=split)`
  "hf:NAME"                    the same path forced, for a local dataset directory laid out like a Hub repo
  "/data/x.jsonl", "/data/dir" local files (.jsonl, .json, .parquet) or a directory of them, read in sorted order
  "tfds:NAME"                  a TensorFlow Datasets set (needs the optional tensorflow-datasets)
  "sample:cot", "sample:tir"   the project's generated sample data (numina_jax/data/sample/)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Generator, Iterator

import numpy as np

from numina_jax.data import config as data_config

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
SAMPLES = {"sample:cot": SAMPLE_DIR / "cot.jsonl", "sample:tir": SAMPLE_DIR / "tir.jsonl"}
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
# Data-config fields a mixture entry may override for its own source.
SOURCE_FIELDS = ("row_format", "question_field", "answer_field", "messages_field", "tools_field", "tool_calls_field",
                 "tool_name_field", "tool_input_field", "tool_output_field", "require_valid", "drop_answers",
                 "allowed_sources", "layout")


class BadLine:
  """A line of a JSON-lines file that is not valid JSON; it becomes a bad row when tokenized."""

  def __init__(self, message: str):
    self.message = message


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """One source of a mixture: its name, Hub config and split, weight, and data-config fields of its own."""

  name: str
  config: str = ""
  split: str = "train"
  weight: float = 1.0
  overrides: tuple[tuple[str, Any], ...] = ()

  def option(self, data_cfg, key: str):
    return dict(self.overrides).get(key, data_config.get(data_cfg, key))


def _parse_entry(entry, data_cfg) -> SourceSpec:
  default_split = data_config.get(data_cfg, "split")
  if isinstance(entry, str):
    name, sep, weight = entry.rpartition("=")
    if not sep or not name:
      raise ValueError(f"data.mixture entry {entry!r}: write NAME=WEIGHT")
    try:
      return SourceSpec(name.strip(), split=default_split, weight=float(weight))
    except ValueError:
      raise ValueError(f"data.mixture entry {entry!r}: weight {weight!r} is not a number") from None
  if hasattr(entry, "to_dict"):
    entry = entry.to_dict()
  if not isinstance(entry, dict) or "name" not in entry:
    raise ValueError(f"data.mixture entry {entry!r}: need a dict with a 'name' (and 'weight') or NAME=WEIGHT")
  entry = dict(entry)
  name = entry.pop("name")
  config = entry.pop("config", "") or ""
  split = entry.pop("split", default_split)
  weight = float(entry.pop("weight", 1.0))
  unknown = sorted(set(entry) - set(SOURCE_FIELDS))
  if unknown:
    raise ValueError(f"data.mixture entry {name!r}: unknown keys {unknown}; allowed: {list(SOURCE_FIELDS)}")
  overrides = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in entry.items()))
  return SourceSpec(name, config, split, weight, overrides)


def source_specs(data_cfg) -> list[SourceSpec]:
  """The train sources: data.mixture if set, else data.dataset_name alone."""
  mixture = data_config.get(data_cfg, "mixture")
  if isinstance(mixture, str):
    mixture = [m for m in mixture.split(",") if m.strip()]
  if mixture:
    specs = [_parse_entry(entry, data_cfg) for entry in mixture]
    if any(s.weight < 0 for s in specs) or not any(s.weight > 0 for s in specs):
      raise ValueError(f"data.mixture weights must be >= 0 with one > 0, got {[s.weight for s in specs]}")
    return specs
  return [SourceSpec(data_config.get(data_cfg, "dataset_name"), data_config.get(data_cfg, "dataset_config"),
                     data_config.get(data_cfg, "split"))]


def eval_source_spec(data_cfg) -> SourceSpec | None:
  name = data_config.get(data_cfg, "eval_dataset_name")
  if not name:
    return None
  return SourceSpec(name, data_config.get(data_cfg, "dataset_config"), data_config.get(data_cfg, "eval_split"))


# ----------------------------------------------------------------------------------------------------------------


class RowSource:
  """A numbered sequence of rows with a fingerprint that changes when the rows may have changed."""

  name: str
  fingerprint: str
  num_rows: int

  def iter_rows(self) -> Iterator[Any]:
    raise NotImplementedError

  def iter_selected(self, keep: np.ndarray) -> Iterator[tuple[int, Any]]:
    """(index, row) of the rows where keep[index] (a bool array of num_rows), in order; others are not parsed."""
    n = len(keep)
    idx = -1
    for idx, row in enumerate(self.iter_rows()):
      if idx >= n:
        raise RuntimeError(f"{self.name}: more rows than the {n} counted; did the files change while reading?")
      if keep[idx]:
        yield idx, row
    _check_count(self.name, idx + 1, n)


def _check_count(name: str, seen: int, expected: int) -> None:
  if seen != expected:
    raise RuntimeError(f"{name}: read {seen} rows, expected {expected}; did the files change while reading?")


def _file_stat_fingerprint(paths: list[Path]) -> str:
  h = hashlib.sha256()
  for p in paths:
    st = p.stat()
    h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return h.hexdigest()


def _count_lines(path: Path) -> int:
  n = 0
  with open(path, "rb") as f:
    for line in f:
      n += bool(line.strip())
  return n


class LocalFiles(RowSource):
  """.jsonl, .json and .parquet files, concatenated in the given order."""

  def __init__(self, name: str, paths: list[Path], fingerprint: str | None = None):
    self.name = name
    self.paths = paths
    self.fingerprint = fingerprint or _file_stat_fingerprint(paths)
    self._num_rows: int | None = None

  @property
  def num_rows(self) -> int:
    # Counted on demand: a cache hit needs only the fingerprint, not a pass over large files.
    if self._num_rows is None:
      self._num_rows = sum(self._count(p) for p in self.paths)
    return self._num_rows

  @staticmethod
  def _json_rows(path: Path) -> list | None:
    """Rows of a .json file holding one array (or one object with a single array); None if it is JSON lines."""
    with open(path, encoding="utf-8") as f:
      text = f.read()
    try:
      data = json.loads(text)
    except json.JSONDecodeError:
      return None
    if isinstance(data, dict):
      lists = [v for v in data.values() if isinstance(v, list)]
      if len(lists) == 1:
        return lists[0]
      raise ValueError(f"{path}: a .json file must hold an array of rows (or an object with one array)")
    if not isinstance(data, list):
      raise ValueError(f"{path}: a .json file must hold an array of rows")
    return data

  def _count(self, path: Path) -> int:
    if path.suffix == ".parquet":
      return _parquet_file(path).metadata.num_rows
    if path.suffix == ".json":
      rows = self._json_rows(path)
      if rows is not None:
        return len(rows)
    return _count_lines(path)

  def iter_rows(self) -> Iterator[Any]:
    for _, row in self._rows(None):
      yield row

  def iter_selected(self, keep: np.ndarray) -> Iterator[tuple[int, Any]]:
    seen = yield from self._rows(keep)
    _check_count(self.name, seen, len(keep))

  def _rows(self, keep: np.ndarray | None) -> Generator[tuple[int, Any], None, int]:
    """(index, row) over the files in order, only where keep[index] when `keep` is given (other lines are not even
    parsed); returns the number of rows seen."""
    idx = 0

    def check(more: int):
      if keep is not None and idx + more > len(keep):
        raise RuntimeError(f"{self.name}: more rows than the {len(keep)} counted; did the files change while reading?")

    for path in self.paths:
      if path.suffix == ".parquet":
        for batch in _parquet_file(path).iter_batches(batch_size=1024):
          check(batch.num_rows)
          sel = np.arange(batch.num_rows) if keep is None else np.flatnonzero(keep[idx:idx + batch.num_rows])
          if len(sel):
            yield from zip((idx + sel).tolist(), batch.take(sel).to_pylist())
          idx += batch.num_rows
        continue
      rows = self._json_rows(path) if path.suffix == ".json" else None
      if rows is not None:
        check(len(rows))
        for j, row in enumerate(rows):
          if keep is None or keep[idx + j]:
            yield idx + j, row
        idx += len(rows)
        continue
      with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
          if not line.strip():
            continue
          check(1)
          if keep is None or keep[idx]:
            try:
              yield idx, json.loads(line)
            except json.JSONDecodeError as e:
              yield idx, BadLine(f"{path.name} line {lineno} is not valid JSON ({e.msg})")
          idx += 1
    return idx


def _parquet_file(path: Path):
  import pyarrow.parquet as pq  # heavy (a quarter second): imported for .parquet files only
  return pq.ParquetFile(path)


class HFDataset(RowSource):
  """A `datasets.Dataset` (from the Hub or a local dataset directory)."""

  def __init__(self, name: str, ds, fingerprint: str):
    self.name, self.ds, self.fingerprint, self.num_rows = name, ds, fingerprint, len(ds)

  def iter_rows(self) -> Iterator[Any]:
    yield from self._iter(self.ds)

  @staticmethod
  def _iter(ds) -> Iterator[Any]:
    for batch in ds.iter(batch_size=1024):
      keys = list(batch)
      for values in zip(*(batch[k] for k in keys)):
        yield dict(zip(keys, values))

  def iter_selected(self, keep: np.ndarray) -> Iterator[tuple[int, Any]]:
    _check_count(self.name, len(keep), self.num_rows)
    rows = np.flatnonzero(keep)
    yield from zip(rows.tolist(), self._iter(self.ds.select(rows)))


def _to_python(value):
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray):
    return [_to_python(v) for v in value.tolist()] if value.dtype == object else value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, dict):
    return {k: _to_python(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_to_python(v) for v in value]
  return value


class TfdsSource(RowSource):
  """A TensorFlow Datasets split; strings come back as bytes there and are decoded here."""

  def __init__(self, name: str, split: str):
    try:
      import tensorflow_datasets as tfds  # an optional extra
    except ImportError:
      raise ImportError(f"tfds:{name} needs tensorflow-datasets, an optional extra: pip install 'numina_jax[tfds]'") \
          from None
    self._tfds = tfds
    self.name = f"tfds:{name}"
    self._ds, info = tfds.load(name, split=split, with_info=True, shuffle_files=False)
    self.num_rows = int(info.splits[split].num_examples)
    self.fingerprint = hashlib.sha256(f"tfds\0{name}\0{split}\0{info.version}".encode()).hexdigest()

  def iter_rows(self) -> Iterator[Any]:
    for example in self._tfds.as_numpy(self._ds):
      yield _to_python(example)


def load_hub_dataset(name: str, config: str = "", split: str = "train") -> HFDataset:
  """`datasets.load_dataset(name, config, split=split)`: a Hub id, or a local directory laid out like one."""
  import datasets  # heavy: imported for Hub and dataset-directory sources only
  try:
    ds = datasets.load_dataset(name, config or None, split=split)
  except Exception as e:  # datasets raises many types (connection, missing split, missing files)
    raise RuntimeError(f"could not load dataset {name!r} (config {config or 'default'!r}, split {split!r}): {e}") \
        from e
  fingerprint = hashlib.sha256(f"hf\0{name}\0{config}\0{split}\0{ds._fingerprint}".encode()).hexdigest()
  return HFDataset(f"{name}{'/' + config if config else ''}[{split}]", ds, fingerprint)


def _looks_local(name: str) -> bool:
  return name.startswith(("/", ".", "~")) or name.endswith(FILE_SUFFIXES) or not _HUB_ID.match(name)


def open_source(spec: SourceSpec) -> RowSource:
  """Opens the rows of one source; a missing local path raises FileNotFoundError naming it."""
  name = spec.name
  if not name:
    raise ValueError("empty dataset name (set data.dataset_name or data.mixture)")
  if name.startswith("sample:"):
    path = SAMPLES.get(name)
    if path is None:
      raise ValueError(f"unknown sample {name!r}; the shipped samples are {sorted(SAMPLES)}")
    if not path.is_file():
      raise FileNotFoundError(f"sample data file not found: {path} (make it with python -m numina_jax.data.make_sample)")
    return LocalFiles(name, [path], hashlib.sha256(path.read_bytes()).hexdigest())
  if name.startswith("tfds:"):
    return TfdsSource(name[len("tfds:"):], spec.split)
  if name.startswith("hf:"):
    return load_hub_dataset(name[len("hf:"):], spec.config, spec.split)
  path = Path(name).expanduser()
  if path.is_file():
    if path.suffix not in FILE_SUFFIXES:
      raise ValueError(f"{name}: unsupported file type {path.suffix!r}; use one of {FILE_SUFFIXES}")
    return LocalFiles(name, [path])
  if path.is_dir():
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
    if not files:
      raise FileNotFoundError(f"no {'/'.join(FILE_SUFFIXES)} files in directory {name}")
    return LocalFiles(name, files)
  if _looks_local(name):
    raise FileNotFoundError(f"dataset path not found: {name}")
  return load_hub_dataset(name, spec.config, spec.split)


# ----------------------------------------------------------------------------------------------------------------
# Filters for NuminaMath-1.5 (and any set with the same columns).


def _is_yes(value) -> bool:
  if isinstance(value, bool):
    return value
  return isinstance(value, str) and value.strip().lower() in ("yes", "true")


@dataclasses.dataclass(frozen=True)
class RowFilter:
  require_valid: bool = True
  drop_answers: tuple[str, ...] = ("proof", "notfound")
  allowed_sources: tuple[str, ...] = ()

  @classmethod
  def for_source(cls, spec: SourceSpec, data_cfg) -> "RowFilter":
    return cls(bool(spec.option(data_cfg, "require_valid")),
               tuple(str(a).lower() for a in spec.option(data_cfg, "drop_answers")),
               tuple(spec.option(data_cfg, "allowed_sources")))

  def reason(self, row: Any) -> str | None:
    """Why the row is dropped (a short key), or None to keep it."""
    if not isinstance(row, dict):
      return None  # not a row at all: reported as a bad row
    if self.require_valid:
      for key in ("problem_is_valid", "solution_is_valid"):
        if key in row and row[key] is not None and not _is_yes(row[key]):
          return key.replace("_is_valid", "_invalid")
    if self.drop_answers and isinstance(row.get("answer"), str):
      answer = row["answer"].strip().lower()
      if answer in self.drop_answers:
        return f"answer_{answer}"
    if self.allowed_sources and row.get("source") not in self.allowed_sources:
      return "source_not_allowed"
    return None
