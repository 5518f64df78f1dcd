"""Packing documents into fixed-length blocks: best-fit-decreasing within a window, and the block arrays.

A block of length T holds whole documents back to back, never a cut one. Its arrays (int32 unless noted):
  input_ids [T]    the tokens; 0 on padding
  segment_ids [T]  1..n for the block's documents, 0 on padding (attention stays within a segment)
  positions [T]    0, 1, ... restarting at each document; 0 on padding
  targets [T]      the next token of the same document; 0 at a document's last token and on padding
  loss_mask [T]    float32 1.0 where targets[t] is a real next token AND the harmony mask trains that token
"""

from __future__ import annotations

import bisect
from typing import Iterable, Iterator, Sequence

import numpy as np

BATCH_KEYS = ("input_ids", "segment_ids", "positions", "targets", "loss_mask")
Doc = tuple[np.ndarray, np.ndarray]  # (token ids, per-token loss mask)


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
  """Packs items into bins of `capacity`: longest first, each into the open bin it leaves fullest.

  Returns the bins (lists of indices into `lengths`) in the order they were opened; deterministic (ties go to the
  earlier item and the earlier bin). Every length must be in [1, capacity].
  """
  lengths = np.asarray(lengths, np.int64)
  if len(lengths) and (lengths.min() < 1 or lengths.max() > capacity):
    raise ValueError(f"lengths must be in [1, {capacity}], got [{lengths.min()}, {lengths.max()}]")
  order = np.argsort(-lengths, kind="stable")
  bins: list[list[int]] = []
  space: list[int] = []  # remaining room of open bins, sorted ascending
  owner: list[int] = []  # bin index for each entry of `space`
  for i in order.tolist():
    need = int(lengths[i])
    j = bisect.bisect_left(space, need)
    if j == len(space):
      b, room = len(bins), capacity
      bins.append([])
    else:
      b, room = owner.pop(j), space.pop(j)
    bins[b].append(i)
    room -= need
    if room > 0:
      k = bisect.bisect_right(space, room)  # after equal rooms, so older bins win ties
      space.insert(k, room)
      owner.insert(k, b)
  return bins


def assemble(blocks: Sequence[Sequence[Doc]], seq_len: int, num_rows: int | None = None) -> dict[str, np.ndarray]:
  """The batch arrays [num_rows, seq_len] for blocks of documents; rows past len(blocks) are all padding."""
  rows = len(blocks) if num_rows is None else num_rows
  if len(blocks) > rows:
    raise ValueError(f"{len(blocks)} blocks do not fit in {rows} rows")
  input_ids = np.zeros((rows, seq_len), np.int32)
  segment_ids = np.zeros((rows, seq_len), np.int32)
  positions = np.zeros((rows, seq_len), np.int32)
  targets = np.zeros((rows, seq_len), np.int32)
  loss_mask = np.zeros((rows, seq_len), np.float32)
  arange = np.arange(seq_len, dtype=np.int32)
  for r, docs in enumerate(blocks):
    o = 0
    for s, (tokens, mask) in enumerate(docs, 1):
      n = len(tokens)
      if o + n > seq_len:
        raise ValueError(f"documents of block {r} overflow seq_len {seq_len}")
      input_ids[r, o:o + n] = tokens
      segment_ids[r, o:o + n] = s
      positions[r, o:o + n] = arange[:n]
      targets[r, o:o + n - 1] = tokens[1:]
      loss_mask[r, o:o + n - 1] = mask[1:]
      o += n
  return {"input_ids": input_ids, "segment_ids": segment_ids, "positions": positions, "targets": targets,
          "loss_mask": loss_mask}


def batch_counts(batch: dict[str, np.ndarray]) -> dict[str, int]:
  """A batch's positions, those holding a token, those carrying loss, and its rows that are all padding."""
  segment_ids = batch["segment_ids"]
  return {"positions": int(segment_ids.size), "tokens": int((segment_ids > 0).sum()),
          "loss_tokens": int(batch["loss_mask"].sum()), "padding_blocks": int((segment_ids.max(axis=1) == 0).sum())}


def pack_documents(docs: Iterable[Doc], seq_len: int, window: int = 2048, overlong: str = "skip",
                   stats: dict | None = None) -> Iterator[list[Doc]]:
  """Streams documents into blocks (lists of documents), best-fit-decreasing over each `window` documents.

  A document longer than seq_len is skipped and counted in stats["overlong_docs"], or raises with
  overlong="error"; it is never cut. Empty documents are counted in stats["empty_docs"].
  """
  if overlong not in ("skip", "error"):
    raise ValueError(f"overlong must be 'skip' or 'error', got {overlong!r}")
  stats = stats if stats is not None else {}
  stats.setdefault("overlong_docs", 0)
  stats.setdefault("empty_docs", 0)
  buf: list[Doc] = []

  def drain():
    for block in best_fit_decreasing([len(d[0]) for d in buf], seq_len):
      yield [buf[i] for i in block]
    buf.clear()

  for k, doc in enumerate(docs):
    n = len(doc[0])
    if n > seq_len:
      if overlong == "error":
        raise ValueError(f"document {k} has {n} tokens, more than seq_len {seq_len}")
      stats["overlong_docs"] += 1
      continue
    if n == 0:
      stats["empty_docs"] += 1
      continue
    buf.append(doc)
    if len(buf) >= window:
      yield from drain()
  if buf:
    yield from drain()
