"""The input pipeline: sources -> cached tokens -> mixture epochs -> best-fit packed blocks -> this host's batches.

Every host computes the same global stream of blocks from document lengths alone (cheap, deterministic from the
seed) and reads tokens only for its own slice of each global batch. The stream is cut into windows of
`data.pack_window` documents; a position in it is (window, block), which is the whole resumable state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import queue
import threading
import weakref
from typing import Iterator

import numpy as np

from numina_jax.data import config as data_config
from numina_jax.data import packing
from numina_jax.data.sources import SourceSpec, eval_source_spec, open_source, source_specs
from numina_jax.data.tokenized import TokenizedSource, tokenize_source

STATE_VERSION = 1


def _stable_int(*parts) -> int:
  return int(hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:15], 16)


@dataclasses.dataclass
class _Split:
  """The documents of one split: per source, kept row ids (sorted) and their lengths."""

  sources: list[TokenizedSource]
  weights: list[float]
  rows: list[np.ndarray]
  overlong: list[int]

  def lengths(self, i: int) -> np.ndarray:
    return self.sources[i].lengths[self.rows[i]]

  def doc(self, src: int, k: int) -> packing.Doc:
    """Document k (an index into rows[src]) of source src."""
    return self.sources[src].doc(int(self.rows[src][k]))


def _held_out(kept: list[np.ndarray], eval_size: float, fingerprints: list[str], eval_seed: int) -> list[np.ndarray]:
  """Rows held out for eval per source: a fraction of each, or a count spread in proportion to source sizes."""
  sizes = np.array([len(k) for k in kept])
  if eval_size <= 0 or sizes.sum() == 0:
    counts = np.zeros(len(kept), np.int64)
  elif eval_size < 1:
    counts = np.rint(sizes * eval_size).astype(np.int64)
  else:
    total = min(int(eval_size), int(sizes.sum()))
    exact = total * sizes / sizes.sum()
    counts = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - counts), kind="stable")[:total - counts.sum()]:
      counts[i] += 1
  out = []
  for rows, count, fp in zip(kept, counts, fingerprints):
    # Seeded by the source itself, so the eval set stays put when the mixture or the shuffle seed changes.
    perm = np.random.default_rng([eval_seed, _stable_int(fp)]).permutation(len(rows))
    out.append(np.sort(rows[perm[:count]]))
  return out


def _drop_overlong(ts: TokenizedSource, rows: np.ndarray, seq_len: int, policy: str, split: str) -> tuple:
  lengths = ts.lengths[rows]
  over = lengths > seq_len
  if over.any() and policy == "error":
    k = int(np.flatnonzero(over)[0])
    raise ValueError(f"{ts.name}: row {int(rows[k])} renders to {int(lengths[k])} tokens, more than seq_len "
                     f"{seq_len} ({int(over.sum())} such rows in the {split} split); raise seq_len or set "
                     f"data.overlong='skip'")
  return rows[~over], int(over.sum())


@dataclasses.dataclass
class _Prepared:
  train: _Split
  eval: _Split
  stats: dict


def _prepare(data_cfg, tokenizer, seq_len: int) -> _Prepared:
  policy = data_config.get(data_cfg, "overlong")
  if policy not in ("skip", "error"):
    raise ValueError(f"data.overlong must be 'skip' or 'error', got {policy!r}")
  specs = source_specs(data_cfg)
  train_ts = [tokenize_source(spec, open_source(spec), tokenizer, data_cfg) for spec in specs]
  kept = [ts.kept_rows() for ts in train_ts]
  eval_spec: SourceSpec | None = eval_source_spec(data_cfg)
  if eval_spec is not None:
    eval_ts = [tokenize_source(eval_spec, open_source(eval_spec), tokenizer, data_cfg)]
    eval_rows = [eval_ts[0].kept_rows()]
    train_rows = kept
  else:
    eval_ts = train_ts
    fingerprints = [ts.meta["fingerprint"] for ts in train_ts]
    eval_rows = _held_out(kept, float(data_config.get(data_cfg, "eval_size")), fingerprints,
                          int(data_config.get(data_cfg, "eval_seed")))
    train_rows = [np.setdiff1d(k, e, assume_unique=True) for k, e in zip(kept, eval_rows)]
  train = _Split(train_ts, [s.weight for s in specs], [], [])
  for ts, rows in zip(train_ts, train_rows):
    rows, n_over = _drop_overlong(ts, rows, seq_len, policy, "train")
    train.rows.append(rows)
    train.overlong.append(n_over)
  evals = _Split(eval_ts, [1.0] * len(eval_ts), [], [])
  for ts, rows in zip(eval_ts, eval_rows):
    rows, n_over = _drop_overlong(ts, rows, seq_len, policy, "eval")
    evals.rows.append(rows)
    evals.overlong.append(n_over)

  sources = {}
  skipped: dict[str, int] = {}
  for ts in {id(t): t for t in train_ts + eval_ts}.values():
    counts = ts.meta["counts"]
    reasons = {k: v for k, v in counts.items() if k.startswith(("bad_row:", "filtered:"))}
    for k, v in reasons.items():
      skipped[k] = skipped.get(k, 0) + v
    sources[ts.name] = {"rows": ts.num_rows, "kept": ts.meta["kept_rows"], "skipped": reasons,
                        "tir_rows": counts.get("tir_rows", 0), "no_boxed_rows": counts.get("no_boxed_rows", 0),
                        "errors": ts.meta["errors"][:5], "cache": str(ts.path)}
  for split, name in ((train, "train"), (evals, "eval")):
    for ts, rows, n_over in zip(split.sources, split.rows, split.overlong):
      sources[ts.name][f"{name}_docs"] = int(len(rows))
      sources[ts.name][f"{name}_overlong_docs"] = n_over
  stats = {"sources": sources, "rows_read": sum(s["rows"] for s in sources.values()),
           "rows_skipped": dict(sorted(skipped.items()))}
  return _Prepared(train, evals, stats)


class _Mixture:
  """Random access to the train document stream: epoch e is a seeded shuffle of each source's quota.

  Source i contributes n_i = weight share x total documents per epoch, drawn from its own endless sequence of
  reshuffled passes, so an up-weighted source repeats rows and a down-weighted one shows new rows each epoch.
  """

  def __init__(self, split: _Split, seed: int, shuffle: bool):
    self.split, self.seed, self.shuffle = split, seed, shuffle
    sizes = np.array([len(r) for r in split.rows], np.int64)
    weights = np.array(split.weights, np.float64)
    for ts, size, w in zip(split.sources, sizes, weights):
      if w > 0 and size == 0:
        raise ValueError(f"{ts.name}: no documents left for training (all rows skipped, held out or overlong)")
    if len(sizes) == 1:
      quotas = sizes.copy()
    else:
      exact = weights / weights.sum() * sizes.sum()
      quotas = np.floor(exact).astype(np.int64)
      for i in np.argsort(-(exact - quotas), kind="stable")[:int(sizes.sum() - quotas.sum())]:
        quotas[i] += 1
    self.sizes, self.quotas = sizes, quotas
    self.epoch_size = int(quotas.sum())
    self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    self._lock = threading.Lock()  # the prefetch thread and the caller (steps_per_epoch) both read epochs

  def _pass(self, i: int, cycle: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.sizes[i])
    return np.random.default_rng([self.seed, 1, i, cycle]).permutation(self.sizes[i])

  def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, document) of each position of epoch e."""
    with self._lock:
      if e in self._cache:
        return self._cache[e]
    srcs, docs = [], []
    for i, (size, quota) in enumerate(zip(self.sizes, self.quotas)):
      pos = np.arange(e * quota, (e + 1) * quota, dtype=np.int64)
      idx = np.empty(quota, np.int64)
      for cycle in np.unique(pos // size) if quota else []:
        sel = pos // size == cycle
        idx[sel] = self._pass(i, int(cycle))[pos[sel] % size]
      srcs.append(np.full(quota, i, np.int32))
      docs.append(idx)
    src, doc = np.concatenate(srcs), np.concatenate(docs)
    if self.shuffle:
      order = np.random.default_rng([self.seed, 2, e]).permutation(len(src))
      src, doc = src[order], doc[order]
    with self._lock:
      if len(self._cache) >= 2:
        self._cache.pop(min(self._cache))
      self._cache[e] = (src, doc)
    return src, doc

  def stream(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, document) of stream positions [start, stop), across epoch boundaries."""
    srcs, docs = [], []
    pos = start
    while pos < stop:
      e, off = divmod(pos, self.epoch_size)
      take = min(stop - pos, self.epoch_size - off)
      src, doc = self.epoch(e)
      srcs.append(src[off:off + take])
      docs.append(doc[off:off + take])
      pos += take
    if not srcs:
      return np.zeros(0, np.int32), np.zeros(0, np.int64)
    return np.concatenate(srcs), np.concatenate(docs)


def _check_batch_args(seq_len: int, global_batch_size: int, process_index: int, process_count: int) -> int:
  if seq_len < 2:
    raise ValueError(f"seq_len must be >= 2, got {seq_len}")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"bad process_index {process_index} / process_count {process_count}")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of process_count "
                     f"{process_count}")
  return global_batch_size // process_count


class _Tally:
  """Running packing efficiency over the batches this host has handed out."""

  def __init__(self):
    self.positions = self.tokens = self.loss_tokens = self.padding_blocks = 0

  def add(self, batch: dict[str, np.ndarray]) -> None:
    self.positions += batch["segment_ids"].size
    self.tokens += int((batch["segment_ids"] > 0).sum())
    self.loss_tokens += int(batch["loss_mask"].sum())
    self.padding_blocks += int((batch["segment_ids"].max(axis=1) == 0).sum())

  def as_dict(self) -> dict:
    p = max(self.positions, 1)
    return {"nonpad_fraction": self.tokens / p, "loss_fraction": self.loss_tokens / p,
            "padding_blocks": self.padding_blocks}


class TrainIterator:
  """Endless (or num_epochs long) iterator of this host's train batches; resumable through get_state/set_state.

  Each batch is a dict of [global_batch_size // process_count, seq_len] arrays (see packing.py for the keys).
  """

  def __init__(self, prepared: _Prepared, data_cfg, *, seq_len: int, global_batch_size: int, seed: int,
               process_index: int, process_count: int):
    self.local_batch = _check_batch_args(seq_len, global_batch_size, process_index, process_count)
    self.seq_len, self.global_batch_size, self.seed = seq_len, global_batch_size, seed
    self.process_index, self.process_count = process_index, process_count
    self._split = prepared.train
    self._static_stats = prepared.stats
    self.window = int(data_config.get(data_cfg, "pack_window"))
    if self.window < 1:
      raise ValueError(f"data.pack_window must be >= 1, got {self.window}")
    self.shuffle = bool(data_config.get(data_cfg, "shuffle"))
    self.num_epochs = int(data_config.get(data_cfg, "num_epochs"))
    self.prefetch = int(data_config.get(data_cfg, "prefetch"))
    self._mixture = _Mixture(self._split, seed, self.shuffle)
    self._end = self.num_epochs * self._mixture.epoch_size if self.num_epochs > 0 else None
    self._plan_id = hashlib.sha256(json.dumps(
        [[str(ts.path.name), len(r)] for ts, r in zip(self._split.sources, self._split.rows)] +
        [self._split.weights, self.window, self.shuffle, self.num_epochs, seq_len, seed]).encode()).hexdigest()[:16]
    self._windows: dict[int, list | None] = {}
    self._lock = threading.Lock()
    self._pos = (0, 0)
    self._batches = 0
    self._finished = False
    self._thread: threading.Thread | None = None
    self._queue: queue.Queue | None = None
    self._stop: threading.Event | None = None
    self._tally = _Tally()
    self._steps_per_epoch: int | None = None

  # -- the deterministic stream ------------------------------------------------------------------------------------

  def _window_blocks(self, k: int) -> list | None:
    """Blocks of window k as lists of (source, document), or None past the end of a finite stream."""
    with self._lock:
      if k in self._windows:
        return self._windows[k]
    start, stop = k * self.window, (k + 1) * self.window
    if self._end is not None:
      stop = min(stop, self._end)
    if start >= stop:
      blocks = None
    else:
      src, doc = self._mixture.stream(start, stop)
      lengths = np.empty(len(src), np.int64)
      for i in range(len(self._split.rows)):
        sel = src == i
        lengths[sel] = self._split.lengths(i)[doc[sel]]
      bins = packing.best_fit_decreasing(lengths, self.seq_len)
      if self.shuffle:  # best-fit opens bins longest-first; do not let that order reach the batches
        bins = [bins[j] for j in np.random.default_rng([self.seed, 3, k]).permutation(len(bins))]
      blocks = [[(int(src[i]), int(doc[i])) for i in b] for b in bins]
    with self._lock:
      while len(self._windows) >= 3:
        self._windows.pop(min(self._windows))
      self._windows[k] = blocks
    return blocks

  def _produce(self, pos: tuple[int, int]):
    """The batch at stream position pos: (batch, next position, epoch), or None at the end."""
    k, j = pos
    chosen = []
    while len(chosen) < self.global_batch_size:
      blocks = self._window_blocks(k)
      if blocks is None:
        break
      take = blocks[j:j + self.global_batch_size - len(chosen)]
      chosen += take
      j += len(take)
      if j >= len(blocks):
        k, j = k + 1, 0
    if not chosen:
      return None
    mine = chosen[self.process_index * self.local_batch:(self.process_index + 1) * self.local_batch]
    batch = packing.assemble([[self._split.doc(s, d) for s, d in block] for block in mine], self.seq_len,
                             self.local_batch)
    return batch, (k, j), (k * self.window) // self._mixture.epoch_size

  # -- iteration with a prefetch thread -------------------------------------------------------------------------------

  @staticmethod
  def _worker(ref: "weakref.ref", pos, q: queue.Queue, stop: threading.Event) -> None:
    # Holds the iterator only weakly, so an iterator dropped without close() is collected and its thread ends.
    try:
      while not stop.is_set():
        it = ref()
        if it is None:
          return
        item = it._produce(pos)
        del it
        while not stop.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if item is None:
          return
        pos = item[1]
    except BaseException as e:  # handed to the consumer, which re-raises it
      q.put(e)

  def _stop_worker(self) -> None:
    thread = self._thread
    if thread is not None:
      self._stop.set()
      if thread is not threading.current_thread():
        thread.join()
    self._thread = self._queue = self._stop = None

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._finished:
      raise StopIteration
    if self.prefetch <= 0:
      item = self._produce(self._pos)
    else:
      if self._thread is None:
        self._queue, self._stop = queue.Queue(maxsize=self.prefetch), threading.Event()
        self._thread = threading.Thread(target=self._worker, args=(weakref.ref(self), self._pos, self._queue,
                                                                   self._stop),
                                        name="numina-data-prefetch", daemon=True)
        self._thread.start()
      item = self._queue.get()
      if isinstance(item, BaseException):
        self._stop_worker()
        raise item
    if item is None:
      self._finished = True
      self._stop_worker()
      raise StopIteration
    batch, self._pos, _ = item
    self._batches += 1
    self._tally.add(batch)
    return batch

  def close(self) -> None:
    self._stop_worker()

  def __del__(self):
    try:
      self._stop_worker()
    except Exception:
      pass

  # -- state ------------------------------------------------------------------------------------------------------------

  @property
  def epoch(self) -> int:
    """The epoch of the train set that the next batch starts in (0-based)."""
    return (self._pos[0] * self.window) // self._mixture.epoch_size

  @property
  def steps_per_epoch(self) -> int:
    """Full global batches in one epoch of the train set (from packing epoch 0's documents, window by window)."""
    if self._steps_per_epoch is None:
      n, blocks = self._mixture.epoch_size, 0
      src, doc = self._mixture.epoch(0)
      lengths = np.empty(n, np.int64)
      for i in range(len(self._split.rows)):
        lengths[src == i] = self._split.lengths(i)[doc[src == i]]
      for start in range(0, n, self.window):
        blocks += len(packing.best_fit_decreasing(lengths[start:start + self.window], self.seq_len))
      self._steps_per_epoch = blocks // self.global_batch_size
    return self._steps_per_epoch

  @property
  def epoch_size(self) -> int:
    """Documents per epoch of the (mixed) train set."""
    return self._mixture.epoch_size

  def get_state(self) -> dict:
    """A small JSON-serializable dict: where the stream stands after the last batch handed out."""
    return {"version": STATE_VERSION, "window": self._pos[0], "block": self._pos[1], "batches": self._batches,
            "finished": self._finished, "epoch": self.epoch, "seed": self.seed, "seq_len": self.seq_len,
            "plan": self._plan_id}

  def set_state(self, state: dict) -> None:
    """Resumes at a state from get_state(); the next batches are exactly those that followed it."""
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"data iterator state version {state.get('version')!r}, expected {STATE_VERSION}")
    for key, mine in (("seed", self.seed), ("seq_len", self.seq_len), ("plan", self._plan_id)):
      if state.get(key) != mine:
        raise ValueError(f"data iterator state was saved with {key}={state.get(key)!r}, this run has {mine!r}: "
                         f"the data, its config or the tokenizer changed, so the stream cannot be resumed exactly")
    self._stop_worker()
    self._pos = (int(state["window"]), int(state["block"]))
    self._batches = int(state["batches"])
    self._finished = bool(state.get("finished", False))

  @property
  def stats(self) -> dict:
    s = dict(self._static_stats)
    s.update(split="train", overlong_docs=sum(self._split.overlong), epoch_docs=self._mixture.epoch_size,
             epoch_quotas={ts.name: int(q) for ts, q in zip(self._split.sources, self._mixture.quotas)},
             epoch=self.epoch, batches=self._batches, packing=self._tally.as_dict())
    return s


class EvalBatches:
  """The held-out split as a finite, deterministic sequence of this host's batches (re-iterable).

  Documents go in source and row order, packed best-fit-decreasing per window; the last batch is padded with
  empty blocks (segment_ids 0, loss_mask 0) so every batch has the same shape.
  """

  def __init__(self, prepared: _Prepared, data_cfg, *, seq_len: int, global_batch_size: int, process_index: int,
               process_count: int):
    self.local_batch = _check_batch_args(seq_len, global_batch_size, process_index, process_count)
    self.seq_len, self.global_batch_size = seq_len, global_batch_size
    self.process_index = process_index
    self._split = prepared.eval
    window = int(data_config.get(data_cfg, "pack_window"))
    refs = [(i, k) for i, rows in enumerate(self._split.rows) for k in range(len(rows))]
    lengths = np.array([self._split.lengths(i)[k] for i, k in refs], np.int64)
    self._blocks = []
    for start in range(0, len(refs), window):
      for b in packing.best_fit_decreasing(lengths[start:start + window], seq_len):
        self._blocks.append([refs[start + i] for i in b])
    self._static_stats = prepared.stats
    self.num_docs = len(refs)

  def __len__(self) -> int:
    return math.ceil(len(self._blocks) / self.global_batch_size)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    for b in range(len(self)):
      chosen = self._blocks[b * self.global_batch_size:(b + 1) * self.global_batch_size]
      mine = chosen[self.process_index * self.local_batch:(self.process_index + 1) * self.local_batch]
      yield packing.assemble([[self._split.doc(s, d) for s, d in block] for block in mine], self.seq_len,
                             self.local_batch)

  @property
  def stats(self) -> dict:
    s = dict(self._static_stats)
    positions = max(len(self) * self.global_batch_size * self.seq_len, 1)
    tokens = sum(int(self._split.lengths(i).sum()) for i in range(len(self._split.rows)))
    s.update(split="eval", docs=self.num_docs, overlong_docs=sum(self._split.overlong), batches=len(self),
             blocks=len(self._blocks), packing={"nonpad_fraction": tokens / positions})
    return s


def make_pipeline(data_cfg, tokenizer, *, seq_len: int, global_batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1, split: str = "train"):
  """The train iterator (split="train") or the eval batches (split="eval") of this host.

  Tokenizes the sources into the cache on first use. See TrainIterator and EvalBatches.
  """
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  _check_batch_args(seq_len, global_batch_size, process_index, process_count)
  prepared = _prepare(data_cfg, tokenizer, seq_len)
  if split == "train":
    return TrainIterator(prepared, data_cfg, seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
                         process_index=process_index, process_count=process_count)
  return EvalBatches(prepared, data_cfg, seq_len=seq_len, global_batch_size=global_batch_size,
                     process_index=process_index, process_count=process_count)
