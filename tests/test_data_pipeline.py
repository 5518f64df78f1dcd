"""The input pipeline on the shipped sample with the demo tokenizer: contract, determinism, resume, eval, cache.

Many hosts are tested in test_data_hosts.py."""

import gc
import json
import threading

import numpy as np
import pytest

from numina_jax.data import (BATCH_KEYS, default_data_config, format_example, harmony, make_pipeline,
                             tokenized, validate_data_config)
from numina_jax.data.sources import SourceSpec, open_source

SEQ = 512


def _cfg(cache, **kw):
  cfg = default_data_config()
  cfg.cache_dir, cfg.progress_bar = cache, False
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def _take(it, n):
  return [next(it) for _ in range(n)]


def _equal(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in BATCH_KEYS) and len(a) == len(b)


def _segments(batch):
  """(row, start, stop) of every document in a batch."""
  out = []
  for r, seg in enumerate(batch["segment_ids"]):
    for s in range(1, seg.max() + 1):
      idx = np.flatnonzero(seg == s)
      out.append((r, idx[0], idx[-1] + 1))
  return out


def test_batch_contract(tok, cache):
  it = make_pipeline(_cfg(cache), tok, seq_len=SEQ, global_batch_size=4, seed=0)
  by_tokens = {}
  for row in open_source(SourceSpec("sample:cot")).iter_rows():
    ex = format_example(row, tok)
    by_tokens[ex["input_ids"].tobytes()] = ex
  for batch in _take(it, 3):
    assert set(batch) == set(BATCH_KEYS)
    for k in BATCH_KEYS:
      assert batch[k].shape == (4, SEQ) and batch[k].dtype == (np.float32 if k == "loss_mask" else np.int32)
    pad = batch["segment_ids"] == 0
    assert not batch["input_ids"][pad].any() and not batch["positions"][pad].any() and not batch["loss_mask"][pad].any()
    for r, a, b in _segments(batch):
      # Each segment is one whole rendered row: never cut, positions restart, targets stay inside it.
      ex = by_tokens[batch["input_ids"][r, a:b].tobytes()]
      np.testing.assert_array_equal(batch["positions"][r, a:b], np.arange(b - a))
      np.testing.assert_array_equal(batch["targets"][r, a:b - 1], ex["input_ids"][1:])
      assert batch["targets"][r, b - 1] == 0 and batch["loss_mask"][r, b - 1] == 0
      np.testing.assert_array_equal(batch["loss_mask"][r, a:b - 1], ex["loss_mask"][1:])
      # Segments are contiguous and numbered in order.
      assert (batch["segment_ids"][r, a:b] == batch["segment_ids"][r, a]).all()
  it.close()


def test_deterministic_by_seed(tok, cache):
  a = _take(make_pipeline(_cfg(cache), tok, seq_len=SEQ, global_batch_size=4, seed=1), 4)
  b = _take(make_pipeline(_cfg(cache, prefetch=0), tok, seq_len=SEQ, global_batch_size=4, seed=1), 4)
  c = _take(make_pipeline(_cfg(cache), tok, seq_len=SEQ, global_batch_size=4, seed=2), 4)
  assert _equal(a, b) and not _equal(a, c)


def test_resume_gives_exactly_the_same_batches(tok, cache):
  cfg = _cfg(cache, pack_window=64)  # small windows: the state crosses window and epoch boundaries
  ref = make_pipeline(cfg, tok, seq_len=SEQ, global_batch_size=8, seed=3)
  ref_batches = _take(ref, 80)
  assert ref.epoch >= 1
  run = make_pipeline(cfg, tok, seq_len=SEQ, global_batch_size=8, seed=3)
  _take(run, 37)
  state = json.loads(json.dumps(run.get_state()))  # it must survive a JSON round trip (checkpoint metadata)
  run.close()
  resumed = make_pipeline(cfg, tok, seq_len=SEQ, global_batch_size=8, seed=3)
  resumed.set_state(state)
  assert _equal(_take(resumed, 43), ref_batches[37:])
  assert resumed.get_state()["batches"] == 80 and resumed.epoch == ref.epoch
  # Restoring into an iterator that already ran ahead (with its prefetch thread) rewinds it.
  ref.set_state(state)
  assert _equal(_take(ref, 5), ref_batches[37:42])
  with pytest.raises(ValueError, match="seed"):
    make_pipeline(cfg, tok, seq_len=SEQ, global_batch_size=8, seed=4).set_state(state)
  with pytest.raises(ValueError, match="plan"):
    make_pipeline(_cfg(cache, pack_window=65), tok, seq_len=SEQ, global_batch_size=8, seed=3).set_state(state)


def test_prefetch_thread_ends_with_its_iterator(tok, cache):
  def prefetchers():
    return {t for t in threading.enumerate() if t.name.startswith("grain-prefetch") and t.is_alive()}

  before = prefetchers()  # earlier tests' dropped iterators may still be winding down
  it = make_pipeline(_cfg(cache, prefetch=3), tok, seq_len=SEQ, global_batch_size=2, seed=0)
  next(it)
  (mine,) = prefetchers() - before
  del it  # dropped without close()
  gc.collect()
  mine.join(timeout=5)
  assert not mine.is_alive()


def test_epochs_cover_every_train_doc_once(tok, cache):
  it = make_pipeline(_cfg(cache, stream_epochs=2, pack_window=300), tok, seq_len=SEQ, global_batch_size=8, seed=0)
  per_epoch = it.epoch_size
  steps = it.steps_per_epoch
  seen = []
  epochs = []
  batches = 0
  for batch in it:
    batches += 1
    epochs.append(it.epoch)
    for r, a, b in _segments(batch):
      seen.append(batch["input_ids"][r, a:b].tobytes())
  assert len(seen) == 2 * per_epoch == 2 * it.stats["sources"]["sample:cot"]["train_docs"]
  assert len(set(seen)) == per_epoch  # two full passes (the sample's rows are distinct)
  assert epochs == sorted(epochs) and epochs[-1] == 2
  with pytest.raises(StopIteration):
    next(it)
  stats = it.stats
  assert it.get_state()["finished"] and batches == stats["num_steps"] == stats["slot_blocks"]["max"]
  # Row slots end a few blocks apart; the stream runs to the longest and pads the others' rows.
  assert stats["packing"]["padding_blocks"] == 8 * batches - stats["slot_blocks"]["total"]
  assert 2 * steps <= batches <= 2 * steps * 1.1 and stats["packing"]["padding_blocks"] < 0.1 * 8 * batches
  assert 0.8 < stats["packing"]["nonpad_fraction"] <= 1 and 0.3 < stats["packing"]["loss_fraction"] < 0.8


def test_eval_split_is_fixed_disjoint_and_finite(tok, cache):
  cfg = _cfg(cache, eval_size=30.0)
  ev = make_pipeline(cfg, tok, seq_len=SEQ, global_batch_size=4, seed=0, split="eval")
  ev2 = make_pipeline(cfg, tok, seq_len=SEQ, global_batch_size=4, seed=99, split="eval")
  batches = list(ev)
  assert len(batches) == len(ev) > 0 and _equal(batches, list(ev)) and _equal(batches, list(ev2))
  eval_docs = {batch["input_ids"][r, a:b].tobytes() for batch in batches for r, a, b in _segments(batch)}
  assert len(eval_docs) == ev.stats["docs"] == 30
  train = make_pipeline(_cfg(cache, eval_size=30.0, stream_epochs=1), tok, seq_len=SEQ, global_batch_size=8, seed=0)
  train_docs = {batch["input_ids"][r, a:b].tobytes() for batch in train for r, a, b in _segments(batch)}
  assert len(train_docs) == 970 and not train_docs & eval_docs
  assert batches[-1]["segment_ids"].shape == (4, SEQ)
  # The held-out rows are chosen among the source's rows by a seeded permutation, whatever the batch size.
  ev8 = make_pipeline(cfg, tok, seq_len=SEQ, global_batch_size=8, seed=0, split="eval")
  assert {batch["input_ids"][r, a:b].tobytes() for batch in ev8 for r, a, b in _segments(batch)} == eval_docs
  cfg.eval_size = 0.0
  assert len(make_pipeline(cfg, tok, seq_len=SEQ, global_batch_size=4, seed=0, split="eval")) == 0


def test_tokenized_once_then_cached(tok, tmp_path, monkeypatch):
  cfg = _cfg(str(tmp_path), dataset_name="sample:tir")
  first = next(make_pipeline(cfg, tok, seq_len=SEQ, global_batch_size=2, seed=0))
  assert len(list(tmp_path.glob("*/shard-*-of-00002/meta.json"))) == 2  # one entry per row slot

  def fail(*a, **k):
    raise AssertionError("re-tokenized")

  monkeypatch.setattr(tokenized, "row_conversation", fail)
  again = next(make_pipeline(cfg, tok, seq_len=SEQ, global_batch_size=2, seed=0))
  assert _equal([first], [again])
  # A different rendering option is a different cache entry.
  cfg.reasoning_effort = "high"
  with pytest.raises(AssertionError, match="re-tokenized"):
    make_pipeline(cfg, tok, seq_len=SEQ, global_batch_size=2, seed=0)


def test_overlong_documents_skipped_and_counted_or_fatal(tok, cache):
  ts, = tokenized.tokenize_shards(SourceSpec("sample:cot"), open_source(SourceSpec("sample:cot")), tok, _cfg(cache))
  seq = int(np.percentile(ts.lengths, 80))
  it = make_pipeline(_cfg(cache, eval_size=0.0), tok, seq_len=seq, global_batch_size=2, seed=0)
  n_over = int((ts.lengths > seq).sum())
  assert n_over > 0 and it.stats["overlong_docs"] == n_over
  assert it.stats["sources"]["sample:cot"]["train_docs"] == 1000 - n_over
  assert it.epoch_size == 1000 - n_over
  with pytest.raises(ValueError, match=r"sample:cot: row \d+ renders to \d+ tokens, more than seq_len"):
    make_pipeline(_cfg(cache, overlong="error"), tok, seq_len=seq, global_batch_size=2, seed=0)


def test_validate_data_config():
  cfg = default_data_config()
  validate_data_config(cfg)
  for field, value, message in (("layout", "cot", "layout"), ("overlong", "cut", "overlong"),
                                ("eval_size", -1.0, "eval_size"), ("on_bad_row", "drop", "on_bad_row"),
                                ("mixture", ("sample:cot",), "NAME=WEIGHT"), ("answer_field", "", "answer_field")):
    bad = default_data_config()
    bad[field] = value
    with pytest.raises(ValueError, match=message):
      validate_data_config(bad)


def test_missing_or_misspelled_data_field_is_named(tok, cache):
  """A hand-built data config never falls back to a default silently: what it lacks or misspells is named."""
  typo = _cfg(cache).to_dict()
  typo["layuot"] = typo.pop("layout")
  with pytest.raises(ValueError, match=r"config\.data\.layuot: not a data config field"):
    make_pipeline(typo, tok, seq_len=SEQ, global_batch_size=2, seed=0)
  del typo["layuot"]
  with pytest.raises(ValueError, match=r"config\.data\.layout: missing from the data config"):
    validate_data_config(typo)
  with pytest.raises(ValueError, match=r"config\.data\.layout: missing from the data config"):
    format_example({"problem": "1 + 1?", "solution": "$\\boxed{2}$"}, tok, typo)


def test_mixture_weights(tok, cache):
  cfg = _cfg(cache, mixture=("sample:cot=3", "sample:tir=1"), eval_size=0.0)
  it = make_pipeline(cfg, tok, seq_len=SEQ, global_batch_size=8, seed=0)
  assert it.stats["sources"]["sample:tir"]["tir_rows"] == 600 and it.stats["sources"]["sample:cot"]["tir_rows"] == 0
  quotas = it.stats["epoch_quotas"]
  assert quotas == {"sample:cot": 1200, "sample:tir": 400} and it.epoch_size == 1600
  # The system message tells the two apart: TIR rows declare the python tool.
  python = harmony.renderer_for(tok).encode_text("## python")
  n_tir = n_all = 0
  for batch in _take(it, 20):
    for r, a, b in _segments(batch):
      ids = batch["input_ids"][r, a:b].tolist()
      n_all += 1
      n_tir += any(ids[i:i + len(python)] == python for i in range(min(len(ids), 200)))
  assert 0.15 < n_tir / n_all < 0.35


def test_separate_eval_dataset(tok, cache, tmp_path):
  rows = [{"problem": f"Compute ${i} + 2$.", "solution": f"So $\\boxed{{{i + 2}}}$."} for i in range(10)]
  path = tmp_path / "eval.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  cfg = _cfg(cache, eval_dataset_name=str(path))
  ev = make_pipeline(cfg, tok, seq_len=SEQ, global_batch_size=2, seed=0, split="eval")
  it = make_pipeline(cfg, tok, seq_len=SEQ, global_batch_size=2, seed=0)
  want = {format_example(r, tok)["input_ids"].tobytes() for r in rows}
  assert {batch["input_ids"][r, a:b].tobytes() for batch in ev for r, a, b in _segments(batch)} == want
  s = it.stats["sources"]
  assert s[str(path)]["eval_docs"] == 10 and s["sample:cot"]["train_docs"] == 1000 and s["sample:cot"]["eval_docs"] == 0
  assert it.stats["epoch_quotas"] == {"sample:cot": 1000} and it.epoch_size == 1000
  it.close()
