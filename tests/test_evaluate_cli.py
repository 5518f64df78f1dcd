"""`python -m numina_jax.evaluate` end to end: a scripted model, the real sandbox, every output file checked."""

import json

import pytest

from numina_jax import evaluate
from scripted_sampler import ScriptedSampler

URL = "https://artofproblemsolving.com/wiki/index.php/2024_AIME_I_Problems/Problem_{}"
IDS = ["2024_AIME_I_1", "2024_AIME_I_2", "2024_AIME_I_3"]


def call(code):
  return f"<|channel|>analysis to=python code<|message|>{code}<|call|>"


def final(text):
  return f"<|channel|>final<|message|>{text}<|return|>"


SCRIPT = {
    # Problem 1 (gold 42): three traces agree, two after running python.
    (IDS[0], 0, 1): call("print(6 * 7)"), (IDS[0], 0, 2): final("\\boxed{42}"),
    (IDS[0], 1, 1): final("\\boxed{042}"),
    (IDS[0], 2, 1): call("print(40 + 2)"), (IDS[0], 2, 2): final("So \\boxed{42}."),
    # Problem 2 (gold 7): 7 and 8 tie; the vote is 8 (first in trace order), scored 0.5.
    (IDS[1], 0, 1): final("\\boxed{8}"), (IDS[1], 1, 1): final("\\boxed{7}"),
    (IDS[1], 2, 1): call("1 / 0"), (IDS[1], 2, 2): final("no box"),
    # Problem 3 (gold 100): no answers: one calls python in every round, one is malformed, one runs out of tokens.
    (IDS[2], 0, 1): call("print(1)"), (IDS[2], 0, 2): call("print(2)"), (IDS[2], 0, 3): call("print(3)"),
    (IDS[2], 1, 1): "<|channel|>analysis<|message|>print(1)<|call|>",
    (IDS[2], 2, 1): "<|channel|>analysis<|message|>" + "think " * 400,
}


@pytest.fixture
def aime(tmp_path):
  path = tmp_path / "aime.jsonl"
  rows = [{"id": i, "problem": f"AIME problem {i + 1}.", "answer": a, "url": URL.format(i + 1)}
          for i, a in enumerate(["042", "7", "100"])]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _argv(aime, out, *extra):
  return ["--set", "aime", "--path", str(aime), "--samples", "3", "--rounds", "3", "--tokenizer", "demo",
          "--max-tokens-per-round", "300", "--sandbox-workers", "2", "--out", str(out), *extra]


def test_end_to_end(tok, aime, tmp_path, capsys):
  out = tmp_path / "eval"
  sampler = ScriptedSampler(tok, SCRIPT, IDS, samples=3, rounds=3, seed=5)
  assert evaluate.main(_argv(aime, out, "--seed", "5", "--reasoning-effort", "low"), sampler=sampler) == 0
  stdout = capsys.readouterr().out

  # traces.jsonl: every trace, with its text, token counts, tool calls and outputs.
  lines = [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines()]
  assert [(r["problem"], r["trace"]) for r in lines] == [(p, i) for p in IDS for i in range(3)]
  by = {(r["problem"], r["trace"]): r for r in lines}
  first = by[(IDS[0], 0)]
  assert (first["gold"], first["finish"], first["answer"], first["correct"]) == (42, "stop", "42", True)
  (tc,) = first["tool_calls"]
  assert (tc["code"], tc["status"], tc["output"], tc["round"]) == ("print(6 * 7)", "ok", "42\n", 1)
  assert [r["tokens"] for r in first["rounds"]] == [len(tok.encode(call("print(6 * 7)"), add_special_tokens=False)),
                                                    len(tok.encode(final("\\boxed{42}"), add_special_tokens=False))]
  assert first["generated_tokens"] == sum(r["tokens"] for r in first["rounds"])
  assert first["text"].startswith(call("print(6 * 7)") + "<|start|>python to=assistant")
  assert tok.decode(first["token_ids"][first["prompt_tokens"]:]) == first["text"]
  assert "Reasoning: low" in tok.decode(first["token_ids"][:first["prompt_tokens"]])
  assert by[(IDS[1], 2)]["tool_calls"][0]["status"] == "error"
  assert "ZeroDivisionError" in by[(IDS[1], 2)]["tool_calls"][0]["output"]
  assert [by[(IDS[2], i)]["finish"] for i in range(3)] == ["max_rounds", "malformed", "length"]
  assert by[(IDS[0], 1)]["answer"] == "042" and by[(IDS[0], 1)]["correct"]

  # summary.json: metrics, config, backend, timing.
  summary = json.loads((out / "summary.json").read_text())
  m = summary["metrics"]
  assert (m["num_problems"], m["n"]) == (3, 3)
  assert m["maj_at"]["3"] == pytest.approx((1 + 0.5 + 0) / 3)
  assert m["pass_at"]["3"] == pytest.approx(2 / 3)
  assert m["mean_at_1"] == pytest.approx((3 / 3 + 1 / 3 + 0) / 3)
  assert m["no_answer_rate"] == pytest.approx(4 / 9)
  assert m["finish"] == {"stop": 6, "max_rounds": 1, "malformed": 1, "length": 1}
  assert m["tool_calls_per_trace"] == pytest.approx(5 / 9)
  assert [(p["id"], p["majority"], p["maj"]) for p in m["problems"]] == [(IDS[0], "42", 1.0), (IDS[1], "8", 0.5),
                                                                         (IDS[2], None, 0.0)]
  assert summary["set"]["name"] == "aime" and summary["set"]["problems"] == 3
  assert summary["config"]["samples"] == 3 and summary["config"]["seed"] == 5
  assert summary["config"]["reasoning_effort"] == "low" and "sandboxed Python" in summary["config"]["tool_description"]
  assert summary["backend"] == {"kind": "ScriptedSampler", "tokenizer": "demo"}
  assert summary["timing"]["sampler_requests"] == len(sampler.requests) == 3
  assert summary["timing"]["python_calls"] == 5
  assert summary["timing"]["generated_tokens"] == sum(r["generated_tokens"] for r in lines)

  # maj_at_k.png: a real PNG.
  import matplotlib.image
  png = out / "maj_at_k.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert matplotlib.image.imread(str(png)).shape[:2] == (480, 720)

  # The table at the end: id, gold, vote, votes for it / N, correct, tool calls, no answer.
  table = stdout.splitlines()
  head = table.index(next(line for line in table if line.startswith("id")))
  assert table[head].split() == ["id", "gold", "vote", "votes", "correct", "tool", "calls", "no", "answer"]
  assert table[head + 1].split() == [IDS[0], "42", "42", "3/3", "yes", "2", "0"]
  assert table[head + 2].split() == [IDS[1], "7", "8", "1/3", "0.50", "1", "1"]
  assert table[head + 3].split() == [IDS[2], "100", "-", "0/3", "no", "2", "3"]
  assert "maj@3 50.0%" in stdout

  # Results already there are not overwritten by accident.
  assert evaluate.main(_argv(aime, out), sampler=sampler) == 2
  assert "already holds summary.json, traces.jsonl, maj_at_k.png; pass --overwrite" in capsys.readouterr().err
  assert len((out / "traces.jsonl").read_text().splitlines()) == 9


def test_outputs_to_a_bucket(tok, aime, gcs_bucket, capsys):
  from numina_jax import storage
  out = f"{gcs_bucket}/eval/aime"
  sampler = ScriptedSampler(tok, SCRIPT, IDS, samples=3, rounds=3)
  assert evaluate.main(_argv(aime, out, "--limit", "1"), sampler=sampler) == 0, capsys.readouterr().err
  lines = storage.read_text(f"{out}/traces.jsonl").splitlines()
  assert [json.loads(line)["answer"] for line in lines] == ["42", "042", "42"]
  assert json.loads(storage.read_text(f"{out}/summary.json"))["metrics"]["maj_at"]["3"] == 1.0
  assert storage.path(f"{out}/maj_at_k.png").read_bytes()[:4] == b"\x89PNG"
  assert evaluate.main(_argv(aime, out, "--limit", "1"), sampler=sampler) == 2
  assert "already holds" in capsys.readouterr().err


def test_limit_and_problems(tok, aime, tmp_path, capsys):
  sampler = ScriptedSampler(tok, SCRIPT, IDS, samples=3, rounds=3)
  assert evaluate.main(_argv(aime, tmp_path / "o", "--problems", IDS[1]), sampler=sampler) == 0
  summary = json.loads((tmp_path / "o" / "summary.json").read_text())
  assert [p["id"] for p in summary["metrics"]["problems"]] == [IDS[1]]
  assert evaluate.main(_argv(aime, tmp_path / "o2", "--problems", "nope"), sampler=sampler) == 1
  assert "unknown problem ids ['nope']" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--samples", "0"], "argument --samples: must be >= 1"),
    (["--top-p", "0"], "argument --top-p: must be > 0"),
    (["--temperature", "hot"], "argument --temperature: expected a number"),
    (["--max-output-chars", "10"], "argument --max-output-chars: must be >= 50"),
    (["--reasoning-effort", "max"], "argument --reasoning-effort: invalid choice"),
    (["--mesh", "fsdp"], "argument --mesh: mesh entries look like fsdp=4"),
    (["--set", "gsm8k"], "argument --set: invalid choice"),
])
def test_bad_flag_values(aime, tmp_path, capsys, extra, message):
  with pytest.raises(SystemExit) as e:
    evaluate.main(_argv(aime, tmp_path / "o", *extra), sampler=object())
  assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--set", "aime", "--out", "o"], "give exactly one of --checkpoint DIR, --hf DIR or --server URL"),
    (["--set", "aime", "--out", "o", "--hf", "a", "--server", "http://x"], "(got --hf, --server)"),
    (["--set", "aime", "--out", "o", "--server", "http://x"], "--tokenizer: required with --server"),
    (["--set", "aime", "--out", "o", "--checkpoint", "c"], "--tokenizer: required with --checkpoint"),
    (["--set", "aime", "--out", "o", "--server", "x:8000", "--tokenizer", "demo"], "--server: URLs start with"),
    (["--set", "aime", "--out", "o", "--hf", "a", "--model", "m"], "--model names a served model"),
    (["--set", "aime", "--out", "o", "--hf", "a", "--step", "3"], "--step goes with --checkpoint"),
    (["--set", "aime", "--out", "o", "--hf", "a", "--user-template", "no slot"], "--user-template: must contain"),
    (["--set", "aime", "--out", "o", "--hf", "a", "--temperature", "0"], "--temperature: 0 (greedy)"),
])
def test_bad_flag_combinations(capsys, argv, message):
  assert evaluate.main(argv) == 2
  assert message in capsys.readouterr().err


def test_help_lists_sets_and_outputs(capsys):
  with pytest.raises(SystemExit):
    evaluate.main(["--help"])
  text = capsys.readouterr().out
  assert "--checkpoint" in text and "math_l5" in text and "traces.jsonl" in text and "maj_at_k.png" in text


@pytest.mark.slow
def test_checkpoint_backend_end_to_end(aime, tmp_path, capsys):
  """A tiny random gpt-oss saved as an Orbax checkpoint, sampled in this process on an 8-device mesh. Its tokens
  are noise, so traces end by length or as malformed; the point is the wiring from flags to files. One round: each
  new prompt length compiles the sampler's steps again."""
  from helpers import random_params
  from numina_jax.checkpoint import save_params
  from numina_jax.data import DEMO_VOCAB_SIZE
  from numina_jax.model.config import tiny_config
  cfg = tiny_config(vocab_size=DEMO_VOCAB_SIZE)
  save_params(str(tmp_path / "ckpt"), random_params(cfg), cfg, step=7)
  out = tmp_path / "out"
  argv = ["--checkpoint", str(tmp_path / "ckpt"), "--tokenizer", "demo", "--mesh", "fsdp=4,tensor=2",
          "--dtype", "float32", "--max-len", "1024", "--max-batch", "4", "--set", "aime", "--path", str(aime),
          "--limit", "2", "--samples", "2", "--rounds", "1", "--max-tokens-per-round", "8", "--temperature", "0.7",
          "--out", str(out)]
  assert evaluate.main(argv) == 0, capsys.readouterr().err
  assert "2024_AIME_I_1" in capsys.readouterr().out
  lines = [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines()]
  assert [(r["problem"], r["trace"]) for r in lines] == [(p, i) for p in IDS[:2] for i in range(2)]
  for r in lines:
    assert r["finish"] in ("length", "malformed", "stop", "max_rounds", "unknown_tool")
    assert r["rounds"][0]["max_tokens"] == 8 and 1 <= r["rounds"][0]["tokens"] <= 8
    assert all(0 <= t < DEMO_VOCAB_SIZE for t in r["token_ids"]) and r["prompt_tokens"] > 100
  summary = json.loads((out / "summary.json").read_text())
  assert summary["backend"]["kind"] == "checkpoint" and summary["backend"]["mesh"] == {
      "data": 1, "fsdp": 4, "expert": 1, "tensor": 2}
  assert summary["config"]["max_context"] == 1024 and summary["metrics"]["n"] == 2
  assert (out / "maj_at_k.png").exists()
