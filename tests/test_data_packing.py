"""Packing: best-fit-decreasing bins, and the exact block arrays (segments, positions, targets, loss mask)."""

import numpy as np
import pytest

from numina_jax.data import packing


def test_best_fit_decreasing_known_case():
  lengths = [2, 7, 5, 4, 6, 3, 3]
  bins = packing.best_fit_decreasing(lengths, 10)
  # Longest first, each into the bin it leaves fullest: 7->b0 (3 left), 6->b1 (4), 5->b2 (5), 4->b1 (0),
  # 3->b0 (0), 3->b2 (2), 2->b2 (0).
  assert bins == [[1, 5], [4, 3], [2, 6, 0]]


def test_best_fit_decreasing_properties():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 300, size=2000)
  bins = packing.best_fit_decreasing(lengths, 512)
  assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
  assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
  assert packing.best_fit_decreasing(lengths, 512) == bins  # deterministic
  lower_bound = int(np.ceil(lengths.sum() / 512))
  assert len(bins) <= lower_bound * 1.02 + 1  # near-optimal on many small items
  with pytest.raises(ValueError, match="lengths must be in"):
    packing.best_fit_decreasing([3, 11], 10)


def _doc(tokens, mask):
  return np.array(tokens, np.int32), np.array(mask, np.uint8)


def test_assemble_exact_arrays():
  a = _doc([11, 12, 13, 14], [0, 0, 1, 1])
  b = _doc([21, 22, 23], [0, 1, 1])
  c = _doc([31, 32], [1, 1])
  batch = packing.assemble([[a, b], [c]], seq_len=8, num_rows=3)
  assert set(batch) == set(packing.BATCH_KEYS)
  np.testing.assert_array_equal(batch["input_ids"], [[11, 12, 13, 14, 21, 22, 23, 0], [31, 32, 0, 0, 0, 0, 0, 0],
                                                     [0] * 8])
  np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 1, 2, 2, 2, 0], [1, 1, 0, 0, 0, 0, 0, 0], [0] * 8])
  np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 0, 0, 0, 0, 0, 0], [0] * 8])
  # The last token of a document predicts nothing: the next document is not its continuation.
  np.testing.assert_array_equal(batch["targets"], [[12, 13, 14, 0, 22, 23, 0, 0], [32, 0, 0, 0, 0, 0, 0, 0], [0] * 8])
  # loss_mask[t] is the harmony mask of targets[t]: a's 12 has none, 13 and 14 do; b's 22 and 23 do; c's 32 does.
  np.testing.assert_array_equal(batch["loss_mask"], [[0, 1, 1, 0, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0], [0] * 8])
  assert batch["loss_mask"].dtype == np.float32
  assert all(batch[k].dtype == np.int32 for k in ("input_ids", "segment_ids", "positions", "targets"))
  assert packing.batch_counts(batch) == {"positions": 24, "tokens": 9, "loss_tokens": 5, "padding_blocks": 1}
  with pytest.raises(ValueError, match="overflow"):
    packing.assemble([[a, b, c]], seq_len=8)


def test_pack_documents_never_cuts():
  rng = np.random.default_rng(1)
  docs = [_doc(rng.integers(1, 100, n), rng.integers(0, 2, n)) for n in rng.integers(1, 40, 300)]
  docs.insert(5, _doc(np.arange(70), np.ones(70)))
  stats = {}
  blocks = list(packing.pack_documents(iter(docs), seq_len=64, window=50, stats=stats))
  assert stats["overlong_docs"] == 1
  packed = [d for block in blocks for d in block]
  assert len(packed) == len(docs) - 1
  assert {d[0].tobytes() for d in packed} == {d[0].tobytes() for d in docs if len(d[0]) <= 64}
  assert all(sum(len(d[0]) for d in block) <= 64 for block in blocks)
  with pytest.raises(ValueError, match="document 5 has 70 tokens, more than seq_len 64"):
    list(packing.pack_documents(iter(docs), seq_len=64, overlong="error"))
