"""The input pipeline on grain: sources -> per-shard token cache -> per-row-slot mixture epochs -> packed blocks.

Design. Row r of every global batch of B rows is a row slot with a stream of its own: the documents of shard r of
every source (rows dealt to B shards by a permutation seeded by the source's name and size; see tokenized.py), in a
per-epoch shuffle of each source's quota, packed best-fit window by window. Row r of the batch at step s is the
s-th block of slot r's stream. Host p of P owns slots [p*B/P, (p+1)*B/P) and reads, tokenizes and caches only those
shards, on its own disk. So the global batch is the same for any host count by construction, and the iterator
state is just the step, which grain's checkpointable iterator keeps: a `grain.MapDataset` over this host's (step,
slot) rows, `.batch(B/P)`, `to_iter_dataset` with a prefetch thread; its state {"next_index": step} is the same on
every host, so process 0's copy restores on any host count (the streams replay packing from lengths to get there).
grain's own ElasticIterator does not fit: its hosts take interleaved elements of one global dataset, so each host
would need every element (all the tokens) and a host's rows of the batch would depend on the host count.
What needs all shards is agreed once at start through `allgather` (row and skip counts, per-slot document counts
for the mixture quotas, blocks per epoch, the end of a finite stream, eval batches); a failure on one host raises
on every host. Kept by hand: best-fit packing (packing.py) and the mixture (grain's mix draws element by element,
not a quota per epoch). Held-out eval rows are drawn among a source's rows before filtering (data.eval_size counts
rows read, not rows kept), so no host needs another's filter results. Costs: slot streams differ in length by a
few blocks, so a finite stream (data.stream_epochs > 0) ends with some padded rows; a document packs only with others
of its shard; a new global_batch_size re-shards (re-tokenizes) and cannot resume a run exactly.
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
import hashlib
import json
import logging
import sys
import threading
from typing import Callable, Iterator

import numpy as np

from numina_jax.data import config as data_config
from numina_jax.data import packing
from numina_jax.data.harmony.options import RenderOptions
from numina_jax.data.sources import SourceSpec, eval_source_spec, open_source, source_specs
from numina_jax.data.tokenized import TokenizedSource, config_key, default_cache_dir, stable_int, tokenize_shards

STATE_VERSION = 2
log = logging.getLogger(__name__)
Allgather = Callable[[np.ndarray], np.ndarray]


class _Hosts:
  """This process among `count` hosts, and the one collective they share: an allgather."""

  def __init__(self, index: int, count: int, allgather: Allgather | None):
    if allgather is None:
      if count > 1:
        raise ValueError(f"process_count {count} > 1 needs an allgather callable (for example "
                         f"jax.experimental.multihost_utils.process_allgather)")
      allgather = lambda x: np.asarray(x)[None]  # noqa: E731
    self.index, self.count, self._allgather = index, count, allgather

  def allgather(self, x: np.ndarray) -> np.ndarray:
    out = np.asarray(self._allgather(x))
    if out.shape != (self.count, *x.shape):
      raise ValueError(f"allgather returned shape {out.shape} for a value of shape {x.shape} on {self.count} "
                       f"processes; it must stack every process's value on a new first axis, in process order")
    return out

  def exchange(self, obj) -> list:
    """Every process's JSON-serializable `obj`, in process order."""
    data = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
    sizes = self.allgather(np.array([len(data)], np.int32))[:, 0]
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:len(data)] = data
    out = self.allgather(buf)
    return [json.loads(out[p, :sizes[p]].tobytes()) for p in range(self.count)]

  def agree(self, fn: Callable[[], tuple]) -> tuple:
    """Runs fn() -> (local result, JSON info) here and exchanges the infos; a failure on any process raises on every
    process (none is left waiting in a collective). Returns (local result, [info of every process])."""
    try:
      local, info = fn()
      error = None
    except Exception as e:  # re-raised below, after the others have heard of it
      local, info, error = None, None, e
    infos = self.exchange({"error": None if error is None else f"{type(error).__name__}: {error}", "info": info})
    if error is not None:
      raise error
    for p, x in enumerate(infos):
      if x["error"] is not None:
        raise RuntimeError(f"process {p} of {self.count} failed while preparing the data: {x['error']}")
    return local, [x["info"] for x in infos]


def _check_batch_args(seq_len: int, global_batch_size: int, process_index: int, process_count: int) -> int:
  if seq_len < 2:
    raise ValueError(f"seq_len must be >= 2, got {seq_len}")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"bad process_index {process_index} / process_count {process_count}")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of process_count "
                     f"{process_count}")
  return global_batch_size // process_count


def _largest_remainder(total: int, shares: np.ndarray) -> np.ndarray:
  """Integers summing to `total` in proportion to `shares` (ties to the earlier entry)."""
  shares = np.asarray(shares, np.float64)
  if total == 0 or shares.sum() == 0:
    return np.zeros(len(shares), np.int64)
  exact = total * shares / shares.sum()
  out = np.floor(exact).astype(np.int64)
  for i in np.argsort(-(exact - out), kind="stable")[:total - int(out.sum())]:
    out[i] += 1
  return out


def _held_out_counts(sizes: list[int], eval_size: float) -> np.ndarray:
  """Rows held out per source: a fraction of each, or a count spread in proportion to source sizes."""
  sizes = np.asarray(sizes, np.int64)
  if eval_size <= 0 or sizes.sum() == 0:
    return np.zeros(len(sizes), np.int64)
  if eval_size < 1:
    return np.rint(sizes * eval_size).astype(np.int64)
  return _largest_remainder(min(int(eval_size), int(sizes.sum())), sizes)


def _held_out(name: str, num_rows: int, count: int, eval_seed: int) -> np.ndarray:
  """Bool mask of the held-out rows of a source, chosen before any filter from its name and size alone, so the
  eval set is the same on every host and stays put when the mixture, the shuffle seed or the batch size change."""
  perm = np.random.default_rng([eval_seed, stable_int(name, num_rows)]).permutation(num_rows)
  return perm < count


def held_out_rows(data_cfg) -> list[tuple[SourceSpec, np.ndarray]]:
  """The held-out eval rows of every train source (row indices in file order), as the pipeline holds them out: for
  evaluating on problems the run never trained on. With data.eval_dataset_name there are none (that source is the
  eval set)."""
  if eval_source_spec(data_cfg) is not None:
    return []
  specs = source_specs(data_cfg)
  opened = [open_source(spec) for spec in specs]
  sizes = [src.num_rows for src in opened]
  counts = _held_out_counts(sizes, float(data_config.get(data_cfg, "eval_size")))
  eval_seed = int(data_config.get(data_cfg, "eval_seed"))
  return [(spec, np.flatnonzero(_held_out(src.name, n, int(c), eval_seed)))
          for spec, src, n, c in zip(specs, opened, sizes, counts)]


# -- preparing: this host's shards, then the global counts -------------------------------------------------------------


@dataclasses.dataclass
class _Source:
  """One source as this host sees it: its shards by row slot, and in each the train and eval documents (local row
  indices of the shard, kept, not overlong)."""

  label: str
  name: str
  role: str  # "train" (a mixture source, also held out from) or "eval" (data.eval_dataset_name)
  weight: float
  key: str  # config_key: rendering, filters, tokenizer
  shards: dict[int, TokenizedSource]
  train: dict[int, np.ndarray]
  eval: dict[int, np.ndarray]


def _labels(names: list[str]) -> list[str]:
  """Unique names for the stats: a name seen again gets #2, #3..."""
  seen: collections.Counter = collections.Counter()
  out = []
  for name in names:
    seen[name] += 1
    out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
  return out


def _prepare_local(data_cfg, tokenizer, seq_len: int, num_slots: int, slots: range) -> tuple[list[_Source], list]:
  specs = source_specs(data_cfg)
  eval_spec = eval_source_spec(data_cfg)
  entries = [(s, s.weight, "train") for s in specs] + ([(eval_spec, 0.0, "eval")] if eval_spec else [])
  opened = [open_source(spec) for spec, _, _ in entries]
  shards = [tokenize_shards(spec, src, tokenizer, data_cfg, num_shards=num_slots, shards=slots)
            for (spec, _, _), src in zip(entries, opened)]
  num_rows = [ts[0].source_rows for ts in shards]
  held_out = None
  if eval_spec is None:
    counts = _held_out_counts(num_rows, float(data_config.get(data_cfg, "eval_size")))
    eval_seed = int(data_config.get(data_cfg, "eval_seed"))
    held_out = [_held_out(src.name, n, int(c), eval_seed) for src, n, c in zip(opened, num_rows, counts)]
  labels = _labels([src.name for src in opened])
  sources, info = [], []
  for i, ((spec, weight, role), src, tss) in enumerate(zip(entries, opened, shards)):
    source = _Source(labels[i], src.name, role, weight, config_key(spec, tokenizer, data_cfg), {}, {}, {})
    per_slot = {}
    for r, ts in zip(slots, tss):
      kept = ts.kept_rows()
      if role == "eval":
        is_eval = np.ones(len(kept), bool)
      elif held_out is None:
        is_eval = np.zeros(len(kept), bool)
      else:
        is_eval = held_out[i][ts.rows[kept]]
      lengths = ts.lengths[kept]
      over = lengths > seq_len
      source.shards[r] = ts
      source.train[r] = kept[~is_eval & ~over]
      source.eval[r] = kept[is_eval & ~over]
      first = {}
      for split, sel in (("train", ~is_eval & over), ("eval", is_eval & over)):
        k = np.flatnonzero(sel)
        first[split] = [int(ts.rows[kept[k[0]]]), int(lengths[k[0]])] if len(k) else None
      counts = ts.meta["counts"]
      per_slot[str(r)] = {
          "rows": ts.num_rows, "kept": int(len(kept)), "counts": counts, "errors": ts.meta["errors"][:5],
          "train_docs": int(len(source.train[r])), "eval_docs": int(len(source.eval[r])),
          "train_tokens": int(ts.lengths[source.train[r]].sum()), "eval_tokens": int(ts.lengths[source.eval[r]].sum()),
          "train_overlong": int((~is_eval & over).sum()), "eval_overlong": int((is_eval & over).sum()),
          "first_overlong": first}
    sources.append(source)
    info.append({"source_rows": num_rows[i], "slots": per_slot})
  return sources, info


@dataclasses.dataclass
class _Prepared:
  """This host's sources and the agreed global picture: per-slot document counts and the start-up statistics."""

  sources: list[_Source]
  slots: range
  num_slots: int
  train_docs: np.ndarray  # [sources, slots] train documents per source and row slot, all slots
  eval_docs: np.ndarray
  eval_tokens: int
  plan: list  # what the streams depend on, the same on every host
  stats: dict


def _prepare(data_cfg, tokenizer, seq_len: int, num_slots: int, hosts: _Hosts) -> _Prepared:
  policy = data_config.get(data_cfg, "overlong")
  per_host = num_slots // hosts.count
  slots = range(hosts.index * per_host, (hosts.index + 1) * per_host)
  sources, infos = hosts.agree(lambda: _prepare_local(data_cfg, tokenizer, seq_len, num_slots, slots))
  stats_sources: dict[str, dict] = {}
  tables = {k: np.zeros((len(sources), num_slots), np.int64) for k in ("train_docs", "eval_docs", "train_tokens",
                                                                         "eval_tokens")}
  first_overlong: dict = {"train": None, "eval": None}
  source_rows = []
  for i, src in enumerate(sources):
    sizes = {info[i]["source_rows"] for info in infos}
    source_rows.append(sizes.pop())
    if sizes:
      raise ValueError(f"{src.name}: the hosts see different row counts {[info[i]['source_rows'] for info in infos]}"
                       f" (process order); every host must read the same data")
    slot_infos = {int(r): x for info in infos for r, x in info[i]["slots"].items()}
    assert sorted(slot_infos) == list(range(num_slots)), sorted(slot_infos)
    s = {"rows": 0, "kept": 0, "skipped": collections.Counter(), "tir_rows": 0, "no_boxed_rows": 0, "errors": [],
         "train_docs": 0, "train_overlong_docs": 0, "eval_docs": 0, "eval_overlong_docs": 0}
    for r, x in sorted(slot_infos.items()):
      for k in tables:
        tables[k][i, r] = x[k]
      s["rows"] += x["rows"]
      s["kept"] += x["kept"]
      s["skipped"].update({k: v for k, v in x["counts"].items() if k.startswith(("bad_row:", "filtered:"))})
      s["tir_rows"] += x["counts"].get("tir_rows", 0)
      s["no_boxed_rows"] += x["counts"].get("no_boxed_rows", 0)
      s["errors"] += x["errors"]
      for split in ("train", "eval"):
        s[f"{split}_docs"] += x[f"{split}_docs"]
        s[f"{split}_overlong_docs"] += x[f"{split}_overlong"]
        row_len = x["first_overlong"][split]
        if row_len is not None and (first_overlong[split] is None or (i, row_len[0]) < first_overlong[split][:2]):
          first_overlong[split] = (i, *row_len)
    s["skipped"] = dict(sorted(s["skipped"].items()))
    s["errors"] = [msg for _, msg in sorted(s["errors"])[:5]]
    stats_sources[src.label] = s
  if policy == "error":
    for split in ("train", "eval"):
      if first_overlong[split] is not None:
        i, row, length = first_overlong[split]
        n = stats_sources[sources[i].label][f"{split}_overlong_docs"]
        raise ValueError(f"{sources[i].name}: row {row} renders to {length} tokens, more than seq_len {seq_len} "
                         f"({n} such rows in the {split} split); raise seq_len or set data.overlong='skip'")
  skipped: collections.Counter = collections.Counter()
  for s in stats_sources.values():
    skipped.update(s["skipped"])
  stats = {"sources": stats_sources, "rows_read": sum(s["rows"] for s in stats_sources.values()),
           "rows_skipped": dict(sorted(skipped.items())),
           "overlong_docs_by_split": {split: sum(s[f"{split}_overlong_docs"] for s in stats_sources.values())
                                      for split in ("train", "eval")},
           "hosts": hosts.count, "row_slots": num_slots,
           "cache_dir": str(data_config.get(data_cfg, "cache_dir") or default_cache_dir())}
  plan = [[s.label, s.key, s.weight, n] for s, n in zip(sources, source_rows)] + [
      tables["train_docs"].tolist(), tables["train_tokens"].tolist(), seq_len, num_slots]
  return _Prepared(sources, slots, num_slots, tables["train_docs"], tables["eval_docs"],
                   int(tables["eval_tokens"].sum()), plan, stats)


def _log_stats(stats: dict) -> None:
  """The start-up lines: rows read, skipped by reason, overlong, documents per split, per source."""
  over = stats["overlong_docs_by_split"]
  log.info("data: %d rows read on %d hosts, %d skipped %s, overlong %d train / %d eval", stats["rows_read"],
           stats["hosts"], sum(stats["rows_skipped"].values()), stats["rows_skipped"], over["train"], over["eval"])
  for label, s in stats["sources"].items():
    log.info("data: %s: %d rows, %d kept, skipped %s; train %d docs (+%d overlong), eval %d docs (+%d overlong)",
             label, s["rows"], s["kept"], s["skipped"], s["train_docs"], s["train_overlong_docs"], s["eval_docs"],
             s["eval_overlong_docs"])
    for msg in s["errors"]:
      log.info("data:   skipped %s", msg)


# -- the train streams -------------------------------------------------------------------------------------------------


def _slot_quotas(train_docs: np.ndarray, weights: list[float]) -> np.ndarray:
  """[sources, slots] documents per epoch: each source's share of the epoch by weight (all its documents when it is
  the only source), spread over the slots in proportion to the documents each slot holds."""
  sizes = train_docs.sum(axis=1)
  if len(sizes) == 1:
    return train_docs.copy()
  totals = _largest_remainder(int(sizes.sum()), np.asarray(weights, np.float64))
  return np.stack([_largest_remainder(int(t), n) for t, n in zip(totals, train_docs)])


class _SlotStream:
  """Row slot r's blocks: epoch after epoch of its documents, each epoch a seeded shuffle of every source's quota,
  packed best-fit-decreasing `window` documents at a time; random access by block index (thread-safe)."""

  _KEEP_EPOCHS = 3

  def __init__(self, r: int, sources: list[_Source], quotas: list[int], *, seed: int, seq_len: int, window: int,
               shuffle: bool, num_epochs: int):
    self.r, self.seed, self.seq_len, self.window, self.shuffle = r, seed, seq_len, window, shuffle
    self.num_epochs = num_epochs
    self._shards = [s.shards[r] for s in sources]
    self._docs = [s.train[r] for s in sources]
    self._lengths = [ts.lengths[d] for ts, d in zip(self._shards, self._docs)]
    self.quotas = [int(q) for q in quotas]
    self.epoch_size = sum(self.quotas)
    self._packed: collections.OrderedDict = collections.OrderedDict()
    self._starts = [0]  # blocks before epoch e, for the epochs packed so far
    self._lock = threading.Lock()

  def _pass(self, i: int, cycle: int) -> np.ndarray:
    n = len(self._docs[i])
    if not self.shuffle:
      return np.arange(n)
    return np.random.default_rng([self.seed, 1, self.r, i, cycle]).permutation(n)

  def _epoch_docs(self, e: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, document) of each position of epoch e: source i's quota q drawn from its endless sequence of
    reshuffled passes, so an up-weighted source repeats rows and a down-weighted one shows new rows each epoch."""
    srcs, docs = [], []
    for i, q in enumerate(self.quotas):
      n = len(self._docs[i])
      pos = np.arange(e * q, (e + 1) * q, dtype=np.int64)
      idx = np.empty(q, np.int64)
      for cycle in (np.unique(pos // n) if q else []):
        sel = pos // n == cycle
        idx[sel] = self._pass(i, int(cycle))[pos[sel] % n]
      srcs.append(np.full(q, i, np.int32))
      docs.append(idx)
    src, doc = np.concatenate(srcs), np.concatenate(docs)
    if self.shuffle:
      order = np.random.default_rng([self.seed, 2, self.r, e]).permutation(len(src))
      src, doc = src[order], doc[order]
    return src, doc

  def _pack(self, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Epoch e in block order: (source, document, block bounds, tokens)."""
    src, doc = self._epoch_docs(e)
    lengths = np.empty(len(src), np.int64)
    for i in range(len(self._docs)):
      lengths[src == i] = self._lengths[i][doc[src == i]]
    order: list[int] = []
    sizes: list[int] = []
    for w, start in enumerate(range(0, len(src), self.window)):
      bins = packing.best_fit_decreasing(lengths[start:start + self.window], self.seq_len)
      if self.shuffle:  # best-fit opens bins longest-first; do not let that order reach the batches
        bins = [bins[j] for j in np.random.default_rng([self.seed, 3, self.r, e, w]).permutation(len(bins))]
      for b in bins:
        order += [start + i for i in b]
        sizes.append(len(b))
    order_arr = np.asarray(order, np.int64)
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return src[order_arr], doc[order_arr], bounds, int(lengths.sum())

  def _epoch(self, e: int):
    # Called with the lock held.
    if e in self._packed:
      self._packed.move_to_end(e)
      return self._packed[e]
    packed = self._pack(e)
    if e == len(self._starts) - 1:
      self._starts.append(self._starts[-1] + len(packed[2]) - 1)
    self._packed[e] = packed
    while len(self._packed) > self._KEEP_EPOCHS:
      self._packed.popitem(last=False)
    return packed

  def epoch_stats(self, e: int) -> tuple[int, int]:
    """(blocks, tokens) of epoch e."""
    with self._lock:
      _, _, bounds, tokens = self._epoch(e)
      return len(bounds) - 1, tokens

  def total_blocks(self) -> int | None:
    """Blocks in the whole stream, or None when it is endless."""
    if not self.num_epochs:
      return None
    with self._lock:
      while len(self._starts) <= self.num_epochs:
        self._epoch(len(self._starts) - 1)
      return self._starts[self.num_epochs]

  def block(self, j: int) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """The documents of block j, or None past the end of a finite stream."""
    with self._lock:
      while self._starts[-1] <= j:
        if self.num_epochs and len(self._starts) > self.num_epochs:
          return None
        self._epoch(len(self._starts) - 1)
      e = bisect.bisect_right(self._starts, j) - 1
      src, doc, bounds, _ = self._epoch(e)
      k = j - self._starts[e]
      picks = list(zip(src[bounds[k]:bounds[k + 1]].tolist(), doc[bounds[k]:bounds[k + 1]].tolist()))
    return [self._shards[i].doc(int(self._docs[i][d])) for i, d in picks]


def _row(docs: list | None, seq_len: int) -> dict[str, np.ndarray]:
  """One packed row (an empty one for None)."""
  batch = packing.assemble([docs] if docs else [], seq_len, 1)
  return {k: v[0] for k, v in batch.items()}


class _Rows:
  """A grain data source over this host's rows: element k is local row k % L of the batch at step k // L."""

  def __init__(self, get: Callable[[int, int], dict], num_steps: int | None, rows_per_step: int):
    self._get, self._rows = get, rows_per_step
    steps = num_steps if num_steps is not None else sys.maxsize // 2 // rows_per_step  # endless: as good as
    self._len = steps * rows_per_step

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, k: int) -> dict[str, np.ndarray]:
    step, j = divmod(int(k), self._rows)
    return self._get(step, j)


def _grain_dataset(rows: _Rows, rows_per_step: int):
  # grain pulls in jax and orbax: imported only when a pipeline is built, so the data tools stay light.
  import grain
  return grain.MapDataset.source(rows).batch(rows_per_step)


def _read_options(prefetch: int):
  import grain  # heavy, as in _grain_dataset
  # One thread is plenty: assembling a batch is copies of memory-mapped tokens.
  return grain.ReadOptions(num_threads=1 if prefetch > 0 else 0, prefetch_buffer_size=prefetch)


class _Tally:
  """Running packing efficiency over the batches this host has handed out."""

  def __init__(self):
    self.counts: collections.Counter = collections.Counter()

  def add(self, batch: dict[str, np.ndarray]) -> None:
    self.counts.update(packing.batch_counts(batch))

  def as_dict(self) -> dict:
    p = max(self.counts["positions"], 1)
    return {"nonpad_fraction": self.counts["tokens"] / p, "loss_fraction": self.counts["loss_tokens"] / p,
            "padding_blocks": self.counts["padding_blocks"]}


class TrainIterator:
  """Endless (or data.stream_epochs long) iterator of this host's train batches; resumable through get_state/set_state,
  on any host count. Each batch is a dict of [global_batch_size // process_count, seq_len] arrays (packing.py)."""

  def __init__(self, prepared: _Prepared, data_cfg, *, seq_len: int, global_batch_size: int, seed: int,
               hosts: _Hosts):
    self.local_batch = _check_batch_args(seq_len, global_batch_size, hosts.index, hosts.count)
    self.seq_len, self.global_batch_size, self.seed = seq_len, global_batch_size, seed
    self.window = int(data_config.get(data_cfg, "pack_window"))
    self.shuffle = bool(data_config.get(data_cfg, "shuffle"))
    self.num_epochs = int(data_config.get(data_cfg, "stream_epochs"))
    self.prefetch = int(data_config.get(data_cfg, "prefetch"))
    self._sources = [s for s in prepared.sources if s.role == "train"]  # first in the list
    weights = [s.weight for s in self._sources]
    docs = prepared.train_docs[:len(self._sources)]
    for s, n in zip(self._sources, docs.sum(axis=1)):
      if s.weight > 0 and n == 0:
        raise ValueError(f"{s.label}: no documents left for training (all rows skipped, held out or overlong)")
    self._quotas = _slot_quotas(docs, weights)
    empty = np.flatnonzero(self._quotas.sum(axis=0) == 0)
    if len(empty):
      raise ValueError(f"row slot {int(empty[0])} of the global batch gets no training documents ({len(empty)} of "
                       f"{global_batch_size} slots are empty; the train split has {int(docs.sum())} documents): "
                       f"lower global_batch_size")
    self._streams = [_SlotStream(r, self._sources, self._quotas[:, r], seed=seed, seq_len=seq_len, window=self.window,
                                 shuffle=self.shuffle, num_epochs=self.num_epochs) for r in prepared.slots]
    # Blocks per epoch and the end of a finite stream need every slot: agreed once.
    mine = {str(s.r): [*s.epoch_stats(0), s.total_blocks()] for s in self._streams}
    every = {int(r): v for d in hosts.exchange(mine) for r, v in d.items()}
    self._epoch_blocks = sum(v[0] for v in every.values())
    self._epoch_tokens = sum(v[1] for v in every.values())
    self._steps_per_epoch = self._epoch_blocks // global_batch_size
    totals = [v[2] for v in every.values()]
    self._num_steps = max(totals) if self.num_epochs else None
    self._slot_blocks = {"min": min(totals), "max": max(totals), "total": sum(totals)} if self.num_epochs else None
    plan = prepared.plan + [global_batch_size, seed, self.window, self.shuffle, self.num_epochs]
    self._plan_id = hashlib.sha256(json.dumps(plan).encode()).hexdigest()[:16]
    self._static_stats = prepared.stats
    self._tally = _Tally()
    streams = self._streams
    rows = _Rows(lambda step, j: _row(streams[j].block(step), seq_len), self._num_steps, self.local_batch)
    self._dataset = _grain_dataset(rows, self.local_batch)
    self._it = self._dataset.to_iter_dataset(_read_options(self.prefetch)).__iter__()

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    self._tally.add(batch)
    return batch

  def close(self) -> None:
    """Stops the prefetch thread."""
    self._it.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # -- state -----------------------------------------------------------------------------------------------------------

  @property
  def _step(self) -> int:
    return int(self._it.get_state()["next_index"])

  @property
  def epoch(self) -> int:
    """The nominal epoch of the next batch: steps // steps_per_epoch (capped at data.stream_epochs); each row slot
    crosses its own epoch boundaries within a few steps of that."""
    e = self._step // self._steps_per_epoch if self._steps_per_epoch else 0
    return min(e, self.num_epochs) if self.num_epochs else e

  @property
  def steps_per_epoch(self) -> int:
    """Full global batches in one epoch of the train set: all slots' epoch-0 blocks // global_batch_size."""
    return self._steps_per_epoch

  @property
  def epoch_size(self) -> int:
    """Documents per epoch of the (mixed) train set."""
    return int(self._quotas.sum())

  def get_state(self) -> dict:
    """A small JSON-serializable dict, the same on every host: grain's iterator state (the step) and what the stream
    depends on. Any host count restores it."""
    g = self._it.get_state()
    step = int(g["next_index"])
    return {"version": STATE_VERSION, "grain": dict(g), "batches": step,
            "finished": self._num_steps is not None and step >= self._num_steps, "epoch": self.epoch,
            "seed": self.seed, "seq_len": self.seq_len, "global_batch_size": self.global_batch_size,
            "plan": self._plan_id}

  def set_state(self, state: dict) -> None:
    """Resumes at a state from get_state() (of any host, any host count); the next batches are exactly those that
    followed it."""
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"data iterator state version {state.get('version')!r}, expected {STATE_VERSION}: it was saved "
                       f"by another input pipeline, so the stream cannot be resumed exactly")
    for key, mine in (("seed", self.seed), ("seq_len", self.seq_len), ("global_batch_size", self.global_batch_size),
                      ("plan", self._plan_id)):
      if state.get(key) != mine:
        raise ValueError(f"data iterator state was saved with {key}={state.get(key)!r}, this run has {mine!r}: "
                         f"the data, its config or the tokenizer changed, so the stream cannot be resumed exactly")
    try:
      self._it.set_state(dict(state["grain"]))
    except IndexError as e:
      raise ValueError(f"data iterator state {state['grain']} is past the end of this stream: {e}") from None

  @property
  def stats(self) -> dict:
    """The global start-up counts, the epoch's shape, and the packing of the batches this host handed out."""
    s = dict(self._static_stats)
    s.update(split="train", overlong_docs=s["overlong_docs_by_split"]["train"], epoch_docs=self.epoch_size,
             epoch_quotas={src.label: int(q) for src, q in zip(self._sources, self._quotas.sum(axis=1))},
             epoch=self.epoch, batches=self._step, steps_per_epoch=self._steps_per_epoch,
             epoch_blocks=self._epoch_blocks,
             epoch_nonpad_fraction=self._epoch_tokens / max(self._epoch_blocks * self.seq_len, 1),
             packing=self._tally.as_dict())
    if self._num_steps is not None:
      s.update(num_steps=self._num_steps, slot_blocks=self._slot_blocks)
    return s


# -- eval ------------------------------------------------------------------------------------------------------------


class EvalBatches:
  """The held-out split as a finite, deterministic sequence of this host's batches (re-iterable); len() is the same
  on every host. Row slot r holds shard r's eval documents in source and row order, packed best-fit-decreasing per
  window; batches past the end of a slot's blocks get empty rows there (segment_ids 0, loss_mask 0)."""

  def __init__(self, prepared: _Prepared, data_cfg, *, seq_len: int, global_batch_size: int, hosts: _Hosts):
    self.local_batch = _check_batch_args(seq_len, global_batch_size, hosts.index, hosts.count)
    self.seq_len, self.global_batch_size = seq_len, global_batch_size
    self.prefetch = int(data_config.get(data_cfg, "prefetch"))
    window = int(data_config.get(data_cfg, "pack_window"))
    self._blocks = []
    for r in prepared.slots:
      refs = [(s.shards[r], int(k)) for s in prepared.sources for k in s.eval[r]]
      lengths = np.array([ts.lengths[k] for ts, k in refs], np.int64)
      blocks = []
      for start in range(0, len(refs), window):
        for b in packing.best_fit_decreasing(lengths[start:start + window], seq_len):
          blocks.append([refs[start + i] for i in b])
      self._blocks.append(blocks)
    counts = [n for d in hosts.exchange([len(b) for b in self._blocks]) for n in d]
    self._num_batches = max(counts, default=0)
    self._num_blocks = sum(counts)
    self._tokens = prepared.eval_tokens
    self.num_docs = int(prepared.eval_docs.sum())
    self._static_stats = prepared.stats
    blocks = self._blocks
    self._dataset = _grain_dataset(_Rows(
        lambda b, j: _row([ts.doc(k) for ts, k in blocks[j][b]] if b < len(blocks[j]) else None, seq_len),
        self._num_batches, self.local_batch), self.local_batch)

  def __len__(self) -> int:
    return self._num_batches

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return iter(self._dataset.to_iter_dataset(_read_options(self.prefetch)))

  @property
  def stats(self) -> dict:
    s = dict(self._static_stats)
    positions = max(len(self) * self.global_batch_size * self.seq_len, 1)
    s.update(split="eval", docs=self.num_docs, overlong_docs=s["overlong_docs_by_split"]["eval"], batches=len(self),
             blocks=self._num_blocks, packing={"nonpad_fraction": self._tokens / positions})
    return s


def validate_data_config(data_cfg) -> None:
  """Raises ValueError naming the first bad data field; run at start-up and by make_pipeline, before any read."""

  def need(ok: bool, field: str, message: str):
    if not ok:
      raise ValueError(f"config.data.{field}: {message}")

  def get(field: str):
    return data_config.get(data_cfg, field)

  unknown = sorted(set(data_cfg.keys()) - set(data_config.default_data_config().keys()))
  if unknown:
    raise ValueError(f"config.data.{unknown[0]}: not a data config field (misspelled?); the fields are those of "
                     f"default_data_config()")
  RenderOptions.from_config(data_cfg)  # layout, reasoning_effort, python_tool, row_format
  for field in ("question_field", "answer_field", "messages_field", "tools_field", "tool_calls_field",
                "tool_name_field", "tool_input_field", "tool_output_field", "tokenizer"):
    need(isinstance(get(field), str) and bool(get(field)), field, "must be a non-empty string")
  for field in ("overlong", "on_bad_row"):
    need(get(field) in ("skip", "error"), field, f"{get(field)!r} is not skip or error")
  need(get("eval_size") >= 0, "eval_size", "must be >= 0 (a fraction < 1 or a row count)")
  need(get("pack_window") >= 1, "pack_window", "must be >= 1")
  need(get("stream_epochs") >= 0, "stream_epochs", "must be >= 0 (0 = endless)")
  need(get("prefetch") >= 0, "prefetch", "must be >= 0")
  need(get("tokenize_batch_size") >= 1, "tokenize_batch_size", "must be >= 1")
  need(bool(get("mixture")) or bool(get("dataset_name")), "dataset_name", "set a dataset (or data.mixture)")
  try:
    source_specs(data_cfg)
  except ValueError as e:
    raise ValueError(f"config.data.mixture: {e}") from None


def make_pipeline(data_cfg, tokenizer, *, seq_len: int, global_batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1, split: str = "train", allgather: Allgather | None = None):
  """The train iterator (split="train") or the eval batches (split="eval") of this host.

  Tokenizes this host's shards of the sources into the cache on first use. With process_count > 1, every process
  must call it alike, with an `allgather(x) -> array [process_count, *x.shape]` (the trainer passes
  jax.experimental.multihost_utils.process_allgather). See TrainIterator and EvalBatches.
  """
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  _check_batch_args(seq_len, global_batch_size, process_index, process_count)
  validate_data_config(data_cfg)
  hosts = _Hosts(process_index, process_count, allgather)
  prepared = _prepare(data_cfg, tokenizer, seq_len, global_batch_size, hosts)
  if split == "train":
    _log_stats(prepared.stats)
    return TrainIterator(prepared, data_cfg, seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
                         hosts=hosts)
  evals = EvalBatches(prepared, data_cfg, seq_len=seq_len, global_batch_size=global_batch_size, hosts=hosts)
  log.info("data: eval split of %d documents in %d batches", evals.num_docs, len(evals))
  return evals
