"""The shipped sample data and demo tokenizer: checked answers, really executed outputs, reproducible files."""

import re

import pytest

from numina_jax.data import DEMO_VOCAB_SIZE, harmony, make_sample
from numina_jax.data import tokenizer as tokenizer_lib
from numina_jax.data.boxed import last_boxed
from numina_jax.data.sources import SAMPLES


@pytest.fixture(scope="module")
def cot():
  return make_sample.read_jsonl(SAMPLES["sample:cot"])


@pytest.fixture(scope="module")
def tir():
  return make_sample.read_jsonl(SAMPLES["sample:tir"])


def test_sizes_and_format(cot, tir):
  total = sum(p.stat().st_size for p in SAMPLES["sample:cot"].parent.iterdir())
  assert total < 2_000_000
  assert len(cot) == make_sample.NUM_COT and len(tir) == make_sample.NUM_TIR
  for rows in (cot, tir):
    assert len({r["problem"] for r in rows}) == len(rows)
    for r in rows:
      assert r["messages"] == [{"content": r["problem"], "role": "user"},
                               {"content": r["solution"], "role": "assistant"}]
  families = ["arithmetic", "power_mod", "gcd", "lcm", "series", "count_multiples", "linear", "binomial", "squares",
              "divisors"]
  assert [r["source"] for r in cot[:10]] == [f"sample_{f}" for f in families]


def _check_answer(problem: str, answer: str) -> None:
  """An independent check of a generated answer, recomputed from the problem text."""
  import math
  nums = [int(x) for x in re.findall(r"-?\d+", problem)]
  value = int(answer)
  if problem.startswith("Compute $("):
    assert (nums[0] + nums[1]) * nums[2] == value
  elif problem.startswith("Compute $"):
    assert nums[0] * nums[1] + nums[2] == value
  elif problem.startswith("What is the remainder"):
    assert pow(nums[0], nums[1], nums[2]) == value
  elif problem.startswith("Find the greatest"):
    assert math.gcd(nums[0], nums[1]) == value
  elif problem.startswith("Find the least"):
    assert math.lcm(nums[0], nums[1]) == value
  elif problem.startswith("What is the sum of the first"):
    n, a, b = nums[0], nums[1], nums[2]
    assert sum(a + k * (b - a) for k in range(n)) == value
  elif problem.startswith("How many integers"):
    lo, hi, p, q = nums
    assert sum(1 for k in range(lo, hi + 1) if k % p == 0 or k % q == 0) == value
  elif problem.startswith("Solve for"):
    m = re.match(r"Solve for \$x\$: \$(\d+)x ([+-]) (\d+) = (-?\d+)\$\.", problem)
    a, sign, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
    assert a * value + (b if sign == "+" else -b) == c
  elif problem.startswith("In how many ways"):
    k, n = nums
    assert math.comb(n, k) == value
  elif problem.startswith("What is the sum of the squares"):
    assert sum(k * k for k in range(1, nums[0] + 1)) == value
  elif problem.startswith("How many positive divisors"):
    assert sum(1 for d in range(1, nums[0] + 1) if nums[0] % d == 0) == value
  else:
    raise AssertionError(f"no checker for {problem!r}")


def test_answers_are_right(cot, tir):
  for r in cot + tir:
    boxed = last_boxed(r["solution"])
    assert boxed is not None and boxed in r["solution"].splitlines()[-1]
    _check_answer(r["problem"], boxed[len("\\boxed{"):-1])


def test_tir_outputs_are_what_the_code_prints(tir):
  for r in tir[:12]:
    segs = harmony.split_solution(r["solution"])
    code = [t for k, t in segs if k == "code"]
    outs = [t for k, t in segs if k == "output"]
    assert len(code) == len(outs) >= 1
    assert [o.rstrip("\n") for o in make_sample.run_blocks(code)] == outs


def test_generation_reproduces_the_shipped_files(cot, tir):
  # Rows depend only on the seed and their index, so a prefix regenerates exactly (code executed again).
  assert make_sample.cot_rows(40) == cot[:40]
  assert make_sample.tir_rows(25, workers=2) == tir[:25]


def test_demo_tokenizer_is_reproducible(cot, tir):
  tok = tokenizer_lib.train_demo_tokenizer(make_sample.tokenizer_corpus(cot + tir))
  assert tok.get_vocab_size() == DEMO_VOCAB_SIZE
  assert tokenizer_lib.demo_tokenizer_json(tok) == tokenizer_lib.DEMO_TOKENIZER_FILE.read_text(encoding="utf-8")
  demo = tokenizer_lib.demo_tokenizer()
  assert tokenizer_lib.vocab_size(demo) == len(demo) == DEMO_VOCAB_SIZE
  assert [demo.convert_ids_to_tokens(i) for i in range(len(harmony.SPECIAL_TOKENS))] == list(harmony.SPECIAL_TOKENS)
  assert (demo.eos_token, demo.pad_token) == ("<|return|>", "<|endoftext|>")
  assert demo.decode(demo("Compute $(61 + 34) \\times 510$.")["input_ids"]) == "Compute $(61 + 34) \\times 510$."


def test_load_tokenizer_names(tmp_path):
  assert len(tokenizer_lib.load_tokenizer("demo")) == DEMO_VOCAB_SIZE
  with pytest.raises(FileNotFoundError, match="tokenizer directory not found: ./no-such-tokenizer"):
    tokenizer_lib.load_tokenizer("./no-such-tokenizer")
  # A tokenizer without the harmony special tokens is refused by name.
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  plain = Tokenizer(models.BPE())
  plain.pre_tokenizer = pre_tokenizers.ByteLevel()
  PreTrainedTokenizerFast(tokenizer_object=plain).save_pretrained(tmp_path)
  with pytest.raises(ValueError, match=r"no single token for the harmony special token <\|startoftext\|>"):
    tokenizer_lib.load_tokenizer(str(tmp_path))
