"""Grading of sampled solutions: the boxed answer, integer normalization, majority voting, and the SC-TIR metrics
(maj@k, pass@k, mean@1 with a bootstrap interval, no-answer rate, tool calls and timeouts per trace).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import numbers
import re
from collections import Counter
from typing import Any, Callable, Hashable, Sequence

import numpy as np

from numina_jax.data.boxed import closing_brace, last_boxed

# ----------------------------------------------------------------------------------------------------------------
# The answer of a message.

def extract_answer(text: str) -> str | None:
  """The answer of a final message: the content of its last brace-matched `\\boxed{}` (or `\\fbox{}`), stripped.

  Several boxes: the last one (they are never concatenated). No box, or an empty last box: None. Nested braces are
  matched, escaped braces ignored; see `last_boxed` for which box is last.
  """
  box = last_boxed(text)
  if box is None:
    return None
  answer = box[box.index("{") + 1:-1].strip()
  return answer or None


# ----------------------------------------------------------------------------------------------------------------
# Integers.

_WRAPPER = re.compile(r"^(?:\\(?:text|textrm|textbf|mathrm|mathbf|mbox|boxed|fbox)\s*)?\{")
_DEGREES = re.compile(r"(?:\^\s*\{?\s*\\circ\s*\}?|°|\\degree)$")
# A decimal integer, or one in groups of three with one separator used throughout ("1,000", "1{,}000", "1\,000",
# "1 000"); then an optional all-zero fraction ("3.0", "3.", "1,000.00").
_INTEGER = re.compile(r"(?P<sign>[+-]?)\s*(?P<digits>\d{1,3}(?P<sep>,|\{,\}|\\,|\\ | |~)\d{3}(?:(?P=sep)\d{3})*|\d+)"
                      r"(?:\.0*)?")


def _strip_layout(s: str) -> str:
  """Takes off what does not change a number: math delimiters, dollar signs, a wrapping \\text{} or {}, a degree
  sign, a sentence's full stop; repeated until nothing changes."""
  previous = None
  while s != previous:
    previous = s
    s = s.strip().replace("−", "-")
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
      if s.startswith(left) and s.endswith(right):
        s = s[len(left):-len(right)]
    s = s.replace("\\$", "").replace("$", "").replace("\\displaystyle", "")
    m = _WRAPPER.match(s)
    if m and closing_brace(s, m.end() - 1) == len(s) - 1:
      s = s[m.end():-1]
    s = _DEGREES.sub("", s.strip())
    if s.endswith("."):
      s = s[:-1]
  return s


def normalize_integer(s: str | int | float | None) -> int | None:
  """The integer an answer writes, or None when it does not write one. Never rounds, never evaluates.

  Accepted: an optional sign (`+7` is 7, `-5` and `−5` are -5), leading zeros (`033` is 33), an all-zero fraction
  (`3.0`, `3.`), thousands in groups of three with one separator (`1,000`, `1{,}000`, `1\\,000`, `1 000`), and
  around it `$`/`\\$`, `\\(..\\)`, `\\[..\\]`, a wrapping `\\text{}`/`\\mathrm{}`/`\\mathbf{}`/`\\boxed{}`/`{}`, a
  trailing full stop, and a degree sign (`30^\\circ`, `30^{\\circ}`, `30°`).
  None: non-integers (`2.5`, `\\frac{1}{2}` even `\\frac{4}{2}`), expressions (`2^3`, `1e3`, `10^3`, `3!`), units
  and words (`5 \\text{cm}`, `x = 5`: which words are units is not guessed), percent (`50\\%`), lists (`1,2`),
  separators in wrong places (`1,00`). Python ints and integer-valued floats pass through (`5.0` is 5); a float
  with a fraction, NaN or infinity is None.
  """
  if s is None:
    return None
  if isinstance(s, bool):
    raise TypeError(f"normalize_integer takes a string or a number, got the bool {s!r}")
  if isinstance(s, numbers.Integral):
    return int(s)
  if isinstance(s, numbers.Real):
    f = float(s)
    return int(f) if math.isfinite(f) and f.is_integer() else None
  if not isinstance(s, str):
    raise TypeError(f"normalize_integer takes a string or a number, got {type(s).__name__}")
  m = _INTEGER.fullmatch(_strip_layout(s))
  if m is None:
    return None
  digits = m["digits"].replace(m["sep"], "") if m["sep"] else m["digits"]
  value = int(digits)
  return -value if m["sign"] == "-" else value


# ----------------------------------------------------------------------------------------------------------------
# Voting.


def vote_counts(answers: Sequence[Any], same: Callable[[Any, Any], bool] | None = None) -> list[tuple[Any, int]]:
  """The distinct answers (None ignored) with their vote counts, in order of first appearance.

  `same(a, b)` groups answers that are equal without being `==` (math-verify equivalence); an answer joins the first
  group, in order of appearance, whose first answer it is `same` as.
  """
  groups: list[list[Any]] = []
  if same is None:
    index: dict[Hashable, int] = {}
    for a in answers:
      if a is None:
        continue
      if a not in index:
        index[a] = len(groups)
        groups.append([a, 0])
      groups[index[a]][1] += 1
  else:
    for a in answers:
      if a is None:
        continue
      for g in groups:
        if same(g[0], a):
          g[1] += 1
          break
      else:
        groups.append([a, 1])
  return [(a, n) for a, n in groups]


def tied_answers(answers: Sequence[Any], same: Callable[[Any, Any], bool] | None = None) -> list[Any]:
  """The answers with the most votes (None ignored), in order of first appearance; [] when there are none."""
  counts = vote_counts(answers, same)
  if not counts:
    return []
  best = max(n for _, n in counts)
  return [a for a, n in counts if n == best]


def majority_vote(answers: Sequence[Any], same: Callable[[Any, Any], bool] | None = None) -> Any:
  """The most frequent answer, ignoring None; None when no trace answered.

  Tie rule: of the answers tied for the most votes, the one that appears first in `answers`. Pass answers in trace
  index order (trace 0, 1, ...), never in the order traces finished, so the vote does not depend on timing. For
  scoring, `maj_score` does not pick: it averages over the tied answers.
  """
  tied = tied_answers(answers, same)
  return tied[0] if tied else None


def maj_score(answers: Sequence[Any], is_correct: Callable[[Any], bool],
              same: Callable[[Any, Any], bool] | None = None) -> float:
  """Majority-vote score of one problem: the mean of `is_correct` over the answers tied for the most votes
  (NeMo-Skills' rule: a 2-2 tie between a right and a wrong answer scores 0.5); 0.0 when no trace answered."""
  tied = tied_answers(answers, same)
  return sum(bool(is_correct(a)) for a in tied) / len(tied) if tied else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Comparing answers.

GRADER_KINDS = ("integer", "math")


@functools.lru_cache(maxsize=4096)
def _math_parse(answer: str, timeout_s: int | None) -> tuple:
  from math_verify import parse  # sympy: heavy, and only for non-integer answers
  # Inside \boxed{} so math-verify reads the whole answer as one LaTeX expression (bare `\sqrt{2}/2` finds nothing).
  return tuple(parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout_s))


@dataclasses.dataclass(frozen=True)
class Grader:
  """How one set compares answers.

  "integer": both sides through `normalize_integer`, equal as ints; `modulo` (None for every set here) takes both
  `% modulo` first, only for a set whose task asks for it. An answer that is not an integer is invalid (wrong).
  "math": equal ints when both sides are integers, else `math_verify.verify(parse(gold), parse(answer))`, each side
  read as the content of a `\\boxed{}`; an answer math-verify cannot parse is invalid. math-verify's time limits use
  SIGALRM, so with `timeout_s` set, grade on the main thread (or pass None).
  """

  kind: str = "integer"
  modulo: int | None = None
  timeout_s: int | None = 5

  def __post_init__(self):
    if self.kind not in GRADER_KINDS:
      raise ValueError(f"grader kind must be one of {GRADER_KINDS}, got {self.kind!r}")
    if self.modulo is not None and (isinstance(self.modulo, bool) or not isinstance(self.modulo, int)
                                    or self.modulo < 1):
      raise ValueError(f"modulo must be None or a positive int, got {self.modulo!r}")

  def integer(self, answer) -> int | None:
    value = normalize_integer(answer)
    if value is not None and self.modulo is not None:
      value %= self.modulo
    return value

  def _parsed(self, answer: str) -> tuple:
    return _math_parse(str(answer), self.timeout_s)

  def valid(self, answer: str | None) -> bool:
    """Whether an extracted answer can be graded at all (an integer, or for "math" something math-verify parses)."""
    if answer is None:
      return False
    if self.integer(answer) is not None:
      return True
    return self.kind == "math" and bool(self._parsed(answer))

  def equivalent(self, reference, answer) -> bool:
    """`answer` is the same answer as `reference` (the gold answer, or an earlier trace's answer when voting)."""
    if reference is None or answer is None:
      return False
    ref_int, ans_int = self.integer(reference), self.integer(answer)
    if ref_int is not None and ans_int is not None:
      return ref_int == ans_int
    if self.kind == "integer":
      return False
    from math_verify import verify  # as in _math_parse
    ref, ans = self._parsed(reference), self._parsed(answer)
    return bool(ref and ans and verify(list(ref), list(ans), timeout_seconds=self.timeout_s))

  def is_correct(self, answer: str | None, gold) -> bool:
    if self.kind == "integer" and self.integer(gold) is None:
      raise ValueError(f"gold answer {gold!r} is not an integer, but the set is graded as integers")
    return self.equivalent(gold, answer)

  def vote_keys(self, answers: Sequence[str | None]) -> list[Hashable | None]:
    """One key per answer, equal for answers that count as the same vote; None for no or invalid answer.

    "integer": the int itself. "math": answers are grouped in trace order, each joining the first group whose first
    answer it is `equivalent` to (math-verify equivalence is not transitive, so the first answer of a group stands
    for it); the key is that first answer's index.
    """
    if self.kind == "integer":
      return [self.integer(a) if a is not None else None for a in answers]
    keys: list[Hashable | None] = []
    firsts: list[int] = []
    for i, a in enumerate(answers):
      if not self.valid(a):
        keys.append(None)
        continue
      key = next((j for j in firsts if self.equivalent(answers[j], a)), None)
      if key is None:
        firsts.append(i)
        key = i
      keys.append(key)
    return keys


# ----------------------------------------------------------------------------------------------------------------
# Metrics over problems with N traces each.


@dataclasses.dataclass(frozen=True)
class Trace:
  """What grading needs of one sampled trace."""

  answer: str | None  # extract_answer() of its final message; None when it gave none (or was pruned)
  tool_calls: int = 0  # python calls it made
  timeouts: int = 0  # of those, calls stopped by the sandbox's time limit
  finish: str = "stop"  # why sampling ended: "stop" (final message), "length", "max_rounds", "error", ...


@dataclasses.dataclass(frozen=True)
class ProblemTraces:
  """One problem's traces in trace index order (the order the tie rule uses), and its gold answer."""

  id: str
  gold: int | str
  traces: Sequence[Trace]


@dataclasses.dataclass(frozen=True)
class ProblemScore:
  id: str
  gold: int | str
  correct: int  # traces graded right
  majority: str | None  # the voted answer as its first trace wrote it (ties: first in trace order)
  maj: float  # its maj@N score (ties: mean over the tied answers)
  votes: tuple[tuple[str, int], ...]  # each distinct answer (as first written) and its votes, first-seen order


@dataclasses.dataclass(frozen=True)
class Metrics:
  """Scores as fractions in [0, 1]; `n` traces per problem."""

  num_problems: int
  n: int
  maj_at: dict[int, float]  # k -> maj@k, k = 1, 2, 4, ... < n, and n
  pass_at: dict[int, float]  # k -> unbiased pass@k, same ks
  mean_at_1: float  # mean over problems of the fraction of right traces
  mean_at_1_ci: tuple[float, float]  # bootstrap 95% interval over problems
  no_answer_rate: float  # traces without a boxed answer
  invalid_answer_rate: float  # traces whose boxed answer cannot be graded (not an integer, for integer sets)
  tool_calls_per_trace: float
  timeouts: int  # tool calls that timed out, over all traces
  timeouts_per_trace: float
  finish: dict[str, int]  # traces by finish reason
  problems: tuple[ProblemScore, ...]

  @property
  def maj_at_n(self) -> float:
    return self.maj_at[self.n]

  @property
  def pass_at_n(self) -> float:
    return self.pass_at[self.n]

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["problems"] = [dataclasses.asdict(p) for p in self.problems]
    return d

  def summary(self) -> str:
    lo, hi = self.mean_at_1_ci
    ks = sorted(self.maj_at)
    lines = [
        f"{self.num_problems} problems x {self.n} traces",
        f"maj@{self.n} {100 * self.maj_at_n:.1f}%  pass@{self.n} {100 * self.pass_at_n:.1f}%  "
        f"mean@1 {100 * self.mean_at_1:.1f}% (95% CI {100 * lo:.1f}-{100 * hi:.1f})",
        "maj@k  " + "  ".join(f"{k}:{100 * self.maj_at[k]:.1f}" for k in ks),
        "pass@k " + "  ".join(f"{k}:{100 * self.pass_at[k]:.1f}" for k in ks),
        f"no answer {100 * self.no_answer_rate:.1f}%  invalid answer {100 * self.invalid_answer_rate:.1f}%  "
        f"tool calls/trace {self.tool_calls_per_trace:.2f}  timeouts {self.timeouts} "
        f"({self.timeouts_per_trace:.3f}/trace)",
        "finish " + "  ".join(f"{k}:{v}" for k, v in sorted(self.finish.items())),
    ]
    return "\n".join(lines)


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples of which c are right: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021), exact."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
  return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def sample_sizes(n: int) -> list[int]:
  """The k of the maj@k / pass@k curves: powers of two below n, then n."""
  return [2 ** i for i in range(max(n - 1, 0).bit_length()) if 2 ** i < n] + [n]


def _maj_at_k(codes: np.ndarray, right: np.ndarray, k: int, subsets: int, rng: np.random.Generator) -> float:
  """maj@k of one problem: the mean `maj_score` over k-subsets of its traces; all of them when there are at most
  `subsets`, else `subsets` uniform draws. `codes[i]` numbers trace i's vote group (-1: no vote) and `right[g]`
  says whether group g is right; vectorized over subsets, the same rule as `maj_score`."""
  n = len(codes)
  if not len(right):
    return 0.0
  if math.comb(n, k) <= subsets:
    idx = np.array(list(itertools.combinations(range(n), k)))
  else:
    idx = np.argsort(rng.random((subsets, n)), axis=1)[:, :k]  # the first k of a random permutation
  counts_SG = (codes[idx][..., None] == np.arange(len(right))).sum(axis=1)
  best_S1 = counts_SG.max(axis=1, keepdims=True)
  tied_SG = (counts_SG == best_S1) & (best_S1 > 0)
  n_tied_S = tied_SG.sum(axis=1)
  score_S = np.where(n_tied_S > 0, (tied_SG & right).sum(axis=1) / np.maximum(n_tied_S, 1), 0.0)
  return float(score_S.mean())


def bootstrap_interval(values: Sequence[float], *, resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
  """Percentile bootstrap interval of the mean of `values` (problems resampled with replacement)."""
  v = np.asarray(values, dtype=np.float64)
  if v.size == 0:
    raise ValueError("bootstrap_interval needs at least one value")
  idx = np.random.default_rng(seed).integers(0, v.size, size=(resamples, v.size))
  means = v[idx].mean(axis=1)
  tail = 100 * (1 - level) / 2
  lo, hi = np.percentile(means, [tail, 100 - tail])
  return float(lo), float(hi)


def score_problems(problems: Sequence[ProblemTraces], grader: Grader, *, subsets: int = 64, resamples: int = 1000,
                   seed: int = 0) -> Metrics:
  """All metrics of an evaluation run; every problem must have the same number of traces n.

  maj@k for k < n is the mean over k-subsets of each problem's traces (exact when C(n, k) <= `subsets`, else
  `subsets` random subsets from a generator seeded with (seed, problem index, k)); maj@n uses all traces. Each
  vote scores by `maj_score`'s tie rule. A trace is right when its answer's vote group is right (`Grader.vote_keys`),
  so maj@1 equals mean@1. mean@1's interval: `bootstrap_interval` with `resamples` and `seed`.
  """
  if not problems:
    raise ValueError("score_problems needs at least one problem")
  n = len(problems[0].traces)
  for p in problems:
    if len(p.traces) != n or n == 0:
      raise ValueError(f"problem {p.id!r} has {len(p.traces)} traces, problem {problems[0].id!r} has {n}: every "
                       "problem needs the same number (count a pruned trace as one with no answer), at least 1")
  ks = sample_sizes(n)
  maj_at = {k: 0.0 for k in ks}
  pass_at = {k: 0.0 for k in ks}
  per_problem_mean, scores = [], []
  no_answer = invalid = tool_calls = timeouts = 0
  finish: Counter = Counter()
  for pi, p in enumerate(problems):
    answers = [t.answer for t in p.traces]
    keys = grader.vote_keys(answers)
    first: dict[Hashable, int] = {}
    for i, key in enumerate(keys):
      if key is not None:
        first.setdefault(key, i)
    right = {key: grader.is_correct(answers[i], p.gold) for key, i in first.items()}
    c = sum(right[key] for key in keys if key is not None)
    group = {key: g for g, key in enumerate(first)}
    codes = np.array([-1 if key is None else group[key] for key in keys])
    right_G = np.array([right[key] for key in first], dtype=bool)
    maj_n = maj_score(keys, right.__getitem__)
    for k in ks:
      if k == n:
        maj_at[k] += maj_n
      else:
        maj_at[k] += _maj_at_k(codes, right_G, k, subsets, np.random.default_rng((seed, pi, k)))
      pass_at[k] += pass_at_k(n, c, k)
    per_problem_mean.append(c / n)
    winner = majority_vote(keys)
    counts = Counter(key for key in keys if key is not None)
    scores.append(ProblemScore(
        id=p.id, gold=p.gold, correct=c, majority=None if winner is None else answers[first[winner]],
        maj=maj_n,
        votes=tuple((answers[i], counts[key]) for key, i in first.items())))
    for t, a, key in zip(p.traces, answers, keys):
      no_answer += a is None
      invalid += a is not None and key is None
      tool_calls += t.tool_calls
      timeouts += t.timeouts
      finish[t.finish] += 1
  num, total = len(problems), len(problems) * n
  return Metrics(
      num_problems=num, n=n, maj_at={k: v / num for k, v in maj_at.items()},
      pass_at={k: v / num for k, v in pass_at.items()}, mean_at_1=float(np.mean(per_problem_mean)),
      mean_at_1_ci=bootstrap_interval(per_problem_mean, resamples=resamples, seed=seed),
      no_answer_rate=no_answer / total, invalid_answer_rate=invalid / total, tool_calls_per_trace=tool_calls / total,
      timeouts=timeouts, timeouts_per_trace=timeouts / total, finish=dict(finish), problems=tuple(scores))
