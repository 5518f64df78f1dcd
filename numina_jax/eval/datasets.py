"""Validation sets for SC-TIR evaluation, from the Hub or local files in the Hub's format: AIME (90), AMC (83),
MATH level 4 and level 5 with integer answers (derived by `math_integer_answer`), and MATH-500 (all answers).

  python -m numina_jax.eval.datasets math_l5 --path ../shared/data/eval/math/math-test-5000.jsonl --limit 5
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections import Counter
from typing import Any, Callable, Sequence

from numina_jax.data.errors import RowContext
from numina_jax.data.sources import BadLine, SourceSpec, open_source
from numina_jax.eval.grading import Grader, extract_answer


@dataclasses.dataclass(frozen=True)
class EvalProblem:
  id: str  # stable: the same row of the same file always gets it (see each set's rule in SETS)
  text: str
  answer: int | str  # an int for integer sets; MATH-500's reference answer as LaTeX
  meta: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)  # url, level, subject, row


@dataclasses.dataclass(frozen=True)
class EvalSet:
  name: str
  source: str  # what the rows were read from
  problems: tuple[EvalProblem, ...]
  grader: Grader  # how answers are compared; its `modulo` is None for every set here
  excluded: dict[str, int]  # rows the set's rule left out, by reason (MATH: other levels, non-integer answers)
  rows: int  # rows read, before the set's rule and before --limit / --problems

  @property
  def modulo(self) -> int | None:
    return self.grader.modulo

  def __len__(self) -> int:
    return len(self.problems)

  def __iter__(self):
    return iter(self.problems)


# ----------------------------------------------------------------------------------------------------------------
# Fields.


def _text(row: dict, field: str, ctx: RowContext) -> str:
  value = row.get(field)
  if value is None:
    raise ctx.error(field, "missing", "missing_field")
  if not isinstance(value, str):
    raise ctx.error(field, f"expected a string, got {type(value).__name__} {value!r}", "not_a_string")
  if not value.strip():
    raise ctx.error(field, "empty", "empty_field")
  return value


_PLAIN_INTEGER = re.compile(r"[+-]?\d+")


def _gold_integer(row: dict, field: str, ctx: RowContext) -> int:
  """A reference answer that must be an integer, kept exactly: "033" is 33, 5.0 is 5, -4.0 is -4, 8178.0 is 8178;
  2.5, NaN, "5.0", "1,000" or a bool are errors (a reference is never rounded or cleaned up)."""
  value = row.get(field)
  if value is None:
    raise ctx.error(field, "missing", "missing_field")
  if isinstance(value, bool):
    raise ctx.error(field, f"expected an integer, got the bool {value!r}", "not_an_integer")
  if isinstance(value, int):
    return value
  if isinstance(value, float):
    if value != value or value in (float("inf"), float("-inf")) or not value.is_integer():
      raise ctx.error(field, f"{value!r} is not an integer", "not_an_integer")
    return int(value)
  if isinstance(value, str) and _PLAIN_INTEGER.fullmatch(value.strip()):
    return int(value.strip())
  raise ctx.error(field, f"expected an integer, got {type(value).__name__} {value!r}", "not_an_integer")


_AOPS_PAGE = re.compile(r"/(\d{4}_[A-Za-z0-9_]+?)_Problems/Problem_(\d+)$")


def _aops_id(row: dict, ctx: RowContext) -> str:
  """AIME/AMC ids: the AoPS page the `url` names ("2022_AIME_I_1"), else the `id` column as a string. The Hub's `id`
  column alone is not unique for AMC (it restarts at 0 for 2023)."""
  url = row.get("url")
  m = _AOPS_PAGE.search(url.strip()) if isinstance(url, str) else None
  if m:
    return f"{m[1]}_{m[2]}"
  value = row.get("id")
  if isinstance(value, (int, str)) and not isinstance(value, bool) and str(value).strip():
    return str(value).strip()
  raise ctx.error("url", f"no AoPS problem url ({url!r}) and no id column to name the problem", "no_id")


def _math_id(row: dict, ctx: RowContext) -> str:
  """MATH ids: `unique_id` ("test/algebra/1.json", MATH-500), else `idx` (math-test-5000), else the row number."""
  for field in ("unique_id", "idx"):
    value = row.get(field)
    if isinstance(value, (int, str)) and not isinstance(value, bool) and str(value).strip():
      return str(value).strip()
  return str(ctx.index)


def _level(row: dict, ctx: RowContext) -> int:
  """MATH's `level`: "Level 4" (MATH test) or 4 (MATH-500)."""
  value = row.get("level")
  if isinstance(value, int) and not isinstance(value, bool):
    return value
  m = re.fullmatch(r"\s*Level\s+(\d+)\s*", value) if isinstance(value, str) else None
  if m is None:
    raise ctx.error("level", f"expected 'Level N' or an int, got {value!r}", "bad_level")
  return int(m[1])


def math_integer_answer(row: dict, ctx: RowContext) -> int | str:
  """The rule deriving MATH's integer-answer sets: the reference answer is the row's `answer` when it has one,
  else the content of the last `\\boxed{}` of its `solution` (`extract_answer`); the row is kept only when that is a
  plain integer, an optional sign and digits with nothing else (`-3`, `744`; not `1,000`, `30^\\circ`, `\\$40`,
  `5.0`, `\\frac{8}{2}`). Returns the int, or the reason the row is left out."""
  answer = row.get("answer")
  if answer is None:
    answer = extract_answer(_text(row, "solution", ctx))
    if answer is None:
      return "no_boxed_answer"
  elif not isinstance(answer, (str, int)) or isinstance(answer, bool):
    raise ctx.error("answer", f"expected a string, got {type(answer).__name__} {answer!r}", "not_a_string")
  answer = str(answer).strip()
  return int(answer) if _PLAIN_INTEGER.fullmatch(answer) else "non_integer_answer"


# ----------------------------------------------------------------------------------------------------------------
# The sets.


def _read_aime(row: dict, ctx: RowContext) -> EvalProblem | str:
  answer = _gold_integer(row, "answer", ctx)
  if not 0 <= answer <= 999:
    raise ctx.error("answer", f"{answer} is outside 0..999, so this is not an AIME answer", "bad_answer")
  return EvalProblem(_aops_id(row, ctx), _text(row, "problem", ctx), answer,
                     {"url": row.get("url"), "row": ctx.index})


def _read_amc(row: dict, ctx: RowContext) -> EvalProblem | str:
  return EvalProblem(_aops_id(row, ctx), _text(row, "problem", ctx), _gold_integer(row, "answer", ctx),
                     {"url": row.get("url"), "row": ctx.index})


def _math_meta(row: dict, ctx: RowContext, level: int) -> dict:
  return {"level": level, "subject": row.get("type", row.get("subject")), "row": ctx.index}


def _math_level(level: int) -> Callable[[dict, RowContext], EvalProblem | str]:
  def read(row: dict, ctx: RowContext) -> EvalProblem | str:
    row_level = _level(row, ctx)
    if row_level != level:
      return "other_level"
    answer = math_integer_answer(row, ctx)
    if isinstance(answer, str):
      return answer
    return EvalProblem(_math_id(row, ctx), _text(row, "problem", ctx), answer, _math_meta(row, ctx, row_level))
  return read


def _read_numina(row: dict, ctx: RowContext) -> EvalProblem | str:
  """NuminaMath rows (problem, solution): the answer is the solution's last \\boxed{}, kept when it is a plain
  integer; the id is the row's index in the file (so a run's held-out rows can be named)."""
  problem = _text(row, "problem", ctx)
  boxed = extract_answer(_text(row, "solution", ctx))
  if boxed is None:
    return "no boxed answer"
  if not _PLAIN_INTEGER.fullmatch(boxed.strip()):
    return "non-integer answer"
  return EvalProblem(str(ctx.index), problem, int(boxed.strip()), {"row": ctx.index})


def _read_math500(row: dict, ctx: RowContext) -> EvalProblem | str:
  answer = row.get("answer")
  if isinstance(answer, int) and not isinstance(answer, bool):
    answer = str(answer)
  answer = _text({"answer": answer}, "answer", ctx).strip()
  return EvalProblem(_math_id(row, ctx), _text(row, "problem", ctx), answer, _math_meta(row, ctx, _level(row, ctx)))


@dataclasses.dataclass(frozen=True)
class SetSpec:
  hub: str | None  # default source; None: `path` is required
  split: str  # Hub split
  grader: Grader
  read: Callable[[dict, RowContext], EvalProblem | str]  # a problem, or why the set leaves the row out
  about: str


# Every set's `modulo` is None: AIME answers are already 0..999 (checked on load), AMC's rewritten answers are
# exact integers that may be negative or above 999, MATH's are the book's answers.
SETS: dict[str, SetSpec] = {
    "aime": SetSpec("AI-MO/aimo-validation-aime", "train", Grader("integer"), _read_aime,
                    "AIME 2022-2024 I and II, 90 problems; answer a string, maybe zero-padded"),
    "amc": SetSpec("AI-MO/aimo-validation-amc", "train", Grader("integer"), _read_amc,
                   "AMC12 2022-2023 rewritten to integer answers, 83 problems; answer a float, kept exactly"),
    "math_l4": SetSpec(None, "test", Grader("integer"), _math_level(4),
                       "MATH test level 4 with plain-integer answers (744 of 1214 in the 5000-problem test set)"),
    "math_l5": SetSpec(None, "test", Grader("integer"), _math_level(5),
                       "MATH test level 5 with plain-integer answers (719 of 1324 in the 5000-problem test set)"),
    "numina": SetSpec(None, "train", Grader("integer"), _read_numina,
                      "NuminaMath-format rows (problem, solution with a \\boxed{} integer), e.g. sample:tir; ids are "
                      "row indices"),
    "math500": SetSpec("HuggingFaceH4/MATH-500", "test", Grader("math"), _read_math500,
                       "OpenAI's 500-problem MATH split, every answer, graded with math-verify"),
}


def parse_problem_ids(value: str | Sequence[str]) -> list[str]:
  """"ID,ID,..." (or a sequence of ids) as a list; an empty id is an error."""
  ids = [p.strip() for p in value.split(",")] if isinstance(value, str) else [str(p).strip() for p in value]
  if not ids or any(not p for p in ids):
    raise ValueError(f"--problems takes ids separated by commas, got {value!r}")
  return ids


def _select(items: list[EvalProblem], name: str, limit: int | None,
            problems: str | Sequence[str] | None) -> list[EvalProblem]:
  if problems is not None:
    wanted = parse_problem_ids(problems)
    known = {p.id for p in items}
    unknown = [p for p in wanted if p not in known]
    if unknown:
      ids = [p.id for p in items]
      shown = ", ".join(ids[:50]) + (f", ... ({len(ids)} in all)" if len(ids) > 50 else "")
      raise ValueError(f"{name}: unknown problem ids {unknown}; valid ids: {shown}")
    chosen = set(wanted)
    items = [p for p in items if p.id in chosen]
  if limit is not None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
      raise ValueError(f"--limit must be a positive integer, got {limit!r}")
    items = items[:limit]
  return items


def load_eval_set(name: str, *, path: str | None = None, split: str | None = None, limit: int | None = None,
                  problems: str | Sequence[str] | None = None) -> EvalSet:
  """One validation set, in file order.

  `path`: a local .parquet/.jsonl/.json file or directory, "hf:DIR" for a local dataset laid out like a Hub repo,
  or a Hub id; default the set's Hub dataset (none for math_l4/math_l5: give the MATH test jsonl or a Hub id).
  `split`: the Hub split (default the set's). `problems`: ids ("ID,ID" or a list), kept in file order; an unknown
  id is an error listing the valid ones. `limit`: the first N (after `problems`). A malformed row is a BadRowError
  naming the source, the row (0-based, in file order) and the field.
  """
  if name not in SETS:
    raise ValueError(f"unknown evaluation set {name!r}; known: {sorted(SETS)}")
  spec = SETS[name]
  source = path if path is not None else spec.hub
  if not source:
    raise ValueError(f"{name}: give path= (--path): the MATH test set as jsonl, e.g. "
                     "shared/data/eval/math/math-test-5000.jsonl, or a Hub id in its format")
  rows = open_source(SourceSpec(str(source), split=split or spec.split))
  items: list[EvalProblem] = []
  excluded: Counter = Counter()
  seen: dict[str, int] = {}
  count = 0
  for index, row in enumerate(rows.iter_rows()):
    count += 1
    ctx = RowContext(rows.name, index)
    if isinstance(row, BadLine):
      raise ctx.error(None, row.message, "bad_json")
    if not isinstance(row, dict):
      raise ctx.error(None, f"expected an object, got {type(row).__name__}", "not_an_object")
    result = spec.read(row, ctx)
    if isinstance(result, str):
      excluded[result] += 1
      continue
    if result.id in seen:
      raise ctx.error("id", f"problem id {result.id!r} already names row {seen[result.id]}", "duplicate_id")
    seen[result.id] = index
    items.append(result)
  return EvalSet(name, rows.name, tuple(_select(items, name, limit, problems)), spec.grader, dict(excluded), count)


def held_out_set(data_cfg, limit: int | None = None) -> EvalSet:
  """The problems a training run held out of its NuminaMath-format train sources (data.eval_size), as the "numina"
  set: what the trainer's SC-TIR at the end of a stage evaluates. Rows whose answer is not a boxed integer are left
  out (counted in `excluded`); `limit` keeps the first N."""
  from numina_jax.data.pipeline import held_out_rows  # the data pipeline (grain) only for this set
  parts = [(spec, rows) for spec, rows in held_out_rows(data_cfg) if len(rows)]
  if not parts:
    raise ValueError("no held-out rows to evaluate: set data.eval_size > 0 (and no data.eval_dataset_name)")
  problems, excluded, sources, count = [], Counter(), [], 0
  for spec, rows in parts:
    full = load_eval_set("numina", path=spec.name, split=spec.split)
    by_id = {p.id: p for p in full.problems}
    keep = [by_id[str(i)] for i in rows if str(i) in by_id]
    if len(rows) > len(keep):
      excluded["not a boxed integer"] += len(rows) - len(keep)
    prefix = f"{spec.name}/" if len(parts) > 1 else ""
    problems += [dataclasses.replace(p, id=prefix + p.id) for p in keep]
    sources.append(full.source)
    count += len(rows)
  problems = problems[:limit] if limit else problems
  return EvalSet("held-out", ", ".join(sources), tuple(problems), SETS["numina"].grader, dict(excluded), count)


# ----------------------------------------------------------------------------------------------------------------
# Flags, shared with the evaluation CLI.


def add_eval_set_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--path", default=None,
                      help="local .parquet/.jsonl file or directory, hf:DIR, or a Hub id (default: the set's Hub "
                           "dataset; required for math_l4/math_l5)")
  parser.add_argument("--split", default=None, help="Hub split (default: the set's)")
  parser.add_argument("--limit", type=int, default=None, help="only the first N problems, in file order")
  parser.add_argument("--problems", default=None, help="only these problem ids, comma-separated")


def eval_set_from_flags(name: str, args: argparse.Namespace) -> EvalSet:
  return load_eval_set(name, path=args.path, split=args.split, limit=args.limit, problems=args.problems)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m numina_jax.eval.datasets",
      description="Load a validation set and list its problems and answers (checks a file before an evaluation).",
      epilog="\n".join(f"  {k:8s} {v.about}" for k, v in SETS.items()),
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("set", choices=sorted(SETS), help="which set")
  add_eval_set_flags(parser)
  parser.add_argument("--show", type=int, default=10, help="problems to list (default 10; 0 for none)")
  args = parser.parse_args(argv)
  try:
    s = eval_set_from_flags(args.set, args)
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  left_out = ", ".join(f"{k} {v}" for k, v in sorted(s.excluded.items())) or "none"
  print(f"{s.name}: {len(s)} problems from {s.source} ({s.rows} rows; left out: {left_out}); "
        f"graded as {s.grader.kind}, modulo {s.modulo}")
  for p in s.problems[:max(args.show, 0)]:
    print(f"  {p.id}\t{p.answer}\t{' '.join(p.text.split())[:80]}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
