"""SC-TIR's rules on scripted traces: a test double of the model, the real sandbox running the code."""

import dataclasses
import hashlib

import pytest

from numina_jax.eval.datasets import EvalProblem
from numina_jax.eval.grading import Grader
from numina_jax.eval.sctir import (SCTIR, SCTIRConfig, run_sctir, sandbox_description, score, trace_seed)
from numina_jax.sandbox import SandboxConfig
from scripted_sampler import ScriptedSampler

DESCRIPTION = "Runs python in a sandbox."  # skips the probe of the sandbox where the text is not the point


def call(code, channel="analysis"):
  return f"<|channel|>{channel} to=python code<|message|>{code}<|call|>"


def final(text):
  return f"<|channel|>final<|message|>{text}<|return|>"


def think(text):
  return f"<|channel|>analysis<|message|>{text}<|end|><|start|>assistant"


def reply(output, channel="analysis"):
  return f"<|start|>python to=assistant<|channel|>{channel}<|message|>{output}<|end|><|start|>assistant"


def run(tok, script, problems=(("p", 42),), **overrides):
  cfg = SCTIRConfig(**{"samples": 1, "rounds": 4, "tool_description": DESCRIPTION, **overrides})
  probs = [EvalProblem(pid, f"Problem {pid}: what is the answer?", gold) for pid, gold in problems]
  sampler = ScriptedSampler(tok, script, [p.id for p in probs], samples=cfg.samples, rounds=cfg.rounds,
                            seed=cfg.seed)
  results = run_sctir(probs, sampler, tok, Grader("integer"), cfg, sandbox_workers=2, progress=False)
  return results, sampler


def test_call_output_final(tok):
  script = {("p", 0, 1): think("Compute it.") + call("print(6 * 7)"), ("p", 0, 2): final("So \\boxed{42}.")}
  (res,), sampler = run(tok, script)
  (t,) = res.traces
  assert (t.finish, t.answer, t.boxed) == ("stop", "42", "42")
  (c,) = t.tool_calls
  assert (c.round, c.recipient, c.code, c.status, c.output, c.truncated) == (1, "python", "print(6 * 7)", "ok", "42\n",
                                                                              False)
  assert 0 < c.wall_s < 5
  # The trace's tokens are the prompt, the completion, the tool reply and <|start|>assistant, then the answer.
  expected = think("Compute it.") + call("print(6 * 7)") + reply("42\n") + final("So \\boxed{42}.")
  assert t.text == expected
  prompt = sampler.prompts[("p", 0, 1)]
  assert list(t.token_ids[:t.prompt_tokens]) == prompt and t.prompt_tokens == len(prompt)
  assert list(t.token_ids) == prompt + tok.encode(expected, add_special_tokens=False)
  assert sampler.prompts[("p", 0, 2)] == prompt + tok.encode(expected.split("<|channel|>final")[0],
                                                             add_special_tokens=False)
  r1, r2 = t.rounds
  assert r1.tokens == len(tok.encode(think("Compute it.") + call("print(6 * 7)"), add_special_tokens=False))
  assert r1.reply_tokens == len(tok.encode(reply("42\n"), add_special_tokens=False))
  assert (r1.finish_reason, r2.finish_reason, r2.reply_tokens) == ("stop", "stop", 0)
  assert t.generated_tokens == r1.tokens + r2.tokens
  assert res.vote == "42" and res.vote_count == 1 and res.score.maj == 1.0 and res.score.correct == 1


def test_prompt_is_harmony_with_our_tool_and_template(tok):
  script = {("p", 0, 1): final("\\boxed{1}")}
  _, sampler = run(tok, script, reasoning_effort="high", user_template="Q: {problem} Box it.")
  text = tok.decode(sampler.prompts[("p", 0, 1)])
  assert text.startswith("<|start|>system<|message|>")
  assert "Reasoning: high\n\n# Tools\n\n## python\n\n" + DESCRIPTION + "\n\n# Valid channels" in text
  assert text.endswith("<|end|><|start|>user<|message|>Q: Problem p: what is the answer? Box it.<|end|>"
                       "<|start|>assistant")
  sp = sampler.params[("p", 0, 1)]
  assert set(sp.stop_token_ids) == {tok.convert_tokens_to_ids("<|return|>"), tok.convert_tokens_to_ids("<|call|>")}
  assert (sp.n, sp.temperature, sp.top_p, sp.max_tokens) == (1, 1.0, 1.0, 8192)


def test_finish_in_round_one_and_seeds(tok):
  script = {("p", i, 1): final(f"\\boxed{{{40 + i}}}") for i in range(3)}
  (res,), sampler = run(tok, script, samples=3, seed=7)
  assert [t.answer for t in res.traces] == ["40", "41", "42"]
  assert [t.rounds[0].seed for t in res.traces] == [trace_seed(7, "p", i, 1) for i in range(3)]
  assert len({t.rounds[0].seed for t in res.traces}) == 3
  assert trace_seed(0, "p", 0, 1) == 3725177246368817571  # pinned: a run stays reproducible across versions
  # The pin, derived by hand: the low 63 bits of the 8-byte BLAKE2b of "seed, problem, trace, round" joined by \x1f.
  digest = hashlib.blake2b(b"0\x1fp\x1f0\x1f1", digest_size=8).digest()
  assert int.from_bytes(digest, "big") % 2 ** 63 == 3725177246368817571
  assert all(t.tool_calls == () and t.finish == "stop" for t in res.traces)
  assert sampler.requests == [[("p", 0, 1), ("p", 1, 1), ("p", 2, 1)]]


def test_retired_traces_are_never_sampled_again(tok):
  script = {("a", 0, 1): final("\\boxed{1}"),
            ("a", 1, 1): call("print(1)"), ("a", 1, 2): call("print(2)"), ("a", 1, 3): final("\\boxed{2}"),
            ("a", 2, 1): call("print(3)"), ("a", 2, 2): final("\\boxed{3}"),
            ("b", 0, 1): call("print(4)"), ("b", 0, 2): final("\\boxed{4}"),
            ("b", 1, 1): final("\\boxed{5}"), ("b", 2, 1): final("no box")}
  results, sampler = run(tok, script, problems=[("a", 1), ("b", 4)], samples=3)
  # One request per round across both problems, with only the live traces in it.
  assert sampler.requests == [
      [("a", 0, 1), ("a", 1, 1), ("a", 2, 1), ("b", 0, 1), ("b", 1, 1), ("b", 2, 1)],
      [("a", 1, 2), ("a", 2, 2), ("b", 0, 2)],
      [("a", 1, 3)]]
  a, b = results
  assert [len(t.rounds) for t in a.traces] == [1, 3, 2] and [len(t.rounds) for t in b.traces] == [2, 1, 1]
  assert [t.python_calls for t in a.traces] == [0, 2, 1]
  assert (b.traces[2].finish, b.traces[2].answer) == ("stop", None)


def test_problems_in_flight_are_a_window(tok):
  script = lambda pid, i, r: final(f"\\boxed{{{pid}}}")  # noqa: E731
  results, sampler = run(tok, script, problems=[(str(k), k) for k in range(5)], samples=2, concurrent_problems=2)
  assert [r.id for r in results] == ["0", "1", "2", "3", "4"] and all(r.score.maj == 1 for r in results)
  assert [[k[0] for k in keys] for keys in sampler.requests] == [["0", "0", "1", "1"], ["2", "2", "3", "3"],
                                                                 ["4", "4"]]


def test_calls_exhausted(tok):
  script = {("p", 0, 1): call("print(1)"), ("p", 0, 2): call("print(2)")}
  (res,), sampler = run(tok, script, rounds=2)
  (t,) = res.traces
  assert t.finish == "max_rounds" and t.answer is None and "round 2 of 2" in t.detail
  (c,) = t.tool_calls  # the call of the last round is not run
  assert c.code == "print(1)" and c.output == "1\n" + SCTIRConfig.last_call_note
  assert t.text == call("print(1)") + reply("1\n" + SCTIRConfig.last_call_note) + call("print(2)")
  assert len(sampler.requests) == 2


def test_trace_token_budget(tok):
  first = call("print(1)")
  n1 = len(tok.encode(first, add_special_tokens=False))
  script = {("p", 0, 1): first, ("p", 0, 2): think("a long thought " * 20) + final("\\boxed{42}")}
  (res,), sampler = run(tok, script, max_tokens_per_trace=n1 + 10, max_tokens_per_round=100)
  (t,) = res.traces
  assert [r.max_tokens for r in t.rounds] == [n1 + 10, 10]  # each round gets what is left of the budget
  assert t.finish == "length" and t.answer is None and t.generated_tokens == n1 + 10
  assert "max_tokens_per_trace" in t.detail and "round 2" in t.detail


def test_budget_spent_before_a_round(tok):
  first = call("print(1)")
  n1 = len(tok.encode(first, add_special_tokens=False))
  (res,), sampler = run(tok, {("p", 0, 1): first}, max_tokens_per_trace=n1)
  (t,) = res.traces
  assert t.finish == "length" and "no tokens left before round 2" in t.detail and len(sampler.requests) == 1


def test_context_limit(tok):
  first = call("print(1)")
  (res,), sampler = run(tok, {("p", 0, 1): first, ("p", 0, 2): final("\\boxed{42}")}, max_context=10 ** 4)
  full = res.traces[0]
  ctx = len(full.token_ids) - full.rounds[1].tokens + 3  # room for 3 tokens in round 2
  (res,), sampler = run(tok, {("p", 0, 1): first, ("p", 0, 2): final("\\boxed{42}")}, max_context=ctx)
  (t,) = res.traces
  assert t.rounds[1].max_tokens == 3 and t.finish == "length" and "max_context" in t.detail
  assert len(t.token_ids) == ctx


def test_length_cut_mid_call_is_not_run(tok):
  text = think("Let me check.") + call("print('never')")
  cut = len(tok.encode(text, add_special_tokens=False)) - 4
  (res,), _ = run(tok, {("p", 0, 1): text}, max_tokens_per_round=cut)
  (t,) = res.traces
  assert t.finish == "length" and t.tool_calls == () and t.answer is None
  assert "cut inside a call to 'python'" in t.detail and "max_tokens_per_round" in t.detail
  assert len(t.rounds) == 1 and t.rounds[0].tokens == cut and t.rounds[0].finish_reason == "length"


def test_final_answer_cut_by_length_has_no_answer(tok):
  text = final("The answer is \\boxed{42} because " + "reasons " * 30)
  (res,), _ = run(tok, {("p", 0, 1): text}, max_tokens_per_round=30)
  (t,) = res.traces
  assert (t.finish, t.answer) == ("length", None) and "cut inside a message on the final channel" in t.detail


@pytest.mark.parametrize("text, why", [
    ("<|channel|>analysis<|message|>print(1)<|call|>", "no recipient"),
    (think("x") + "<|start|>python to=assistant<|channel|>analysis<|message|>7<|end|><|start|>assistant"
     + final("\\boxed{7}"), "made-up reply"),
    ("<|channel|>analysis<|message|>hm<|end|>oops" + final("\\boxed{1}"), "must open with <|start|>"),
    ("<|channel|>analysis to=python code extra<|message|>print(1)<|call|>", "bad message header"),
    ("<|channel|>analysis<|message|>\\boxed{1}<|return|>", "not final"),
])
def test_malformed(tok, text, why):
  (res,), _ = run(tok, {("p", 0, 1): text})
  (t,) = res.traces
  assert t.finish == "malformed" and t.answer is None and t.tool_calls == () and why in t.detail


def test_unknown_tool_reply_or_prune(tok):
  script = {("p", 0, 1): "<|channel|>commentary to=functions.lookup <|constrain|>json<|message|>{}<|call|>",
            ("p", 0, 2): final("\\boxed{42}")}
  (res,), _ = run(tok, script)
  (t,) = res.traces
  (c,) = t.tool_calls
  assert (c.recipient, c.status) == ("functions.lookup", "unknown_tool") and "only tool is python" in c.output
  assert (f"<|start|>functions.lookup to=assistant<|channel|>commentary<|message|>{c.output}<|end|>"
          "<|start|>assistant<|channel|>final") in t.text
  assert (t.finish, t.answer, t.python_calls) == ("stop", "42", 0)
  (res,), sampler = run(tok, script, on_unknown_tool="prune")
  assert res.traces[0].finish == "unknown_tool" and res.traces[0].answer is None and len(sampler.requests) == 1


def test_code_timeout_and_traceback(tok):
  script = {("p", 0, 1): call("while True:\n  pass"),
            ("p", 0, 2): call("def f(x):\n  return 1 / x\n\nf(0)"),
            ("p", 0, 3): final("\\boxed{42}")}
  (res,), _ = run(tok, script, call_timeout_s=0.5)
  (t,) = res.traces
  timeout, error = t.tool_calls
  assert timeout.status == "timeout" and "timed out after 0.5 s" in timeout.output and timeout.wall_s < 4
  assert error.status == "error"
  # The condensed traceback: the model's own lines and the exception, none of the sandbox's frames.
  assert error.output.startswith("Traceback (most recent call last):\n")
  assert 'line 4, in <module>\n    f(0)' in error.output and 'line 2, in f\n    return 1 / x' in error.output
  assert error.output.endswith("ZeroDivisionError: division by zero")
  assert "launcher" not in error.output and "exec(" not in error.output
  assert reply(error.output) in t.text and (t.finish, t.answer, t.timeouts) == ("stop", "42", 1)
  metrics = score([res], Grader("integer"))
  assert (metrics.timeouts, metrics.tool_calls_per_trace) == (1, 2.0)


def test_output_truncated_with_marker(tok):
  script = {("p", 0, 1): call("print('x' * 3000)"), ("p", 0, 2): final("\\boxed{42}")}
  (res,), _ = run(tok, script, max_output_chars=200)
  (c,) = res.traces[0].tool_calls
  assert c.truncated and "[... 2801 characters cut ...]" in c.output
  assert c.output.startswith("x" * 133) and c.output.endswith("x" * 66 + "\n")
  assert reply(c.output) in res.traces[0].text


def test_stateful_session_per_trace(tok):
  script = {("p", i, 1): call(f"x = {40 + i}") for i in range(2)}
  script.update({("p", i, 2): call("print(x + 1)") for i in range(2)})
  script.update({("p", i, 3): final("\\boxed{42}") for i in range(2)})
  (res,), _ = run(tok, script, samples=2, stateful=True)
  assert [t.tool_calls[1].output for t in res.traces] == ["41\n", "42\n"]
  (res,), _ = run(tok, script, samples=2)
  assert all(t.tool_calls[1].status == "error" and "NameError" in t.tool_calls[1].output for t in res.traces)


def test_require_tool_rules(tok):
  script = {("p", 0, 1): final("\\boxed{42}"),
            ("p", 1, 1): call("1 / 0"), ("p", 1, 2): final("\\boxed{42}"),
            ("p", 2, 1): call("print(42)"), ("p", 2, 2): final("\\boxed{42}")}
  finishes = {}
  for rule in ("none", "call", "output"):
    (res,), _ = run(tok, script, samples=3, require_tool=rule)
    finishes[rule] = [(t.finish, t.answer) for t in res.traces]
    assert [t.boxed for t in res.traces] == ["42"] * 3
  assert finishes == {"none": [("stop", "42")] * 3,
                      "call": [("no_code", None), ("stop", "42"), ("stop", "42")],
                      "output": [("no_output", None), ("no_output", None), ("stop", "42")]}


def test_vote_with_ties(tok):
  answers = ["5", "7", "7", "5", "9"]
  script = {("p", i, 1): final(f"\\boxed{{{a}}}") for i, a in enumerate(answers)}
  (res,), _ = run(tok, script, problems=[("p", 7)], samples=5)
  # 5 and 7 tie with two votes each: the vote is the first in trace order, the score the mean over the tie.
  assert res.vote == "5" and res.vote_count == 2 and res.score.maj == 0.5 and res.score.correct == 2
  assert res.score.votes == (("5", 2), ("7", 2), ("9", 1))
  metrics = score([res], Grader("integer"))
  assert metrics.maj_at_n == 0.5 and metrics.mean_at_1 == pytest.approx(0.4)


def test_problem_timeout(tok):
  script = {("p", 0, 1): call("import time\ntime.sleep(0.4)\nprint(1)"), ("p", 0, 2): final("\\boxed{42}")}
  (res,), sampler = run(tok, script, timeout_per_problem_s=0.3)
  (t,) = res.traces
  assert (t.finish, t.answer, len(t.rounds)) == ("timeout", None, 1) and "before round 2" in t.detail
  assert len(sampler.requests) == 1


def test_same_script_same_result(tok):
  script = {("p", i, 1): call(f"print({i} * 3)") for i in range(2)}
  script.update({("p", i, 2): final(f"\\boxed{{{i * 3}}}") for i in range(2)})
  (a,), _ = run(tok, script, samples=2)
  (b,), _ = run(tok, script, samples=2)
  strip = lambda r: [dataclasses.replace(t, tool_calls=tuple(dataclasses.replace(c, wall_s=0) for c in t.tool_calls))
                     for t in r.traces]  # noqa: E731
  assert strip(a) == strip(b)


def test_sandbox_description_from_the_probe(tok):
  cfg = SCTIRConfig(call_timeout_s=3, max_output_chars=300)
  with SCTIR(ScriptedSampler(tok, {}, [], samples=1, rounds=1), tok, cfg, progress=False) as sctir:
    text = sctir.tool_description
  assert "fresh sandboxed Python 3." in text and "timed out after 3 seconds" in text and "300 characters" in text
  assert "Importable: the standard library, numpy, sympy" in text and "no internet access" in text
  stateful = sandbox_description(SandboxConfig(), stateful=True, modules=["sympy"], python_version="3.11")
  assert "stateful sandboxed Python 3.11 interpreter" in stateful and "the standard library, sympy" in stateful


@pytest.mark.parametrize("field, value, message", [
    ("samples", 0, "samples: must be an integer >= 1"),
    ("rounds", 1.5, "rounds: must be an integer >= 1"),
    ("max_output_chars", 10, "max_output_chars: must be an integer >= 50"),
    ("user_template", "no placeholder", "user_template: must contain {problem}"),
    ("require_tool", "always", "require_tool: must be one of"),
    ("tool_description", " ", "tool_description: must be None"),
    ("reasoning_effort", "max", "reasoning_effort: must be one of"),
    ("call_timeout_s", 0, "call_timeout_s: must be a positive number"),
    ("timeout_per_problem_s", -1, "timeout_per_problem_s: must be a positive number"),
    ("top_p", 0, "top_p"),
])
def test_config_errors_name_the_field(field, value, message):
  with pytest.raises(ValueError, match=message.replace("{", "\\{").replace("}", "\\}")):
    SCTIRConfig(**{field: value})
