"""Makes the shipped sample data: generated math problems with checked answers, in NuminaMath's format.

`python -m numina_jax.data.make_sample` writes `sample/cot.jsonl` (chain-of-thought solutions ending in \\boxed{})
and `sample/tir.jsonl` (prose, a ```python fence, the ```output fence holding what that code really printed when run
in a fresh python subprocess, prose and \\boxed{}), then trains the demo tokenizer on them. Problems are templated on
purpose: a model of a few layers learns the templates in a minute or two of CPU, so its loss visibly falls.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from numina_jax.data.boxed import last_boxed
from numina_jax.data.harmony.numina import split_solution
from numina_jax.data.harmony.options import RenderOptions
from numina_jax.data.harmony.rows import row_conversation
from numina_jax.data.harmony.text import render_text
from numina_jax.data.sources import SAMPLE_DIR
from numina_jax.data.tokenizer import DEMO_TOKENIZER_FILE, demo_tokenizer_json, train_demo_tokenizer

NUM_COT = 1000
NUM_TIR = 600
SEED_COT = 20240717
SEED_TIR = 20240718


class Problem:
  """One generated problem: its text, its answer, a CoT solution and the pieces of a TIR solution."""

  def __init__(self, family: str, problem: str, answer: int, cot: list[str], intro: str, code: list[str],
               after: list[str], expect: list[str]):
    self.family, self.problem, self.answer, self.cot = family, problem, answer, cot
    self.intro, self.code, self.after, self.expect = intro, code, after, expect


def _expr_problem(rng: random.Random) -> Problem:
  a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(1, 999)
  if rng.random() < 0.5:
    p = a * b
    ans = p + c
    cot = [f"Multiplication comes before addition, so first ${a} \\times {b} = {p}$.",
           f"Then ${p} + {c} = {ans}$.", f"Therefore, the value is $\\boxed{{{ans}}}$."]
    text, expr = f"Compute ${a} \\times {b} + {c}$.", f"{a} * {b} + {c}"
  else:
    s = a + b
    ans = s * c
    cot = [f"The parentheses come first: ${a} + {b} = {s}$.", f"Then ${s} \\times {c} = {ans}$.",
           f"Therefore, the value is $\\boxed{{{ans}}}$."]
    text, expr = f"Compute $({a} + {b}) \\times {c}$.", f"({a} + {b}) * {c}"
  assert eval(expr) == ans  # the prose and the code agree
  return Problem("arithmetic", text, ans, cot, "We can evaluate the expression directly in Python.",
                 [f"print({expr})"], [f"The expression evaluates to {ans}."], [str(ans)])


def _power_mod(rng: random.Random) -> Problem:
  a, n, m = rng.randint(2, 19), rng.randint(2, 7), rng.randint(3, 29)
  ans = pow(a, n, m)
  steps = [f"We reduce modulo ${m}$ one power at a time.", f"${a}^1 \\equiv {a % m} \\pmod{{{m}}}$."]
  r = a % m
  for k in range(2, n + 1):
    t = r * a
    r = t % m
    steps.append(f"${a}^{k} \\equiv {t} \\equiv {r} \\pmod{{{m}}}$.")
  assert r == ans == (a ** n) % m
  steps.append(f"So the remainder is $\\boxed{{{ans}}}$.")
  text = f"What is the remainder when ${a}^{{{n}}}$ is divided by ${m}$?"
  return Problem("power_mod", text, ans, steps, "Python's three-argument pow computes modular powers.",
                 [f"print(pow({a}, {n}, {m}))"], [f"The remainder is {ans}."], [str(ans)])


def _euclid(a: int, b: int) -> tuple[list[str], int]:
  steps = []
  while b:
    q, r = divmod(a, b)
    steps.append(f"${a} = {q} \\times {b} + {r}$.")
    a, b = b, r
  return steps, a


def _gcd(rng: random.Random) -> Problem:
  g = rng.randint(2, 30)
  a, b = g * rng.randint(2, 40), g * rng.randint(2, 40)
  if a < b:
    a, b = b, a
  steps, ans = _euclid(a, b)
  assert ans == math.gcd(a, b)
  cot = ["We use the Euclidean algorithm."] + steps + [
      f"The last nonzero remainder is ${ans}$, so the greatest common divisor is $\\boxed{{{ans}}}$."]
  text = f"Find the greatest common divisor of ${a}$ and ${b}$."
  return Problem("gcd", text, ans, cot, "We can compute the greatest common divisor with the math module.",
                 [f"import math\nprint(math.gcd({a}, {b}))"], [f"The greatest common divisor is {ans}."], [str(ans)])


def _lcm(rng: random.Random) -> Problem:
  a, b = rng.randint(4, 60), rng.randint(4, 60)
  if a == b:
    b += 1
  steps, g = _euclid(max(a, b), min(a, b))
  ans = a * b // g
  assert ans == math.lcm(a, b)
  cot = [f"First find $\\gcd({a}, {b})$ with the Euclidean algorithm."] + steps + [
      f"So $\\gcd({a}, {b}) = {g}$.", f"Then $\\operatorname{{lcm}}({a}, {b}) = \\frac{{{a} \\times {b}}}{{{g}}} = "
      f"\\frac{{{a * b}}}{{{g}}} = {ans}$.", f"The least common multiple is $\\boxed{{{ans}}}$."]
  text = f"Find the least common multiple of ${a}$ and ${b}$."
  return Problem("lcm", text, ans, cot, "The math module has an lcm function.",
                 [f"import math\nprint(math.lcm({a}, {b}))"], [f"The least common multiple is {ans}."], [str(ans)])


def _series(rng: random.Random) -> Problem:
  a, d, n = rng.randint(-20, 30), rng.randint(1, 12), rng.randint(5, 40)
  last = a + (n - 1) * d
  ans = n * (a + last) // 2
  assert ans == sum(a + k * d for k in range(n))
  terms = ", ".join(str(a + k * d) for k in range(3))
  cot = [f"The first term is ${a}$ and the common difference is ${d}$.",
         f"The ${n}$th term is ${a} + ({n} - 1) \\times {d} = {last}$.",
         f"The sum is $\\frac{{{n}({a} + {last})}}{{2}} = \\frac{{{n * (a + last)}}}{{2}} = {ans}$.",
         f"Therefore, the sum is $\\boxed{{{ans}}}$."]
  text = f"What is the sum of the first ${n}$ terms of the arithmetic sequence ${terms}, \\ldots$?"
  return Problem("series", text, ans, cot, "We add the terms in Python.",
                 [f"print(sum({a} + k * {d} for k in range({n})))"], [f"The sum of the first {n} terms is {ans}."],
                 [str(ans)])


def _count_multiples(rng: random.Random) -> Problem:
  p, q = rng.sample([2, 3, 4, 5, 6, 7, 9, 11, 13], 2)
  big = rng.randint(50, 500)
  l = math.lcm(p, q)
  x, y, z = big // p, big // q, big // l
  ans = x + y - z
  assert ans == sum(1 for k in range(1, big + 1) if k % p == 0 or k % q == 0)
  cot = [f"There are $\\lfloor {big}/{p} \\rfloor = {x}$ multiples of ${p}$.",
         f"There are $\\lfloor {big}/{q} \\rfloor = {y}$ multiples of ${q}$.",
         f"Numbers divisible by both are the multiples of $\\operatorname{{lcm}}({p}, {q}) = {l}$: "
         f"$\\lfloor {big}/{l} \\rfloor = {z}$.",
         f"By inclusion-exclusion, ${x} + {y} - {z} = {ans}$.", f"The answer is $\\boxed{{{ans}}}$."]
  text = f"How many integers from $1$ to ${big}$ are divisible by ${p}$ or ${q}$?"
  code = f"print(sum(1 for k in range(1, {big} + 1) if k % {p} == 0 or k % {q} == 0))"
  return Problem("count_multiples", text, ans, cot, "We can count them directly in Python.", [code],
                 [f"There are {ans} such integers."], [str(ans)])


def _linear(rng: random.Random) -> Problem:
  a, x = rng.randint(2, 12), rng.randint(-30, 30)
  b = rng.randint(-50, 50)
  c = a * x + b
  sign = "+" if b >= 0 else "-"
  cot = [f"{'Subtract' if b >= 0 else 'Add'} ${abs(b)}${'from' if b >= 0 else 'to'} both sides: "
         f"${a}x = {c} {'-' if b >= 0 else '+'} {abs(b)} = {c - b}$.",
         f"Divide both sides by ${a}$: $x = \\frac{{{c - b}}}{{{a}}} = {x}$.", f"So $x = \\boxed{{{x}}}$."]
  assert (c - b) % a == 0 and (c - b) // a == x
  text = f"Solve for $x$: ${a}x {sign} {abs(b)} = {c}$."
  code = f"print([x for x in range(-100, 101) if {a} * x + {b} == {c}])"
  return Problem("linear", text, x, cot, "We search the integers from -100 to 100 for solutions.", [code],
                 [f"The only solution is x = {x}."], [f"[{x}]"])


_CHOICES = (("a committee of {k} people be chosen from a group of {n} people", "ways"),
            ("{k} books be chosen from a shelf of {n} different books", "ways"),
            ("{k} toppings be chosen from a menu of {n} toppings", "ways"))


def _binomial(rng: random.Random) -> Problem:
  n = rng.randint(5, 30)
  k = rng.randint(2, min(6, n - 2))
  ans = math.comb(n, k)
  num = " \\times ".join(str(n - i) for i in range(k))
  den = " \\times ".join(str(i) for i in range(k, 0, -1))
  top = math.prod(n - i for i in range(k))
  cot = [f"The order of choice does not matter, so the count is $\\binom{{{n}}}{{{k}}}$.",
         f"$\\binom{{{n}}}{{{k}}} = \\frac{{{num}}}{{{den}}} = \\frac{{{top}}}{{{math.factorial(k)}}} = {ans}$.",
         f"There are $\\boxed{{{ans}}}$ ways."]
  assert top // math.factorial(k) == ans
  what, _ = rng.choice(_CHOICES)
  text = "In how many ways can " + what.format(k=f"${k}$", n=f"${n}$") + "?"
  return Problem("binomial", text, ans, cot, "We compute the binomial coefficient in Python.",
                 [f"from math import comb\nprint(comb({n}, {k}))"], [f"There are {ans} ways."], [str(ans)])


def _squares(rng: random.Random) -> Problem:
  n = rng.randint(3, 300)
  ans = n * (n + 1) * (2 * n + 1) // 6
  assert ans == sum(k * k for k in range(1, n + 1))
  cot = ["The sum of the first $n$ squares is $\\frac{n(n+1)(2n+1)}{6}$.",
         f"With $n = {n}$: $\\frac{{{n} \\times {n + 1} \\times {2 * n + 1}}}{{6}} = "
         f"\\frac{{{n * (n + 1) * (2 * n + 1)}}}{{6}} = {ans}$.", f"The sum is $\\boxed{{{ans}}}$."]
  text = f"What is the sum of the squares of the first ${n}$ positive integers?"
  return Problem("squares", text, ans, cot, "We add the squares in Python.",
                 [f"print(sum(k ** 2 for k in range(1, {n} + 1)))"], [f"The sum of the squares is {ans}."],
                 [str(ans)])


def _divisors(rng: random.Random) -> Problem:
  while True:
    primes = sorted(rng.sample([2, 3, 5, 7, 11, 13], rng.choice([2, 3])))
    exps = [rng.randint(1, 3) for _ in primes]
    n = math.prod(p ** e for p, e in zip(primes, exps))
    if n <= 5000:
      break
  divs = [d for d in range(1, n + 1) if n % d == 0]
  ans = math.prod(e + 1 for e in exps)
  assert ans == len(divs)
  factored = " \\times ".join(f"{p}^{{{e}}}" for p, e in zip(primes, exps))
  counts = "".join(f"({e} + 1)" for e in exps)
  cot = [f"Factor: ${n} = {factored}$.",
         "A divisor takes each prime to a power from $0$ up to its exponent.",
         f"So there are ${counts} = {ans}$ divisors.", f"The answer is $\\boxed{{{ans}}}$."]
  text = f"How many positive divisors does ${n}$ have?"
  code = [f"divisors = [d for d in range(1, {n} + 1) if {n} % d == 0]\nprint(divisors)", "print(len(divisors))"]
  return Problem("divisors", text, ans, cot, "We list the divisors in Python, then count them.", code,
                 ["Now we count them.", f"{n} has {ans} positive divisors."], [str(divs), str(ans)])


FAMILIES: list[Callable[[random.Random], Problem]] = [
    _expr_problem, _power_mod, _gcd, _lcm, _series, _count_multiples, _linear, _binomial, _squares, _divisors]

# Runs a row's code blocks in one fresh interpreter, in one namespace (the python tool is a stateful notebook),
# capturing each block's stdout separately.
_RUNNER = r"""
import contextlib, io, json, sys
blocks = json.load(sys.stdin)
env = {"__name__": "__main__"}
outs = []
for block in blocks:
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    exec(compile(block, "<cell>", "exec"), env)
  outs.append(buf.getvalue())
json.dump(outs, sys.stdout)
"""


def run_blocks(blocks: list[str], timeout: float = 30.0) -> list[str]:
  """Executes code blocks in a new python process and returns what each printed."""
  proc = subprocess.run([sys.executable, "-I", "-c", _RUNNER], input=json.dumps(blocks), capture_output=True,
                        text=True, timeout=timeout, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"sample code failed:\n{proc.stderr}")
  return json.loads(proc.stdout)


def generate(num: int, seed: int) -> list[Problem]:
  """`num` distinct problems; the i-th depends only on the seed and i, so any prefix reproduces."""
  rng = random.Random(seed)
  seen, out = set(), []
  for _ in range(50 * num):
    if len(out) == num:
      break
    prob = FAMILIES[len(out) % len(FAMILIES)](rng)
    if prob.problem not in seen:
      seen.add(prob.problem)
      out.append(prob)
  if len(out) < num:
    raise RuntimeError(f"only {len(out)} distinct problems after {50 * num} draws; widen the families")
  return out


def _row(problem: str, solution: str, source: str | None) -> dict:
  row = {"source": source} if source is not None else {}
  row.update(problem=problem, solution=solution, messages=[{"content": problem, "role": "user"},
                                                           {"content": solution, "role": "assistant"}])
  return row


def cot_rows(num: int = NUM_COT, seed: int = SEED_COT) -> list[dict]:
  rows = []
  for prob in generate(num, seed):
    solution = "\n".join(prob.cot)
    assert last_boxed(solution) == f"\\boxed{{{prob.answer}}}"
    rows.append(_row(prob.problem, solution, f"sample_{prob.family}"))
  return rows


def tir_rows(num: int = NUM_TIR, seed: int = SEED_TIR, workers: int = 4) -> list[dict]:
  probs = generate(num, seed)
  with ThreadPoolExecutor(workers) as pool:
    outputs = list(pool.map(lambda p: run_blocks(p.code), probs))
  rows = []
  for prob, outs in zip(probs, outputs):
    parts = [prob.intro]
    for code, out, after, expect in zip(prob.code, outs, prob.after, prob.expect):
      out = out.rstrip("\n")
      if out != expect:
        raise AssertionError(f"{prob.problem}: code printed {out!r}, expected {expect!r}")
      parts.append(f"```python\n{code}\n```\n```output\n{out}\n```")
      parts.append(after)
    parts[-1] += f" So the answer is $\\boxed{{{prob.answer}}}$."
    solution = "\n".join(parts)
    segments = split_solution(solution)
    assert [k for k, _ in segments if k != "prose"] == ["code", "output"] * len(prob.code)
    rows.append(_row(prob.problem, solution, None))
  return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def tokenizer_corpus(rows: list[dict]) -> list[str]:
  """Harmony renderings of the rows (the default data config), the text the demo tokenizer learns from."""
  opts = RenderOptions()
  return [render_text(row_conversation(row, opts).messages) for row in rows]


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=Path, default=SAMPLE_DIR, help="directory for cot.jsonl, tir.jsonl, demo_tokenizer.json")
  args = parser.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  cot, tir = cot_rows(), tir_rows()
  write_jsonl(cot, args.out / "cot.jsonl")
  write_jsonl(tir, args.out / "tir.jsonl")
  tok = train_demo_tokenizer(tokenizer_corpus(cot + tir))
  (args.out / DEMO_TOKENIZER_FILE.name).write_text(demo_tokenizer_json(tok), encoding="utf-8")
  sizes = {p.name: p.stat().st_size for p in sorted(args.out.iterdir())}
  print(f"wrote {len(cot)} CoT rows, {len(tir)} TIR rows and the demo tokenizer to {args.out}: {sizes}")


if __name__ == "__main__":
  main()
