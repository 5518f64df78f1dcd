"""Sources: local files and directories, the Hub code path on a local dataset dir, tfds, filters, mixtures."""

import json
import sys
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from numina_jax.data import default_data_config
from numina_jax.data import sources
from numina_jax.data.sources import RowFilter, SourceSpec, open_source, source_specs

ROWS = [{"problem": f"p{i}", "solution": f"s{i} $\\boxed{{{i}}}$", "source": "olympiads" if i % 2 else "amc"}
        for i in range(7)]


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _parquet(path, rows):
  pq.write_table(pa.Table.from_pylist(rows), path)
  return path


def _read(name, **kw):
  src = open_source(SourceSpec(name, **kw))
  rows = list(src.iter_rows())
  assert len(rows) == src.num_rows
  return src, rows


def test_jsonl_json_parquet_and_directory(tmp_path):
  _jsonl(tmp_path / "a.jsonl", ROWS[:3])
  (tmp_path / "b.json").write_text(json.dumps(ROWS[3:5]))
  _parquet(tmp_path / "c.parquet", ROWS[5:])
  (tmp_path / "notes.txt").write_text("ignored")
  for name, want in (("a.jsonl", ROWS[:3]), ("b.json", ROWS[3:5]), ("c.parquet", ROWS[5:])):
    assert _read(str(tmp_path / name))[1] == want
  src, rows = _read(str(tmp_path))
  assert rows == ROWS  # sorted file order, concatenated
  # The fingerprint moves when a file changes, so the tokenized cache is rebuilt.
  before = src.fingerprint
  _jsonl(tmp_path / "a.jsonl", ROWS[:2])
  assert open_source(SourceSpec(str(tmp_path))).fingerprint != before


def test_iter_selected_parses_only_the_selected_rows(tmp_path):
  _jsonl(tmp_path / "a.jsonl", ROWS[:3])
  with open(tmp_path / "a.jsonl", "a") as f:
    f.write("\n{not json\n")  # row 3; a blank line is not a row
  (tmp_path / "b.json").write_text(json.dumps(ROWS[3:5]))
  _parquet(tmp_path / "c.parquet", ROWS[5:])
  src = open_source(SourceSpec(str(tmp_path)))
  assert src.num_rows == 8
  keep = np.array([1, 0, 1, 0, 0, 1, 1, 0], bool)
  got = list(src.iter_selected(keep))
  assert got == [(0, ROWS[0]), (2, ROWS[2]), (5, ROWS[4]), (6, ROWS[5])]  # row 3, the bad line, is never parsed
  keep[3] = True
  assert isinstance(dict(src.iter_selected(keep))[3], sources.BadLine)
  with pytest.raises(RuntimeError, match="more rows than the 7 counted"):
    list(src.iter_selected(keep[:7]))
  (tmp_path / "repo" / "data").mkdir(parents=True)
  _parquet(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet", ROWS)
  hub = open_source(SourceSpec(f"hf:{tmp_path / 'repo'}"))
  keep = np.arange(7) % 3 == 1
  assert list(hub.iter_selected(keep)) == [(1, ROWS[1]), (4, ROWS[4])]


def test_json_object_with_one_list_and_json_lines_named_json(tmp_path):
  (tmp_path / "x.json").write_text(json.dumps({"data": ROWS[:2]}))
  assert _read(str(tmp_path / "x.json"))[1] == ROWS[:2]
  _jsonl(tmp_path / "y.json", ROWS[:3])
  assert _read(str(tmp_path / "y.json"))[1] == ROWS[:3]


def test_hub_code_path_on_a_local_dataset_dir(tmp_path):
  (tmp_path / "repo" / "data").mkdir(parents=True)
  _parquet(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet", ROWS[:4])
  _parquet(tmp_path / "repo" / "data" / "test-00000-of-00001.parquet", ROWS[4:])
  src, rows = _read(f"hf:{tmp_path / 'repo'}", split="train")
  assert isinstance(src, sources.HFDataset) and rows == ROWS[:4]
  assert _read(f"hf:{tmp_path / 'repo'}", split="test")[1] == ROWS[4:]
  with pytest.raises(RuntimeError, match=r"could not load dataset .*repo.* split 'validation'"):
    sources.load_hub_dataset(str(tmp_path / "repo"), "", "validation")


def test_bad_paths_name_the_path(tmp_path):
  for name in (str(tmp_path / "missing.jsonl"), "./no/such/dir", "~/no-such-numina-file.parquet"):
    with pytest.raises(FileNotFoundError, match="dataset path not found: " + name.replace(".", r"\.")):
      open_source(SourceSpec(name))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=f"no .* files in directory {tmp_path / 'empty'}"):
    open_source(SourceSpec(str(tmp_path / "empty")))
  (tmp_path / "rows.csv").write_text("a,b\n")
  with pytest.raises(ValueError, match="rows.csv: unsupported file type"):
    open_source(SourceSpec(str(tmp_path / "rows.csv")))
  with pytest.raises(ValueError, match="unknown sample 'sample:xyz'"):
    open_source(SourceSpec("sample:xyz"))


def test_shipped_samples_open():
  for name in ("sample:cot", "sample:tir"):
    src = open_source(SourceSpec(name))
    first = next(iter(src.iter_rows()))
    assert set(first) >= {"problem", "solution", "messages"} and src.num_rows >= 300


def test_tfds_missing_is_a_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed
  with pytest.raises(ImportError, match=r"tfds:numina needs tensorflow-datasets.*numina_jax\[tfds\]"):
    open_source(SourceSpec("tfds:numina"))


def test_tfds_rows_are_decoded(monkeypatch):
  fake = types.ModuleType("tensorflow_datasets")
  examples = [{"problem": b"p\xc3\xa9", "solution": b"s", "n": np.int64(3), "v": np.array([1, 2])}]

  def load(name, split, with_info, shuffle_files):
    assert (name, split, with_info, shuffle_files) == ("math_ds", "train[:1]", True, False)
    info = types.SimpleNamespace(splits={split: types.SimpleNamespace(num_examples=1)}, version="1.0.0")
    return "DS", info

  fake.load = load
  fake.as_numpy = lambda ds: iter(examples)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  src, rows = _read("tfds:math_ds", split="train[:1]")
  assert rows == [{"problem": "pé", "solution": "s", "n": 3, "v": [1, 2]}]
  assert src.name == "tfds:math_ds"


def test_numina15_filters():
  f = RowFilter()
  row = {"problem": "p", "solution": "s", "answer": "12", "problem_is_valid": "Yes", "solution_is_valid": "Yes"}
  assert f.reason(row) is None
  assert f.reason({**row, "answer": "proof"}) == "answer_proof"
  assert f.reason({**row, "answer": " NotFound "}) == "answer_notfound"
  assert f.reason({**row, "problem_is_valid": "No"}) == "problem_invalid"
  assert f.reason({**row, "solution_is_valid": "No"}) == "solution_invalid"
  assert RowFilter(require_valid=False).reason({**row, "solution_is_valid": "No"}) is None
  assert RowFilter(drop_answers=()).reason({**row, "answer": "proof"}) is None
  only = RowFilter(allowed_sources=("olympiads",))
  assert only.reason({**row, "source": "olympiads"}) is None
  assert only.reason({**row, "source": "cn_k12"}) == "source_not_allowed"
  assert f.reason({"problem": "p", "solution": "s"}) is None  # CoT rows have none of these columns


def test_mixture_specs():
  cfg = default_data_config()
  assert source_specs(cfg) == [SourceSpec("sample:cot", "", "train")]
  cfg.mixture = ("sample:cot=3", "tfds:x=0.5")
  assert [(s.name, s.weight) for s in source_specs(cfg)] == [("sample:cot", 3.0), ("tfds:x", 0.5)]
  cfg.mixture = [dict(name="AI-MO/NuminaMath-1.5", weight=2, allowed_sources=["olympiads"], split="train[:10]"),
                 dict(name="sample:tir")]
  a, b = source_specs(cfg)
  assert (a.name, a.weight, a.split, a.overrides) == ("AI-MO/NuminaMath-1.5", 2.0, "train[:10]",
                                                      (("allowed_sources", ("olympiads",)),))
  assert RowFilter.for_source(a, cfg).allowed_sources == ("olympiads",)
  assert (b.weight, RowFilter.for_source(b, cfg).allowed_sources) == (1.0, ())
  cfg.mixture = [dict(name="sample:tir", lr=1)]
  with pytest.raises(ValueError, match=r"unknown keys \['lr'\]"):
    source_specs(cfg)
  cfg.mixture = ("sample:cot=0",)
  with pytest.raises(ValueError, match="weights"):
    source_specs(cfg)
