"""Malformed rows: an error naming the dataset, the row and the field, or (on_bad_row="skip") a counted skip."""

import json

import pytest

from numina_jax.data import BadRowError, default_data_config, format_example, make_pipeline

GOOD = {"problem": "Compute $1 + 1$.", "solution": "$1 + 1 = 2$, so $\\boxed{2}$."}


def _call(**over):
  call = {"id": "c1", "type": "function", "function": {"name": "python", "arguments": '{"code": "print(1)"}'}}
  fn = over.pop("function", None)
  call.update(over)
  if fn is not None:
    call["function"] = fn
  return call


def _tool_row(call, reply_id="c1"):
  return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                       {"role": "tool", "tool_call_id": reply_id, "content": "1"},
                       {"role": "assistant", "content": "1"}]}


CASES = [
    # (row, field named in the error, reason key)
    ({"solution": GOOD["solution"]}, "problem", "missing_field"),
    ({"problem": GOOD["problem"]}, "solution", "missing_field"),
    ({"problem": GOOD["problem"], "solution": 5}, "solution", "not_a_string"),
    ({"problem": ["not", "text"], "solution": "x"}, "problem", "not_a_string"),
    ({"problem": GOOD["problem"], "solution": "  \n "}, "solution", "empty_solution"),
    ({"problem": GOOD["problem"], "solution": "Run it.\n```python\nprint(1)\n```\nSo $\\boxed{1}$."}, "solution",
     "code_without_output"),
    ({"problem": GOOD["problem"], "solution": "a\n```python\nprint(1)\n```\nthen\n```output\n1\n```\n$\\boxed{1}$"},
     "solution", "code_without_output"),
    ({"problem": GOOD["problem"], "solution": "a\n```output\n1\n```\n$\\boxed{1}$"}, "solution",
     "output_without_code"),
    ({"problem": GOOD["problem"], "solution": "a\n```python\nprint(1)\n"}, "solution", "unclosed_fence"),
    ({"problem": GOOD["problem"], "solution": "a\n```python\nprint(1)\n```\n```output\n1\n```"}, "solution",
     "no_final"),
    (_tool_row(_call(id=None)), "messages[1].tool_calls[0].id", "tool_call_missing_id"),
    (_tool_row({k: v for k, v in _call().items() if k != "id"}), "messages[1].tool_calls[0].id",
     "tool_call_missing_id"),
    (_tool_row(_call(type="retrieval")), "messages[1].tool_calls[0].type", "tool_call_unknown_type"),
    (_tool_row(_call(function={"name": "f", "arguments": "[1, 2]"})), "messages[1].tool_calls[0].function.arguments",
     "tool_call_bad_arguments"),
    (_tool_row(_call(function={"name": "f", "arguments": "{not json"})),
     "messages[1].tool_calls[0].function.arguments", "tool_call_bad_arguments"),
    (_tool_row(_call(function={"name": "python", "arguments": '{"src": "print(1)"}'})),
     "messages[1].tool_calls[0].function.arguments", "tool_call_bad_arguments"),
    (_tool_row(_call(), reply_id="c2"), "messages[2].tool_call_id", "tool_reply_without_call"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "tool_call_id": "c1", "content": "1"},
                   {"role": "assistant", "content": "1"}]}, "messages[1].tool_call_id", "tool_reply_without_call"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [_call()]},
                   {"role": "assistant", "content": "1"}]}, "messages[1].tool_calls", "tool_call_without_reply"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}, "messages[1].content",
     "empty_solution"),
    ({"messages": [{"role": "user", "content": "q"}]}, "messages", "no_final"),
    ({"tools": [{"type": "function", "function": {"name": "g"}}], **_tool_row(_call(
        function={"name": "f", "arguments": "{}"}))}, "messages[1].tool_calls[0]", "undeclared_function"),
]


@pytest.mark.parametrize("row,field,reason", CASES)
def test_format_example_names_the_field(tok, row, field, reason):
  with pytest.raises(BadRowError) as info:
    format_example(row, tok, dataset="mydata", index=7)
  err = info.value
  assert (err.dataset, err.index, err.field, err.reason) == ("mydata", 7, field, reason)
  assert str(err).startswith(f"mydata: row 7: field {field!r}: ")


def _write(tmp_path, rows, name="rows.jsonl"):
  path = tmp_path / name
  with open(path, "w") as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
  return path


def _cfg(tmp_path, path, on_bad_row):
  cfg = default_data_config()
  cfg.dataset_name, cfg.cache_dir, cfg.on_bad_row = str(path), str(tmp_path / "cache"), on_bad_row
  cfg.eval_size, cfg.progress_bar, cfg.prefetch = 0.0, False, 0
  return cfg


def test_pipeline_raises_naming_dataset_row_and_field(tmp_path, tok):
  rows = [GOOD] * 3 + [{"problem": "p", "solution": 7}] + [GOOD] * 2
  path = _write(tmp_path, rows)
  with pytest.raises(BadRowError, match=rf"{path}: row 3: field 'solution': expected a string, got int"):
    make_pipeline(_cfg(tmp_path, path, "error"), tok, seq_len=512, global_batch_size=2, seed=0)
  assert not list((tmp_path / "cache").glob("**/meta.json"))  # nothing half-built is left as a cache entry


def test_skip_counts_every_bad_row(tmp_path, tok):
  bad = [row for row, _, _ in CASES]
  rows = [GOOD, "{this is not json"] + bad + [GOOD]
  path = _write(tmp_path, rows)
  it = make_pipeline(_cfg(tmp_path, path, "skip"), tok, seq_len=512, global_batch_size=1, seed=0)
  src = it.stats["sources"][str(path)]
  assert src["rows"] == len(rows) and src["kept"] == 2 and src["train_docs"] == 2
  expected = {}
  for _, _, reason in CASES:
    expected[f"bad_row:{reason}"] = expected.get(f"bad_row:{reason}", 0) + 1
  expected["bad_row:bad_json"] = 1
  assert src["skipped"] == expected
  assert it.stats["rows_skipped"] == expected
  assert sum(src["skipped"].values()) + src["kept"] == src["rows"]
  errors = src["errors"]  # the first five, in row order
  assert len(errors) == 5 and errors[0] == f"{path}: row 1: rows.jsonl line 2 is not valid JSON (Expecting property name enclosed in double quotes)"
  assert errors[1].startswith(f"{path}: row 2: field 'problem': missing")
  batch = next(it)
  assert batch["segment_ids"].max() >= 1
