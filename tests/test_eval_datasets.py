"""Validation sets: the real AIME / AMC / MATH files, the Hub code path on local copies, subsets, bad rows."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from numina_jax.data.errors import BadRowError
from numina_jax.eval import datasets as eval_datasets
from numina_jax.eval.datasets import SETS, load_eval_set, parse_problem_ids
from helpers import require_shared

AIME = "data/eval/aime/aimo-validation-aime.parquet"
AMC = "data/eval/amc/aimo-validation-amc.parquet"
MATH = "data/eval/math/math-test-5000.jsonl"
MATH500 = "data/eval/math/math-500.jsonl"


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _amc_row(i, answer, year=2022):
  return {"id": i, "problem": f"problem {i}", "answer": answer,
          "url": f"https://artofproblemsolving.com/wiki/index.php/{year}_AMC_12A_Problems/Problem_{i + 1}"}


@pytest.fixture(scope="module")
def math_sets():
  path = str(require_shared(MATH))
  return load_eval_set("math_l4", path=path), load_eval_set("math_l5", path=path)


def test_aime():
  s = load_eval_set("aime", path=str(require_shared(AIME)))
  assert len(s) == 90 and s.rows == 90 and s.excluded == {} and s.modulo is None and s.grader.kind == "integer"
  assert len({p.id for p in s}) == 90 and all(type(p.answer) is int and 0 <= p.answer <= 999 for p in s)
  by_id = {p.id: p for p in s}
  assert by_id["2022_AIME_I_15"].answer == 33  # "033" in the file
  assert by_id["2022_AIME_II_10"].answer == 4  # "004"
  assert by_id["2022_AIME_I_1"].answer == 116 and by_id["2022_AIME_I_1"].text.startswith("Quadratic polynomials")
  assert s.problems[0].id == "2022_AIME_I_1" and s.problems[-1].id.startswith("2024_AIME_II_")


def test_amc_answers_kept_exactly():
  s = load_eval_set("amc", path=str(require_shared(AMC)))
  assert len(s) == 83 and s.modulo is None
  # The Hub's `id` column restarts for 2023; the AoPS page names each problem once.
  assert len({p.id for p in s}) == 83 and all(type(p.answer) is int for p in s)
  by_id = {p.id: p.answer for p in s}
  assert by_id["2022_AMC_12A_17"] == -4 and by_id["2023_AMC_12A_25"] == -1
  assert by_id["2022_AMC_12A_19"] == 8178 and by_id["2023_AMC_12B_4"] == 1625 and by_id["2022_AMC_12B_3"] == 0


def test_math_levels_4_and_5_with_integer_answers(math_sets):
  l4, l5 = math_sets
  assert (len(l4), len(l5)) == (744, 719)
  assert l4.excluded == {"other_level": 5000 - 1214, "non_integer_answer": 1214 - 744}
  assert l5.excluded == {"other_level": 5000 - 1324, "non_integer_answer": 1324 - 719}
  assert all(type(p.answer) is int and p.meta["level"] == 4 for p in l4)
  assert all(type(p.answer) is int and p.meta["level"] == 5 for p in l5)
  l5_by_id = {p.id: p for p in l5}
  assert l5_by_id["11"].answer == -15 and l5_by_id["11"].meta["subject"] == "Algebra"
  assert {p.id: p.answer for p in l4}["155"] == -8192
  # Level 4 rows whose boxes are not plain integers: \dfrac{9}{7}, x \in [-2,7], 4,6,14,15.
  assert not {"2", "6", "8"} & {p.id for p in l4}
  assert l4.problems[0].id == "7" and l4.problems[0].answer == 7


def test_math500_keeps_every_answer():
  s = load_eval_set("math500", path=str(require_shared(MATH500)))
  assert len(s) == 500 and s.grader.kind == "math" and s.modulo is None
  p = s.problems[0]
  assert (p.id, p.answer, p.meta["level"]) == ("test/precalculus/807.json", "\\left( 3, \\frac{\\pi}{2} \\right)", 2)
  assert s.grader.is_correct("(3, \\frac{\\pi}{2})", p.answer)


def test_limit_and_problems():
  path = str(require_shared(AIME))
  full = load_eval_set("aime", path=path).problems
  assert load_eval_set("aime", path=path, limit=5).problems == full[:5]
  assert load_eval_set("aime", path=path, limit=500).problems == full
  picked = load_eval_set("aime", path=path, problems="2022_AIME_I_10, 2022_AIME_I_1")
  assert [p.id for p in picked] == ["2022_AIME_I_1", "2022_AIME_I_10"]  # file order
  assert [p.id for p in load_eval_set("aime", path=path, problems=["2024_AIME_I_3", "2022_AIME_I_2"], limit=1)] \
      == ["2022_AIME_I_2"]
  with pytest.raises(ValueError, match=r"unknown problem ids \['nope'\]; valid ids: 2022_AIME_I_1, 2022_AIME_I_10, "
                                       r".*\(90 in all\)"):
    load_eval_set("aime", path=path, problems="2022_AIME_I_1,nope")
  for bad in (0, -3, 2.0):
    with pytest.raises(ValueError, match="--limit must be a positive integer"):
      load_eval_set("aime", path=path, limit=bad)
  with pytest.raises(ValueError, match="--problems takes ids"):
    parse_problem_ids("a,,b")


def test_hub_code_path_on_local_copies(tmp_path, math_sets):
  # The layout of the Hub repos: data/train-00000-of-00001.parquet, read through `datasets.load_dataset`.
  for name, rel in (("aime", AIME), ("amc", AMC)):
    repo = tmp_path / name / "data"
    repo.mkdir(parents=True)
    shutil.copy(require_shared(rel), repo / "train-00000-of-00001.parquet")
    hub = load_eval_set(name, path=f"hf:{tmp_path / name}")
    assert hub.source.endswith("[train]")
    assert hub.problems == load_eval_set(name, path=str(require_shared(rel))).problems
  # MATH as a Hub jsonl (test split), level 5 only to keep it small.
  rows = [json.loads(line) for line in require_shared(MATH).read_text().splitlines()]
  (tmp_path / "math").mkdir()
  _jsonl(tmp_path / "math" / "test.jsonl", [r for r in rows if r["level"] == "Level 5"])
  hub = load_eval_set("math_l5", path=f"hf:{tmp_path / 'math'}")
  assert hub.problems == math_sets[1].problems and hub.excluded == {"non_integer_answer": 1324 - 719}


def test_local_files_in_hub_format(tmp_path):
  rows = [_amc_row(0, 5.0), _amc_row(1, -4.0), _amc_row(2, 8178.0), _amc_row(0, 12.0, year=2023)]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "amc.parquet")
  s = load_eval_set("amc", path=str(tmp_path / "amc.parquet"))
  assert [(p.id, p.answer) for p in s] == [("2022_AMC_12A_1", 5), ("2022_AMC_12A_2", -4), ("2022_AMC_12A_3", 8178),
                                           ("2023_AMC_12A_1", 12)]
  assert load_eval_set("amc", path=_jsonl(tmp_path / "amc.jsonl", rows)).problems == s.problems
  # Without urls the id column names the problems.
  aime = [{"id": 7, "problem": "p", "answer": "033"}, {"id": 8, "problem": "q", "answer": 999}]
  assert [(p.id, p.answer) for p in load_eval_set("aime", path=_jsonl(tmp_path / "aime.jsonl", aime))] == \
      [("7", 33), ("8", 999)]


@pytest.mark.parametrize("name, row, match", [
    ("amc", _amc_row(2, 2.5), r"row 2: field 'answer': 2\.5 is not an integer"),
    ("amc", _amc_row(2, float("nan")), r"row 2: field 'answer': nan is not an integer"),
    ("amc", _amc_row(2, True), r"row 2: field 'answer': expected an integer, got the bool"),
    ("amc", _amc_row(2, "1,000"), r"row 2: field 'answer': expected an integer, got str '1,000'"),
    ("amc", {**_amc_row(2, 3.0), "problem": None}, r"row 2: field 'problem': missing"),
    ("amc", {**_amc_row(2, 3.0), "problem": "  "}, r"row 2: field 'problem': empty"),
    ("amc", _amc_row(0, 3.0), r"row 2: field 'id': problem id '2022_AMC_12A_1' already names row 0"),
    ("amc", {"problem": "p", "answer": 1.0}, r"row 2: field 'url': no AoPS problem url"),
    ("aime", {"id": 9, "problem": "p", "answer": "1000"}, r"row 2: field 'answer': 1000 is outside 0..999"),
    ("aime", {"id": 9, "problem": "p", "answer": "12a"}, r"row 2: field 'answer': expected an integer"),
    ("math_l4", {"problem": "p", "level": "Level ?", "solution": "\\boxed{1}"}, r"row 2: field 'level'"),
    ("math_l4", {"problem": "p", "level": "Level 4", "solution": 5}, r"row 2: field 'solution': expected a string"),
    ("math500", {"problem": "p", "level": 3, "solution": "s", "unique_id": "u"}, r"row 2: field 'answer': missing"),
])
def test_a_bad_row_names_file_row_and_field(tmp_path, name, row, match):
  if name == "amc":
    good = [_amc_row(0, 1.0), _amc_row(1, 2.0)]
  elif name == "aime":
    good = [{"id": i, "problem": "p", "answer": "001"} for i in range(2)]
  else:
    good = [{"problem": "p", "level": 4, "solution": "\\boxed{3}", "answer": "3", "unique_id": f"t{i}"}
            for i in range(2)]
  path = _jsonl(tmp_path / "bad.jsonl", good + [row])
  with pytest.raises(BadRowError, match=f"bad.jsonl: {match}"):
    load_eval_set(name, path=path)


def test_bad_json_line_and_missing_path(tmp_path):
  path = tmp_path / "broken.jsonl"
  path.write_text(json.dumps(_amc_row(0, 1.0)) + "\n{not json\n")
  with pytest.raises(BadRowError, match=r"row 1: broken.jsonl line 2 is not valid JSON"):
    load_eval_set("amc", path=str(path))
  with pytest.raises(FileNotFoundError, match="nowhere.parquet"):
    load_eval_set("amc", path=str(tmp_path / "nowhere.parquet"))
  with pytest.raises(ValueError, match=r"math_l4: give path="):
    load_eval_set("math_l4")
  with pytest.raises(ValueError, match=r"unknown evaluation set 'gsm8k'; known: \['aime', 'amc'"):
    load_eval_set("gsm8k")


def test_math_rule_on_hand_rows(tmp_path):
  sol = lambda ans: f"work \\boxed{{0}} then $\\boxed{{{ans}}}$."  # noqa: E731
  rows = [{"problem": f"p{i}", "level": "Level 4", "type": "Algebra", "solution": sol(a), "idx": 10 + i}
          for i, a in enumerate(["-3", "007", "1,000", "30^\\circ", "5.0", "\\frac{8}{2}", "\\$40", "12"])]
  rows += [{"problem": "p", "level": "Level 4", "solution": "no box", "idx": 30},
           {"problem": "p", "level": "Level 3", "solution": sol("1"), "idx": 31}]
  s = load_eval_set("math_l4", path=_jsonl(tmp_path / "m.jsonl", rows))
  assert [(p.id, p.answer) for p in s] == [("10", -3), ("11", 7), ("17", 12)]
  assert s.excluded == {"non_integer_answer": 5, "no_boxed_answer": 1, "other_level": 1}


def test_sets_and_cli(tmp_path, capsys):
  assert SETS["aime"].hub == "AI-MO/aimo-validation-aime" and SETS["amc"].hub == "AI-MO/aimo-validation-amc"
  assert all(spec.grader.modulo is None for spec in SETS.values())
  path = _jsonl(tmp_path / "amc.jsonl", [_amc_row(i, float(-i)) for i in range(4)])
  assert eval_datasets.main(["amc", "--path", path, "--limit", "3", "--show", "2"]) == 0
  out = capsys.readouterr().out
  assert "amc: 3 problems from" in out and "(4 rows; left out: none)" in out and "2022_AMC_12A_2\t-1\t" in out
  assert eval_datasets.main(["amc", "--path", path, "--problems", "x"]) == 2
  assert "error: amc: unknown problem ids ['x']" in capsys.readouterr().err
