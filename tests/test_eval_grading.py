"""Grading: boxed answers, integer normalization, voting and its tie rule, pass@k, maj@k, bootstrap, math-verify."""

import itertools
import math

import numpy as np
import pytest

from numina_jax.data.harmony import numina
from numina_jax.eval import grading
from numina_jax.eval.grading import (Grader, ProblemTraces, Trace, bootstrap_interval, extract_answer, last_boxed,
                                     maj_score, majority_vote, normalize_integer, pass_at_k, sample_sizes,
                                     score_problems, vote_counts)


@pytest.mark.parametrize("text, want", [
    ("so the answer is $\\boxed{5}$.", "5"),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),  # nested braces
    ("first \\boxed{1}, then \\boxed{2}", "2"),  # several boxes: the last, never concatenated
    ("no box here: 42", None),
    ("\\boxed{}", None),  # empty
    ("\\boxed{ 7 }", "7"),
    ("\\boxed {7}", "7"),
    ("\\fbox{8}", "8"),
    ("\\boxedx{9}", None),  # another command
    ("\\boxed{3} and a truncated \\boxed{4", "3"),  # an unclosed box is passed over
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces do not count
    ("\\boxed{\\}}", "\\}"),
    ("\\boxed{\\boxed{5}}", "5"),  # nested boxes: the inner one starts last
    ("\\boxed{a\\\\{b}}", "a\\\\{b}"),  # `\\` is a line break, so the brace after it counts
])
def test_extract_answer(text, want):
  assert extract_answer(text) == want


def test_harmony_uses_the_same_box_rule():
  assert numina.last_boxed is last_boxed
  assert last_boxed("x \\fbox{1} y \\boxed {\\frac{1}{2}} z") == "\\boxed {\\frac{1}{2}}"


@pytest.mark.parametrize("s, want", [
    ("033", 33), ("3.0", 3), ("3.000", 3), ("3.", 3), ("-5", -5), ("+7", 7), ("−5", -5), ("- 5", -5), ("0", 0),
    ("-0", 0), ("000", 0), ("42.", 42), ("1,000", 1000), ("1{,}000", 1000), ("1\\,000", 1000), ("1 000 000", 10**6),
    ("1,000.00", 1000), ("12345678901234567890123", 12345678901234567890123), ("$42$", 42), ("\\$40", 40),
    ("\\(12\\)", 12), ("\\[12\\]", 12), ("{12}", 12), ("\\text{5}", 5), ("\\mathbf{ 6 }", 6), ("\\boxed{12}", 12),
    ("30^\\circ", 30), ("30^{\\circ}", 30), ("30°", 30), ("$30^\\circ$.", 30),
    ("2.5", None), ("3.01", None), ("\\frac{1}{2}", None), ("\\frac{4}{2}", None), ("1e3", None), ("10^3", None),
    ("2^3", None), ("3!", None), ("5\\text{ cm}", None), ("x = 5", None), ("50\\%", None), ("1,2", None),
    ("1,00", None), ("1,000,00", None), ("1,000 000", None), ("", None), (".", None), ("-", None), ("\\text{}", None),
    ("\\text{5} + \\text{3}", None),
    (5, 5), (5.0, 5), (-4.0, -4), (2.5, None), (float("nan"), None), (float("inf"), None), (np.int64(3), 3),
    (np.float64(4.0), 4), (None, None),
])
def test_normalize_integer(s, want):
  got = normalize_integer(s)
  assert got == want and (want is None or type(got) is int)


def test_normalize_integer_rejects_bools_and_other_types():
  with pytest.raises(TypeError, match="bool"):
    normalize_integer(True)
  with pytest.raises(TypeError, match="list"):
    normalize_integer([5])


def test_majority_vote_and_its_tie_rule():
  assert majority_vote([]) is None
  assert majority_vote([None, None]) is None
  assert majority_vote([None, 7, 2, 2]) == 2
  assert majority_vote([3, 5, 5, 3, None]) == 3  # tie: the first in trace order
  assert majority_vote([5, 3, 3, 5]) == 5
  assert vote_counts([None, 4, 1, 4, None, 1, 1]) == [(4, 2), (1, 3)]
  # A `same` relation groups answers; each group is named by its first answer.
  same = lambda a, b: a.lower() == b.lower()  # noqa: E731
  assert vote_counts(["A", "b", "a", "B", "a"], same) == [("A", 3), ("b", 2)]
  assert majority_vote(["b", "A", "a", "B"], same) == "b"


def test_maj_score_averages_over_tied_answers():
  right = lambda a: a == 1  # noqa: E731
  assert maj_score([1, 2, 2, 1], right) == 0.5
  assert maj_score([1, 2, 3, None], right) == pytest.approx(1 / 3)
  assert maj_score([2, 1, 1], right) == 1.0
  assert maj_score([2, 2, 1], right) == 0.0
  assert maj_score([None, None], right) == 0.0
  assert maj_score([], right) == 0.0


def test_pass_at_k_matches_enumeration():
  for n in range(1, 7):
    for c in range(n + 1):
      outcomes = [True] * c + [False] * (n - c)
      for k in range(1, n + 1):
        subsets = list(itertools.combinations(outcomes, k))
        brute = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)
  for bad in ((4, 5, 1), (4, 2, 0), (4, 2, 5), (4, -1, 1)):
    with pytest.raises(ValueError, match="pass@k"):
      pass_at_k(*bad)


def test_sample_sizes():
  assert sample_sizes(1) == [1]
  assert sample_sizes(2) == [1, 2]
  assert sample_sizes(4) == [1, 2, 4]
  assert sample_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
  assert sample_sizes(64) == [1, 2, 4, 8, 16, 32, 64]


def _problems():
  # Problem a: answers 1, 1, 2, 3 (gold 1). Problem b: none, 7, 8, and a box that is no integer (gold 8).
  a = ProblemTraces("a", 1, [Trace("1", tool_calls=2), Trace("1.0", tool_calls=1), Trace("2"), Trace("3")])
  b = ProblemTraces("b", "008", [Trace(None, finish="length"), Trace("7", tool_calls=3, timeouts=1), Trace("$8$"),
                                 Trace("\\frac{16}{2}", tool_calls=2, timeouts=1)])
  return [a, b]


def test_metrics_on_a_hand_case():
  m = score_problems(_problems(), Grader("integer"))
  assert m.num_problems == 2 and m.n == 4
  # maj@1 = mean@1. maj@2, a: pairs {1,1} 1, four mixed pairs with a 1 0.5 each, {2,3} 0 -> 3/6;
  # b (keys -, 7, 8, -): {-,7} 0, {-,8} 1, {-,-} 0, {7,8} 0.5, {7,-} 0, {8,-} 1 -> 2.5/6. maj@4: a 1, b tie 7/8 0.5.
  assert m.maj_at == pytest.approx({1: (2 / 4 + 1 / 4) / 2, 2: (3 / 6 + 2.5 / 6) / 2, 4: (1 + 0.5) / 2})
  # pass@k: a has c=2, b has c=1 of n=4.
  assert m.pass_at == pytest.approx({1: (0.5 + 0.25) / 2, 2: (1 - 1 / 6 + 1 - 3 / 6) / 2, 4: 1.0})
  assert m.maj_at_n == 0.75 and m.pass_at_n == 1.0
  assert m.mean_at_1 == pytest.approx(0.375)
  assert m.no_answer_rate == 1 / 8 and m.invalid_answer_rate == 1 / 8
  assert m.tool_calls_per_trace == 1.0 and m.timeouts == 2 and m.timeouts_per_trace == 0.25
  assert m.finish == {"stop": 7, "length": 1}
  pa, pb = m.problems
  assert (pa.correct, pa.majority, pa.maj, pa.votes) == (2, "1", 1.0, (("1", 2), ("2", 1), ("3", 1)))
  assert (pb.correct, pb.majority, pb.maj, pb.votes) == (1, "7", 0.5, (("7", 1), ("$8$", 1)))
  assert "maj@4 75.0%" in m.summary() and m.to_dict()["problems"][1]["id"] == "b"


def test_modulo_only_when_asked():
  p = [ProblemTraces("p", 33, [Trace("2033"), Trace("-967"), Trace("33")])]
  assert score_problems(p, Grader("integer")).mean_at_1 == pytest.approx(1 / 3)
  assert score_problems(p, Grader("integer", modulo=1000)).mean_at_1 == 1.0
  with pytest.raises(ValueError, match="modulo"):
    Grader("integer", modulo=0)
  with pytest.raises(ValueError, match="kind"):
    Grader("float")


def test_maj_at_k_random_subsets_are_seeded_and_estimate_the_exact_value():
  answers = ["1", "2", "1", "3", "2", "2", "1", None, "4", "1", "2", "5", "2", "3", None, "1"]
  p = [ProblemTraces("p", 1, [Trace(a) for a in answers])]
  keys = [normalize_integer(a) for a in answers]
  exact = np.mean([maj_score([keys[i] for i in c], lambda a: a == 1) for c in itertools.combinations(range(16), 4)])
  assert score_problems(p, Grader(), subsets=math.comb(16, 4)).maj_at[4] == pytest.approx(exact)  # all 1820
  drawn = score_problems(p, Grader(), subsets=1500, seed=1).maj_at[4]  # 1500 random ones
  assert drawn == score_problems(p, Grader(), subsets=1500, seed=1).maj_at[4]
  assert drawn != exact and drawn == pytest.approx(exact, abs=0.04)  # 3 standard errors


def test_every_problem_needs_the_same_number_of_traces():
  with pytest.raises(ValueError, match="problem 'y' has 1 traces, problem 'x' has 2"):
    score_problems([ProblemTraces("x", 1, [Trace("1"), Trace("1")]), ProblemTraces("y", 1, [Trace("1")])], Grader())
  with pytest.raises(ValueError, match="at least one problem"):
    score_problems([], Grader())


def test_bootstrap_interval_is_seeded_and_contains_the_mean():
  values = np.random.default_rng(0).random(40)
  lo, hi = bootstrap_interval(values, seed=3)
  assert (lo, hi) == bootstrap_interval(values, seed=3)
  assert (lo, hi) != bootstrap_interval(values, seed=4)
  assert lo < values.mean() < hi and hi - lo < 0.4
  assert bootstrap_interval([0.5] * 7) == (0.5, 0.5)
  m = score_problems([ProblemTraces(str(i), 1, [Trace(str(i % 2 + j % 2)) for j in range(3)]) for i in range(9)],
                     Grader(), seed=5)
  assert m.mean_at_1_ci[0] <= m.mean_at_1 <= m.mean_at_1_ci[1]


def test_math_verify_equivalences():
  g = Grader("math")
  assert g.is_correct("0.5", "\\frac{1}{2}")
  assert g.is_correct("\\frac{\\sqrt2}{2}", "\\sqrt{2}/2")
  assert g.is_correct("\\frac{10}{2}", "5")
  assert g.is_correct("(3,\\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)")
  assert not g.is_correct("3", "\\left( 3, \\frac{\\pi}{2} \\right)")
  assert not g.is_correct("\\frac{1}{3}", "\\frac{1}{2}")
  assert not g.is_correct(None, "1")
  assert g.is_correct("1,000", "1000")  # the integer fast path
  # Integer sets take integers only.
  assert not Grader("integer").is_correct("\\frac{10}{2}", 5)
  with pytest.raises(ValueError, match="not an integer"):
    Grader("integer").is_correct("5", "\\frac{1}{2}")


def test_math_votes_group_equivalent_answers():
  g = Grader("math")
  answers = ["\\frac{1}{2}", "2", "0.5", None, "\\frac{2}{4}", "\\text{}"]
  assert g.vote_keys(answers) == [0, 1, 0, None, 0, None]
  m = score_problems([ProblemTraces("p", "1/2", [Trace(a) for a in answers])], g)
  assert m.problems[0].majority == "\\frac{1}{2}" and m.problems[0].correct == 3
  assert m.no_answer_rate == 1 / 6 and m.invalid_answer_rate == 1 / 6


def test_trace_order_not_arrival_order_decides_ties():
  # The same votes in another trace order pick another winner, and the tie score does not move.
  fwd = score_problems([ProblemTraces("p", 5, [Trace("5"), Trace("6")])], Grader())
  rev = score_problems([ProblemTraces("p", 5, [Trace("6"), Trace("5")])], Grader())
  assert (fwd.problems[0].majority, rev.problems[0].majority) == ("5", "6")
  assert fwd.maj_at_n == rev.maj_at_n == 0.5
  assert grading.GRADER_KINDS == ("integer", "math")
