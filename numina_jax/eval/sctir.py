"""SC-TIR in harmony: N traces per problem sampled in rounds; a round ends in a python call, run in the sandbox and
fed back, or in the final answer; the answers are majority-voted (`grading`).

What each round can do to a trace, and the `TraceResult.finish` of those that end it:
- "timeout": its problem passed `timeout_per_problem_s`. Checked when a round starts, so a problem can overrun by
  one round (its sampling and its tool calls, each call bounded by `call_timeout_s`). No answer.
- "length": the round stopped at its token limit: `max_tokens_per_round`, what is left of `max_tokens_per_trace`
  (tokens the model generated, prompt and tool replies excluded), or of `max_context` (prompt and everything after
  it). Also when nothing is left before sampling. A cut inside python code is never run. No answer.
- "malformed": tokens that are not harmony (a header that does not parse, no `<|start|>` after a message), a
  message not written as the assistant (a made-up tool reply), `<|call|>` with no recipient, `<|return|>` on
  another channel than final, or a completion that ended on a token other than `<|return|>`/`<|call|>`. No answer.
- "max_rounds": it called a tool in its last round (`rounds`): the call is not run. No answer. A trace runs at
  most `rounds - 1` calls; the reply to the last of them ends with `last_call_note` so the model knows.
- a call to python: the code runs in the sandbox (a fresh interpreter per call, or with `stateful` one interpreter
  per trace); the reply `<|start|>python to=assistant<|channel|>{the call's channel}<|message|>...<|end|>` carries
  the output, a condensed traceback or the timeout message, cut to `max_output_chars` with a marker in the middle
  (the sandbox's `SandboxResult.output`); then `<|start|>assistant` and the next round.
- a call to another recipient: `on_unknown_tool` "reply" (default) answers from that recipient that only python
  exists, and the trace goes on (the round counts); "prune" ends it as "unknown_tool", no answer.
- "stop": `<|return|>` on the final channel; the answer is `grading.extract_answer` of that message (None when it
  has no box). `require_tool` then prunes, as the recipe does for a tool-integrated model: "call" drops the answer
  of a trace that never ran python ("no_code"), "output" of one with no call that ran without error
  ("no_output"). Default "none": gpt-oss reasons well without tools, and these rules would discard right answers.
A retired trace is never sampled again. Every request's seed is `trace_seed(seed, problem id, trace, round)`.

On many hosts (`hosts=distributed.JaxHosts()`, a sampler that is one program over all of them) every host runs
this loop and sends the sampler the same requests in the same order. What is not deterministic is decided on the
main host and shared: the sandbox probe, the model's python (run there only; each round's results go to all), and
the per-problem timeout. The rest follows from the tokens, which every host then holds alike.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

from tqdm.auto import tqdm

from numina_jax.data.harmony.options import REASONING_EFFORTS, RenderOptions
from numina_jax.eval import grading
from numina_jax.eval.completion import CompletionCodec, ParsedCompletion
from numina_jax.sandbox import SandboxConfig, SandboxError, SandboxPool, run_python
from numina_jax.sampling.types import Completion, Sampler, SamplingParams

FINISHES = ("stop", "length", "timeout", "malformed", "max_rounds", "unknown_tool", "no_code", "no_output")
REQUIRE_TOOL = ("none", "call", "output")
ON_UNKNOWN_TOOL = ("reply", "prune")
DEFAULT_USER_TEMPLATE = ("Solve the following math problem. Put the final answer (and only the final answer) inside "
                         "\\boxed{}.\n\n{problem}")
DEFAULT_LAST_CALL_NOTE = "\n[That was the last python call allowed: give the final answer without python.]"
PROBE_MODULES = ("numpy", "sympy", "mpmath", "scipy", "networkx", "gmpy2")


@dataclasses.dataclass(frozen=True)
class SCTIRConfig:
  samples: int = 48  # N traces per problem (AIMO-1's winning run: 48)
  rounds: int = 4  # sampling rounds per trace (AIMO-1: 4); every round but the last may end in a tool call
  temperature: float = 1.0  # OpenAI's recommendation for gpt-oss (Numina sampled its 7B at 0.8)
  top_p: float = 1.0
  seed: int = 0  # every request's seed derives from (seed, problem id, trace, round)
  max_tokens_per_round: int = 8192  # new tokens per round (Numina: 2048; gpt-oss reasons longer)
  max_tokens_per_trace: int = 32768  # tokens the model generates over all rounds (prompt and tool replies excluded)
  max_context: int | None = None  # prompt + everything after it; None: the backend's limit alone
  timeout_per_problem_s: float | None = None  # wall time from a problem's first round; None: no limit
  reasoning_effort: str = "medium"  # the system message's "Reasoning:" line (low, medium, high)
  user_template: str = DEFAULT_USER_TEMPLATE  # the user message; "{problem}" is replaced by the problem
  tool_description: str | None = None  # the python tool's description; None: `sandbox_description` of ours
  call_timeout_s: float = 5.0  # wall time of one python call (the recipe's 5 s)
  max_output_chars: int = 1000  # characters of a call's output the model is shown (Numina 200, NeMo-Skills 1000)
  stateful: bool = False  # one interpreter per trace (variables persist) instead of a fresh one per call
  require_tool: str = "none"  # "call" / "output": prune answers with no python call / no call without error
  on_unknown_tool: str = "reply"  # a call to another recipient than python: "reply" (an error message) or "prune"
  last_call_note: str = DEFAULT_LAST_CALL_NOTE  # appended to the reply of a trace's last allowed call; "" for none
  concurrent_problems: int = 8  # problems in flight; a round samples all live traces of all of them at once

  def __post_init__(self):
    def need(ok: bool, field: str, msg: str):
      if not ok:
        raise ValueError(f"SCTIRConfig.{field}: {msg}")

    def integer(field: str, lo: int):
      value = getattr(self, field)
      need(isinstance(value, int) and not isinstance(value, bool) and value >= lo, field,
           f"must be an integer >= {lo}, got {value!r}")

    for field, lo in (("samples", 1), ("rounds", 1), ("max_tokens_per_round", 1), ("max_tokens_per_trace", 1),
                      ("max_output_chars", 50), ("concurrent_problems", 1)):
      integer(field, lo)
    need(isinstance(self.seed, int) and not isinstance(self.seed, bool), "seed",
         f"must be an integer, got {self.seed!r}")
    if self.max_context is not None:
      integer("max_context", 2)
    for field, optional in (("timeout_per_problem_s", True), ("call_timeout_s", False)):
      value = getattr(self, field)
      seconds = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
      need(seconds or optional and value is None, field, f"must be a positive number of seconds, got {value!r}")
    need(self.reasoning_effort in REASONING_EFFORTS, "reasoning_effort",
         f"must be one of {REASONING_EFFORTS}, got {self.reasoning_effort!r}")
    need(self.user_template.count("{problem}") == 1, "user_template",
         f"must contain {{problem}} exactly once, got {self.user_template!r}")
    need(self.tool_description is None or isinstance(self.tool_description, str) and self.tool_description.strip(),
         "tool_description", "must be None (describe our sandbox) or a non-empty text")
    need(self.require_tool in REQUIRE_TOOL, "require_tool", f"must be one of {REQUIRE_TOOL}, got {self.require_tool!r}")
    need(self.on_unknown_tool in ON_UNKNOWN_TOOL, "on_unknown_tool",
         f"must be one of {ON_UNKNOWN_TOOL}, got {self.on_unknown_tool!r}")
    need(self.temperature > 0 or self.samples == 1, "temperature",
         "0 (greedy) samples the same trace every time; use samples=1 or a temperature > 0")
    # The sampler checks these too, but only once a whole round is under way.
    SamplingParams(n=1, max_tokens=1, temperature=self.temperature, top_p=self.top_p)


class OneHost:
  """SC-TIR on one host: it decides everything itself. (`distributed.JaxHosts` is the many-host counterpart.)"""
  is_main = True
  count = 1

  def share(self, value: Any) -> Any:
    return value


class HostError(RuntimeError):
  """What the main host decides for all failed there; every other host raises this."""


def trace_seed(seed: int, problem_id: str, trace: int, round_: int) -> int:
  """The sampling seed of one request, a 63-bit integer: the same for the same run seed, problem, trace and round
  (1-based), whatever else is in flight, so a run repeats on a backend that honours seeds."""
  key = f"{seed}\x1f{problem_id}\x1f{trace}\x1f{round_}".encode()
  return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") & (2 ** 63 - 1)


def sandbox_description(sandbox, *, stateful: bool, modules: Sequence[str] | None = None,
                        python_version: str | None = None) -> str:
  """The python tool's description in the system message: what our sandbox does, since this text is all the model
  knows of its tool. `sandbox` is a SandboxConfig; `modules` and `python_version` are what `probe_sandbox` found."""
  version = f"Python {python_version}" if python_version else "Python"
  if stateful:
    where = (f"a stateful sandboxed {version} interpreter: variables and imports persist between calls, but a call "
             "that times out or crashes restarts the interpreter and its state is lost")
  else:
    where = (f"a fresh sandboxed {version} process: nothing is kept between calls, so each call must import and "
             "define everything it uses")
  importable = ", ".join(["the standard library", *modules]) if modules else "the standard library"
  timeout = f"{sandbox.timeout_s:g} second" + ("" if sandbox.timeout_s == 1 else "s")
  return (
      "Use this tool to execute Python code in your chain of thought. The code will not be shown to the user. This "
      "tool should be used for internal reasoning, but not for code that is intended to be visible to the user (e.g. "
      "when creating plots, tables, or files).\n\n"
      f"When you send a message containing Python code to python, it will be executed in {where}. python will "
      "respond with what the code writes to stdout and stderr (use print() to see a value; at most "
      f"{sandbox.max_output_chars} characters are shown, the middle of a longer output is cut), or a condensed "
      f"traceback, or a message that it timed out after {timeout}. Importable: {importable}. Memory is limited to "
      f"{sandbox.memory_mb} MB. There is no internet access, and files written are not kept.")


def probe_sandbox(sandbox) -> tuple[str, list[str]]:
  """(python version, importable modules of PROBE_MODULES) as seen inside the sandbox."""
  code = ("import importlib.util, sys\n"
          f"print('%d.%d' % sys.version_info[:2], *[m for m in {PROBE_MODULES!r} if importlib.util.find_spec(m)])")
  result = run_python(code, sandbox.replace(timeout_s=max(sandbox.timeout_s, 30.0)))
  if not result.ok:
    raise SandboxError(f"probing the sandbox's python failed ({result.status}): {result.output}")
  version, *modules = result.stdout.split()
  return version, modules


# ----------------------------------------------------------------------------------------------------------------
# Results.


@dataclasses.dataclass(frozen=True)
class ToolCall:
  round: int  # 1-based round whose completion made the call
  recipient: str  # "python", or the unknown recipient it was addressed to
  code: str  # the call's content
  status: str  # the sandbox's "ok" | "error" | "timeout" | "killed"; "unknown_tool" for another recipient
  output: str  # what the model was shown (notes included)
  wall_s: float
  truncated: bool  # the output was cut


@dataclasses.dataclass(frozen=True)
class RoundRecord:
  seed: int
  max_tokens: int  # the request's limit
  tokens: int  # tokens the model generated this round
  finish_reason: str  # the sampler's: "stop" or "length"
  reply_tokens: int  # tokens of the tool reply appended after it (0: none)


@dataclasses.dataclass(frozen=True)
class TraceResult:
  index: int
  token_ids: tuple[int, ...]  # prompt + every completion and tool reply
  prompt_tokens: int
  text: str  # everything after the prompt, special tokens written out
  rounds: tuple[RoundRecord, ...]
  tool_calls: tuple[ToolCall, ...]
  finish: str  # one of FINISHES
  answer: str | None  # what votes: the final message's boxed answer, None when there is none or a rule pruned it
  boxed: str | None  # the final message's boxed answer even when a rule pruned it
  detail: str  # why it finished, in words

  @property
  def generated_tokens(self) -> int:
    return sum(r.tokens for r in self.rounds)

  @property
  def python_calls(self) -> int:
    return sum(c.recipient == "python" for c in self.tool_calls)

  @property
  def timeouts(self) -> int:
    return sum(c.status == "timeout" for c in self.tool_calls)

  def for_grading(self) -> grading.Trace:
    return grading.Trace(answer=self.answer, tool_calls=self.python_calls, timeouts=self.timeouts,
                         finish=self.finish)


@dataclasses.dataclass(frozen=True)
class ProblemResult:
  id: str
  gold: int | str
  traces: tuple[TraceResult, ...]  # in trace index order
  score: grading.ProblemScore  # the vote (ties: first in trace order) and its maj score (ties averaged)
  wall_s: float  # from its first round to its last trace's end

  @property
  def vote(self) -> str | None:
    return self.score.majority

  @property
  def vote_count(self) -> int:
    return dict(self.score.votes).get(self.vote, 0) if self.vote is not None else 0

  def for_grading(self) -> grading.ProblemTraces:
    return grading.ProblemTraces(self.id, self.gold, tuple(t.for_grading() for t in self.traces))


def score(results: Sequence[ProblemResult], grader: grading.Grader, **kwargs) -> grading.Metrics:
  """`grading.score_problems` over finished problems (maj@k, pass@k, mean@1, no-answer rate, tool calls, ...)."""
  return grading.score_problems([r.for_grading() for r in results], grader, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class _Trace:
  problem: "_Problem"
  index: int
  tokens: list[int]
  generated: int = 0
  rounds: list[RoundRecord] = dataclasses.field(default_factory=list)
  calls: list[ToolCall] = dataclasses.field(default_factory=list)
  finish: str | None = None
  answer: str | None = None
  boxed: str | None = None
  detail: str = ""
  session: object = None  # a PythonSession when stateful, opened at the first call


@dataclasses.dataclass
class _Problem:
  problem: object  # EvalProblem: .id, .text, .answer
  prompt_len: int
  t0: float
  traces: list[_Trace] = dataclasses.field(default_factory=list)


class SCTIR:
  """Runs SC-TIR over problems with one sampler, one tokenizer and a pool of sandboxes.

    with SCTIR(sampler, tokenizer, SCTIRConfig(samples=8)) as sctir:
      for result in sctir.run(eval_set.problems, eval_set.grader):  # as problems finish
        ...
  """

  def __init__(self, sampler: Sampler, tokenizer, config: SCTIRConfig = SCTIRConfig(), *, sandbox=None,
               sandbox_workers: int | None = None, progress: bool | None = None, hosts=None):
    """`sandbox`: a SandboxConfig for the limits not in `config` (memory, processes...); its timeout and output
    length are `config`'s. `progress`: a bar over traces (default: when stderr is a terminal; main host only).
    `hosts`: `distributed.JaxHosts()` when every host of a job runs this loop around one sampler; default one."""
    self.sampler = sampler
    self.config = config
    self.hosts = hosts if hosts is not None else OneHost()
    self.codec = CompletionCodec(tokenizer)
    self.sandbox = (sandbox or SandboxConfig()).replace(timeout_s=config.call_timeout_s,
                                                        max_output_chars=config.max_output_chars)
    self.pool = SandboxPool(sandbox_workers, self.sandbox) if self.hosts.is_main else None
    self.progress = (sys.stderr.isatty() if progress is None else progress) and self.hosts.is_main
    description = config.tool_description
    if description is None:
      def describe():
        version, modules = probe_sandbox(self.sandbox)
        return sandbox_description(self.sandbox, stateful=config.stateful, modules=modules, python_version=version)
      description = self._from_main(describe, "probing the sandbox")
    self.tool_description = description
    self.render_options = RenderOptions(reasoning_effort=config.reasoning_effort,
                                        python_tool_description=description)
    self._bar = None
    self.requests = 0  # sampler.generate calls made

  def prompt(self, problem_text: str) -> list[int]:
    return self.codec.prompt(problem_text, user_template=self.config.user_template, opts=self.render_options)

  def close(self) -> None:
    if self.pool is not None:
      self.pool.close()

  def _from_main(self, decide: Callable[[], Any], what: str) -> Any:
    """`decide()` as the main host found it, on every host (only the main host calls it). An error there is
    raised there and, as a HostError naming it, on every other host, so none waits for a value that never comes."""
    if self.hosts.count == 1:
      return decide()
    if not self.hosts.is_main:
      shared = self.hosts.share(None)
      if "error" in shared:
        raise HostError(f"{what} failed on the main host: {shared['error']}")
      return shared["value"]
    try:
      value = decide()
    except Exception as e:
      self.hosts.share({"error": f"{type(e).__name__}: {e}"})
      raise
    return self.hosts.share({"value": value})["value"]

  def __enter__(self) -> "SCTIR":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- the rounds ------------------------------------------------------------------------------------------------

  def run(self, problems: Iterable, grader: grading.Grader) -> Iterator[ProblemResult]:
    """Yields each problem's result as its last trace retires (not in input order when problems overlap)."""
    cfg = self.config
    pending = collections.deque(problems)
    ids = [p.id for p in pending]
    if len(set(ids)) != len(ids):
      raise ValueError(f"problem ids repeat: {sorted(i for i, c in collections.Counter(ids).items() if c > 1)}")
    active: list[_Problem] = []
    bar = None
    total, done = len(pending), 0
    if self.progress:
      bar = tqdm(total=total * cfg.samples, unit="trace", desc="SC-TIR", dynamic_ncols=True)
      bar.set_postfix(problems=f"0/{total}")
    self._bar = bar
    try:
      while pending or active:
        while pending and len(active) < cfg.concurrent_problems:
          p = pending.popleft()
          prompt = self.prompt(p.text)
          prob = _Problem(p, len(prompt), time.monotonic())
          prob.traces = [_Trace(prob, i, list(prompt)) for i in range(cfg.samples)]
          active.append(prob)
        self._round(active)
        for prob in [p for p in active if all(t.finish is not None for t in p.traces)]:
          active.remove(prob)
          done += 1
          if bar is not None:
            bar.set_postfix(problems=f"{done}/{total}")
          yield self._result(prob, grader)
    finally:
      for prob in active:
        for t in prob.traces:
          self._close_session(t)
      if bar is not None:
        bar.close()

  def _round(self, active: list[_Problem]) -> None:
    cfg = self.config
    over_ids: set[str] = set()
    if cfg.timeout_per_problem_s is not None:  # a clock's decision: the main host's holds for all
      now = time.monotonic()
      over_ids = set(self._from_main(lambda: [str(p.problem.id) for p in active
                                              if now - p.t0 > cfg.timeout_per_problem_s], "the problem timeout"))
    requests: list[tuple[_Trace, SamplingParams, str]] = []
    for prob in active:
      over = str(prob.problem.id) in over_ids
      for t in prob.traces:
        if t.finish is not None:
          continue
        if over:
          self._retire(t, "timeout", f"the problem passed its {cfg.timeout_per_problem_s:g} s before round "
                                     f"{len(t.rounds) + 1}")
          continue
        limit, why = self._token_limit(t)
        if limit <= 0:
          self._retire(t, "length", f"no tokens left before round {len(t.rounds) + 1} ({why})")
          continue
        seed = trace_seed(cfg.seed, str(prob.problem.id), t.index, len(t.rounds) + 1)
        requests.append((t, SamplingParams(n=1, max_tokens=limit, temperature=cfg.temperature, top_p=cfg.top_p,
                                           seed=seed, stop_token_ids=self.codec.stop_token_ids), why))
    if not requests:
      return
    prompts = [t.tokens for t, _, _ in requests]
    out = self.sampler.generate(prompts, [sp for _, sp, _ in requests])
    self.requests += 1
    if len(out) != len(prompts) or any(len(c) != 1 for c in out):
      raise RuntimeError(f"the sampler returned {[len(c) for c in out]} completions for {len(prompts)} prompts "
                         "with n=1 each")
    calls = []
    for (t, sp, why), (completion,) in zip(requests, out):
      call = self._take(t, sp, why, completion)
      if call is not None:
        calls.append(call)
    self._run_calls(calls)

  def _token_limit(self, t: _Trace) -> tuple[int, str]:
    """The next request's max_tokens and which limit sets it."""
    cfg = self.config
    limits = [(cfg.max_tokens_per_round, f"max_tokens_per_round {cfg.max_tokens_per_round}"),
              (cfg.max_tokens_per_trace - t.generated, f"max_tokens_per_trace {cfg.max_tokens_per_trace}")]
    if cfg.max_context is not None:
      limits.append((cfg.max_context - len(t.tokens), f"max_context {cfg.max_context}"))
    return min(limits, key=lambda x: x[0])

  def _take(self, t: _Trace, sp: SamplingParams, limit: str, c: Completion):
    """Appends a completion to its trace and applies the rules; returns the tool call to make, if any. `limit`
    names the limit that set the request's max_tokens."""
    cfg = self.config
    round_ = len(t.rounds) + 1
    ids = [int(x) for x in c.token_ids]
    t.tokens += ids
    t.generated += len(ids)
    t.rounds.append(RoundRecord(sp.seed, sp.max_tokens, len(ids), c.finish_reason, 0))
    parsed = self.codec.parse(ids)
    if c.finish_reason == "length":
      self._retire(t, "length", f"round {round_} stopped at {sp.max_tokens} tokens ({limit}), {_where_cut(parsed)}")
      return None
    if c.finish_reason != "stop":
      raise RuntimeError(f"the sampler returned finish_reason {c.finish_reason!r}; expected 'stop' or 'length'")
    bad = self._malformed(ids, parsed)
    if bad:
      self._retire(t, "malformed", f"round {round_}: {bad}")
      return None
    last = parsed.last
    if last.terminator == "<|return|>":
      t.boxed = grading.extract_answer(last.content)
      answer, finish, detail = t.boxed, "stop", "final answer" if t.boxed is not None else "final message without a box"
      if answer is not None and cfg.require_tool != "none":
        ran = [x for x in t.calls if x.recipient == "python"]
        if cfg.require_tool == "call" and not ran:
          answer, finish, detail = None, "no_code", "answered without running python (require_tool='call')"
        elif cfg.require_tool == "output" and not any(x.status == "ok" for x in ran):
          answer, finish, detail = None, "no_output", ("answered with no python call that ran without error "
                                                       "(require_tool='output')")
      t.answer = answer
      self._retire(t, finish, f"round {round_}: {detail}")
      return None
    if round_ >= cfg.rounds:
      self._retire(t, "max_rounds", f"round {round_} of {cfg.rounds} ended in a call to {last.recipient!r}, not run")
      return None
    if last.recipient != "python" and cfg.on_unknown_tool == "prune":
      self._retire(t, "unknown_tool", f"round {round_} called {last.recipient!r}, which is not a tool here")
      return None
    return t, last, round_

  def _malformed(self, ids: list[int], parsed: ParsedCompletion) -> str | None:
    if not ids or ids[-1] not in self.codec.stop_token_ids:
      end = self.codec.decode(ids[-1:]) if ids else "nothing"
      return f"the completion ended on {end!r}, not on <|return|> or <|call|>"
    if parsed.error:
      return parsed.error
    for m in parsed.messages:
      if m.author != "assistant":
        return f"the model wrote a message as {m.author!r} (a made-up reply)"
    for m in parsed.messages[:-1]:
      if m.terminator != "<|end|>":
        return f"{m.terminator} ended a message before the last one"
    last = parsed.last
    if last.terminator == "<|call|>" and not last.recipient:
      return "<|call|> ended a message with no recipient"
    if last.terminator == "<|return|>" and last.channel != "final":
      return f"<|return|> ended a message on the {last.channel!r} channel, not final"
    return None

  def _run_calls(self, calls: list) -> None:
    cfg = self.config
    python = [(t, msg) for t, msg, _ in calls if msg.recipient == "python"]
    # Run on the main host alone: outputs, timings and timeouts differ between runs, and every host must append
    # the same reply tokens.
    results = iter(self._from_main(lambda: self._execute(python), "running the model's python") if python else [])
    for t, msg, round_ in calls:
      if msg.recipient != "python":
        output = (f"Error: there is no tool {msg.recipient!r} here; the only tool is python. Send python code to "
                  "python, or answer.")
        call = ToolCall(round_, msg.recipient, msg.content, "unknown_tool", output, 0.0, False)
      else:
        r = next(results)
        output = r["output"] + (cfg.last_call_note if round_ == cfg.rounds - 1 else "")
        call = ToolCall(round_, "python", msg.content, r["status"], output, r["wall_s"], r["truncated"])
      t.calls.append(call)
      reply = self.codec.tool_reply(msg.recipient, call.output, msg.channel or "analysis")
      t.tokens += reply
      t.rounds[-1] = dataclasses.replace(t.rounds[-1], reply_tokens=len(reply))

  def _execute(self, python: list) -> list[dict]:
    """Runs the python calls of a round in the sandbox pool, in parallel; what each call's record needs."""
    futures = []
    for t, msg in python:
      if self.config.stateful and t.session is None:
        t.session = self.pool.session()
      futures.append(self.pool.submit(msg.content, session=t.session) if self.config.stateful
                     else self.pool.submit(msg.content))
    results = [f.result() for f in futures]  # a SandboxError (the sandbox itself broke) ends the run
    return [{"status": r.status, "output": r.output, "wall_s": r.wall_s, "truncated": r.truncated} for r in results]

  def _retire(self, t: _Trace, finish: str, detail: str) -> None:
    t.finish, t.detail = finish, detail
    self._close_session(t)
    if self._bar is not None:
      self._bar.update(1)

  @staticmethod
  def _close_session(t: _Trace) -> None:
    if t.session is not None:
      t.session.close()
      t.session = None

  def _result(self, prob: _Problem, grader: grading.Grader) -> ProblemResult:
    p = prob.problem
    traces = tuple(
        TraceResult(index=t.index, token_ids=tuple(t.tokens), prompt_tokens=prob.prompt_len,
                    text=self.codec.decode(t.tokens[prob.prompt_len:]), rounds=tuple(t.rounds),
                    tool_calls=tuple(t.calls), finish=t.finish, answer=t.answer, boxed=t.boxed, detail=t.detail)
        for t in prob.traces)
    graded = grading.ProblemTraces(str(p.id), p.answer, tuple(t.for_grading() for t in traces))
    problem_score = grading.score_problems([graded], grader, resamples=1).problems[0]
    return ProblemResult(str(p.id), p.answer, traces, problem_score, time.monotonic() - prob.t0)


def _where_cut(parsed: ParsedCompletion) -> str:
  if parsed.partial_header is not None:
    return f"cut inside a message header {parsed.partial_header!r}"
  last = parsed.last
  if parsed.error or last is None:
    return "cut in tokens that are not harmony" if parsed.error else "cut before any message"
  if last.terminator is not None:
    return "cut after a message's end"
  if last.recipient is not None:
    return f"cut inside a call to {last.recipient!r} (not run)"
  return f"cut inside a message on the {last.channel} channel" if last.channel else "cut inside a message"


def run_sctir(problems: Iterable, sampler: Sampler, tokenizer, grader: grading.Grader,
              config: SCTIRConfig = SCTIRConfig(), **kwargs) -> list[ProblemResult]:
  """Every problem's result, in the order of `problems`."""
  problems = list(problems)
  with SCTIR(sampler, tokenizer, config, **kwargs) as sctir:
    by_id = {r.id: r for r in sctir.run(problems, grader)}
  return [by_id[str(p.id)] for p in problems]


__all__ = ["DEFAULT_USER_TEMPLATE", "FINISHES", "HostError", "OneHost", "ProblemResult", "RoundRecord", "SCTIR",
           "SCTIRConfig", "ToolCall", "TraceResult", "probe_sandbox", "run_sctir", "sandbox_description", "score",
           "trace_seed"]
