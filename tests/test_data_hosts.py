"""The input pipeline on many hosts, simulated in threads that meet in a real allgather (a barrier, as a collective).

The global batch, the iterator state, the eval set and the statistics must not depend on the host count, and each
host must tokenize only its own share of the rows, on its own disk.
"""

import json
import logging
import subprocess
import sys
import threading

import numpy as np
import pytest

from numina_jax.data import BATCH_KEYS, BadRowError, default_data_config, make_pipeline
from numina_jax.data.tokenized import row_shards
from multihost import cpu_env, free_port

SEQ = 512
B = 8  # global batch: 8 row slots


def on_hosts(count, fn, timeout=60):
  """fn(process_index, allgather) on `count` simulated hosts (threads); returns (results, errors) in host order.

  The allgather stacks every host's value on a new first axis, in host order, as
  jax.experimental.multihost_utils.process_allgather does, and fails on values of different shapes as it would.
  """
  barrier = threading.Barrier(count, timeout=timeout)
  values = [None] * count

  def allgather_of(p):
    def allgather(x):
      values[p] = np.asarray(x)
      barrier.wait()
      out = np.stack(values)
      barrier.wait()
      return out
    return allgather

  results, errors = [None] * count, [None] * count

  def run(p):
    try:
      results[p] = fn(p, allgather_of(p))
    except Exception as e:  # noqa: BLE001 - handed to the test
      errors[p] = e

  threads = [threading.Thread(target=run, args=(p,)) for p in range(count)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return results, errors


def pipelines(cfg, tok, count, *, split="train", seed=0, batch=B, cfgs=None):
  results, errors = on_hosts(count, lambda p, ag: make_pipeline(
      cfgs[p] if cfgs else cfg, tok, seq_len=SEQ, global_batch_size=batch, seed=seed, process_index=p,
      process_count=count, split=split, allgather=ag))
  for e in errors:
    if e is not None:
      raise e
  return results


def global_batches(its, n):
  """The next n global batches: the hosts' local batches, concatenated in host order."""
  out = []
  for _ in range(n):
    local = [next(it) for it in its]
    for x in local:
      assert all(x[k].shape == (B // len(its), SEQ) for k in BATCH_KEYS)
    out.append({k: np.concatenate([x[k] for x in local]) for k in BATCH_KEYS})
  return out


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in BATCH_KEYS:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _cfg(cache, **kw):
  cfg = default_data_config()
  cfg.cache_dir, cfg.progress_bar, cfg.pack_window = cache, False, 64  # several windows per slot epoch
  for k, v in kw.items():
    cfg[k] = v
  return cfg


@pytest.fixture(scope="module")
def reference(tok, cache):
  """One host: the first 60 global batches (past the end of the first epoch) and the iterator."""
  it = make_pipeline(_cfg(cache), tok, seq_len=SEQ, global_batch_size=B, seed=7)
  assert 45 < it.steps_per_epoch < 55  # so the batches below cross every slot's first epoch boundary
  return it, global_batches([it], 60)


def test_global_batch_is_the_same_for_every_host_count(tok, cache, reference):
  ref_it, ref = reference
  for count in (2, 4):
    its = pipelines(_cfg(cache), tok, count, seed=7)
    assert_same(global_batches(its, 12), ref[:12])
    for it in its:
      assert (it.steps_per_epoch, it.epoch_size) == (ref_it.steps_per_epoch, ref_it.epoch_size)
      stats = {k: v for k, v in it.stats.items() if k not in ("packing", "batches", "epoch", "hosts")}
      assert stats == {k: v for k, v in ref_it.stats.items() if k not in ("packing", "batches", "epoch", "hosts")}
      it.close()
  with pytest.raises(ValueError, match="multiple of process_count"):
    make_pipeline(_cfg(cache), tok, seq_len=SEQ, global_batch_size=6, seed=0, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="needs an allgather"):
    make_pipeline(_cfg(cache), tok, seq_len=SEQ, global_batch_size=B, seed=0, process_index=0, process_count=2)


def test_each_host_tokenizes_only_its_share_on_its_own_disk(tok, tmp_path, reference):
  _, ref = reference
  cfgs = [_cfg(str(tmp_path / f"host{p}")) for p in range(2)]
  its = pipelines(None, tok, 2, seed=7, cfgs=cfgs)
  owned = []
  for p in range(2):
    shards = sorted((tmp_path / f"host{p}").glob("*/shard-*"))
    metas = [json.loads((d / "meta.json").read_text()) for d in shards]
    assert [m["shard"] for m in metas] == list(range(4 * p, 4 * p + 4))  # this host's row slots, nothing else
    rows = [r for d in shards for r in np.load(d / "rows.npy").tolist()]
    assert len(rows) == sum(m["num_rows"] for m in metas) == 500  # the slots' rows, balanced by the permutation
    owned.append(set(rows))
  assert not owned[0] & owned[1] and len(owned[0] | owned[1]) == 1000
  # Built on separate disks, the same batches as one host reading everything.
  assert_same(global_batches(its, 3), ref[:3])
  shard_of = row_shards("sample:cot", 1000, B)
  assert owned[0] == set(np.flatnonzero(shard_of < 4).tolist())


def test_state_from_two_hosts_restores_on_one_and_on_four(tok, cache, reference):
  ref_it, ref = reference
  k = ref_it.steps_per_epoch - 4  # the restored runs cross the first epoch boundary of every slot
  its = pipelines(_cfg(cache), tok, 2, seed=7)
  assert_same(global_batches(its, k), ref[:k])
  states = [json.loads(json.dumps(it.get_state())) for it in its]  # through JSON, as in checkpoint metadata
  assert states[0] == states[1] and states[0]["batches"] == k
  for count in (1, 4):
    resumed = pipelines(_cfg(cache), tok, count, seed=7)
    for it in resumed:
      it.set_state(states[0])  # process 0's copy, as the checkpoint keeps it
    assert_same(global_batches(resumed, 60 - k), ref[k:])
    assert resumed[0].epoch == 1 and resumed[0].get_state()["batches"] == 60
  with pytest.raises(ValueError, match="global_batch_size"):
    make_pipeline(_cfg(cache), tok, seq_len=SEQ, global_batch_size=4, seed=7).set_state(states[0])


def test_eval_batches_are_the_same_for_every_host_count(tok, cache):
  cfg = _cfg(cache, eval_size=60.0)
  (whole,) = pipelines(cfg, tok, 1, split="eval")
  ref = list(whole)
  assert len(ref) == len(whole) > 1 and whole.stats["docs"] == 60
  for count in (2, 4):
    evs = pipelines(cfg, tok, count, split="eval")
    assert {len(ev) for ev in evs} == {len(whole)}
    assert_same(global_batches([iter(ev) for ev in evs], len(whole)), ref)
    assert all(ev.stats["docs"] == 60 and ev.stats["blocks"] == whole.stats["blocks"] for ev in evs)


GOOD = {"problem": "Compute $1 + 1$.", "solution": "$1 + 1 = 2$, so $\\boxed{2}$."}
BAD = [({"solution": "s"}, "bad_row:missing_field"), ({"problem": "p", "solution": 5}, "bad_row:not_a_string"),
       ({"problem": "p", "solution": " "}, "bad_row:empty_solution"),
       ({**GOOD, "answer": "proof"}, "filtered:answer_proof")]


def _rows(tmp_path):
  rows = [dict(GOOD, problem=f"Compute ${i} + 1$.") for i in range(40)]
  for j, (row, _) in enumerate(BAD * 3):
    rows.insert(3 * j + 1, row)
  path = tmp_path / "rows.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path, rows


def test_stats_are_global_sums_with_skips_by_reason(tok, tmp_path, caplog):
  path, rows = _rows(tmp_path)

  def cfg(host):
    return _cfg(str(tmp_path / host), dataset_name=str(path), on_bad_row="skip", eval_size=4.0)

  (one,) = pipelines(cfg("one"), tok, 1, batch=4)
  with caplog.at_level(logging.INFO, logger="numina_jax"):
    two = pipelines(None, tok, 2, batch=4, cfgs=[cfg("a"), cfg("b")])
  # Every host logs the global counts at start.
  start = [r.getMessage() for r in caplog.records if "rows read" in r.getMessage()]
  assert len(start) == 2 and start[0] == start[1]
  assert start[0].startswith("data: 52 rows read on 2 hosts, 12 skipped {'bad_row:empty_solution': 3, ")
  expected = {reason: 3 for _, reason in BAD}
  for it in [one, *two]:
    s = it.stats
    src = s["sources"][str(path)]
    assert s["rows_read"] == src["rows"] == len(rows) == 52 and s["rows_skipped"] == src["skipped"] == expected
    assert src["kept"] == 40 and src["train_docs"] + src["eval_docs"] == 40 and src["eval_docs"] <= 4
    assert len(src["errors"]) == 5 and src["errors"] == one.stats["sources"][str(path)]["errors"]
    assert s["epoch_docs"] == src["train_docs"] and s["hosts"] == (1 if it is one else 2)
  # Each host counted only its rows; the sums above came through the allgather.
  for host in ("a", "b"):
    metas = [json.loads(m.read_text()) for m in (tmp_path / host).glob("*/*/meta.json")]
    assert len(metas) == 2 and sum(m["num_rows"] for m in metas) == 26


def test_a_bad_row_on_one_host_fails_every_host(tok, tmp_path):
  rows = [GOOD] * 12
  rows[5] = {"solution": "s"}
  path = tmp_path / "rows.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  cfgs = [_cfg(str(tmp_path / f"h{p}"), dataset_name=str(path), eval_size=0.0) for p in range(2)]
  owner = int(row_shards(str(path), len(rows), 4)[5]) // 2  # 2 row slots per host
  _, errors = on_hosts(2, lambda p, ag: make_pipeline(cfgs[p], tok, seq_len=SEQ, global_batch_size=4, seed=0,
                                                      process_index=p, process_count=2, allgather=ag))
  message = f"{path}: row 5: field 'problem': missing"
  assert isinstance(errors[owner], BadRowError) and str(errors[owner]).startswith(message)
  other = errors[1 - owner]  # did not wait forever in the allgather, and says why
  assert isinstance(other, RuntimeError) and f"process {owner} of 2 failed while preparing the data: " \
      f"BadRowError: {message}" in str(other)


WORKER = """
import json
import sys
import jax
import numpy as np
port, pid, cfg_json, out = sys.argv[1:]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))
from jax.experimental import multihost_utils
from numina_jax.data import default_data_config, demo_tokenizer, make_pipeline
cfg = default_data_config()
cfg.update_from_flattened_dict(json.loads(cfg_json))
it = make_pipeline(cfg, demo_tokenizer(), seq_len=512, global_batch_size=4, seed=3, process_index=jax.process_index(),
                   process_count=jax.process_count(), allgather=multihost_utils.process_allgather)
batches = [next(it) for _ in range(3)]
np.savez(out, **{f"{k}{i}": b[k] for i, b in enumerate(batches) for k in b})
"""


@pytest.mark.slow
def test_two_processes_with_jax_process_allgather(tok, tmp_path):
  """The real collective: two jax.distributed processes on 127.0.0.1 exchange through process_allgather."""
  rows = [dict(GOOD, problem=f"Compute ${i} + 1$.") for i in range(48)]
  path = tmp_path / "rows.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  flat = {"dataset_name": str(path), "eval_size": 0.0, "progress_bar": False, "pack_window": 64}
  port = free_port()
  env = cpu_env(4)
  procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(p),
                             json.dumps({**flat, "cache_dir": str(tmp_path / f"host{p}")}), str(tmp_path / f"{p}.npz")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for p in range(2)]
  try:
    for proc in procs:
      out, _ = proc.communicate(timeout=300)
      assert proc.returncode == 0, out[-3000:]
  finally:
    for proc in procs:  # one failed: the other would wait in the collective
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  cfg = _cfg(str(tmp_path / "one"), **flat)
  it = make_pipeline(cfg, tok, seq_len=SEQ, global_batch_size=4, seed=3)
  local = [np.load(tmp_path / f"{p}.npz") for p in range(2)]
  for i in range(3):
    batch = next(it)
    for k in BATCH_KEYS:
      np.testing.assert_array_equal(np.concatenate([x[f"{k}{i}"] for x in local]), batch[k], err_msg=k)
