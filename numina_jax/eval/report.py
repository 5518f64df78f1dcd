"""The outputs of an SC-TIR evaluation, one writer for the evaluation CLI and the trainer: traces.jsonl, summary.json,
maj_at_k.png, and the per-problem table."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import time
from typing import Sequence

from numina_jax import storage
from numina_jax.eval import sctir as sctir_lib

OUTPUTS = ("summary.json", "traces.jsonl", "maj_at_k.png")


def trace_record(problem: sctir_lib.ProblemResult, t: sctir_lib.TraceResult, grader) -> dict:
  return {
      "problem": problem.id, "trace": t.index, "gold": problem.gold, "finish": t.finish, "detail": t.detail,
      "answer": t.answer, "boxed": t.boxed, "correct": grader.is_correct(t.answer, problem.gold),
      "prompt_tokens": t.prompt_tokens, "generated_tokens": t.generated_tokens,
      "rounds": [dataclasses.asdict(r) for r in t.rounds],
      "tool_calls": [dataclasses.asdict(c) for c in t.tool_calls],
      "text": t.text, "token_ids": list(t.token_ids)}


def problem_table(results: Sequence[sctir_lib.ProblemResult]) -> str:
  """One line per problem: id, gold, vote, its votes of N, correct (ties: the averaged score), tool calls, traces
  with no answer."""
  rows = [("id", "gold", "vote", "votes", "correct", "tool calls", "no answer")]
  for r in results:
    n = len(r.traces)
    correct = {1.0: "yes", 0.0: "no"}.get(r.score.maj, f"{r.score.maj:.2f}")
    vote = "-" if r.vote is None else r.vote if len(r.vote) <= 24 else r.vote[:21] + "..."
    rows.append((r.id, str(r.gold), vote, f"{r.vote_count}/{n}", correct, str(sum(t.python_calls for t in r.traces)),
                 str(sum(t.answer is None for t in r.traces))))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def plot_maj_at_k(metrics, path, title: str) -> None:
  import matplotlib  # heavy (a second), and only for the plot
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ks = sorted(metrics.maj_at)
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  ax.plot(ks, [100 * metrics.maj_at[k] for k in ks], "o-", label="maj@k")
  ax.plot(ks, [100 * metrics.pass_at[k] for k in ks], "s--", label="pass@k")
  ax.set_xscale("log", base=2)
  ax.set_xticks(ks, [str(k) for k in ks])
  ax.set_xlabel("k (traces)")
  ax.set_ylabel("% of problems")
  ax.set_ylim(0, 100)
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title(title)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png")
  plt.close(fig)
  storage.write_bytes(path, buffer.getvalue())


def write_evaluation(eval_set, sampler, tokenizer, cfg: sctir_lib.SCTIRConfig, out, backend: dict, *,
                     sandbox_workers: int | None = None, echo: bool = True, hosts=None) -> dict:
  """SC-TIR of `eval_set` through `sampler` (the one path for the CLI and for the trainer's evaluation at the end
  of a stage): traces.jsonl (a problem's traces as soon as it finishes), summary.json and maj_at_k.png in `out`,
  with `echo` the per-problem table and the metrics on stdout. Returns the summary.

  `hosts` (`distributed.JaxHosts()`): every host of a job calls this around one sampler (`sctir.SCTIR`); only the
  main host writes and echoes. Each host returns its own summary: the traces are alike, timings are not."""
  main = hosts is None or hosts.is_main
  t0 = time.time()
  results = {}
  with sctir_lib.SCTIR(sampler, tokenizer, cfg, sandbox_workers=sandbox_workers, hosts=hosts) as runner, \
      ((out / "traces.jsonl").open("w") if main else contextlib.nullcontext()) as f:
    for r in runner.run(eval_set.problems, eval_set.grader):
      if main:
        for t in r.traces:
          f.write(json.dumps(trace_record(r, t, eval_set.grader), ensure_ascii=False) + "\n")
        f.flush()  # a problem's traces are on disk as soon as it finishes
      results[r.id] = r
    tool_description, requests = runner.tool_description, runner.requests
  wall = time.time() - t0
  ordered = [results[p.id] for p in eval_set.problems]
  metrics = sctir_lib.score(ordered, eval_set.grader, seed=cfg.seed)
  traces = [t for r in ordered for t in r.traces]
  generated = sum(t.generated_tokens for t in traces)
  summary = {
      "set": {"name": eval_set.name, "source": eval_set.source, "problems": len(eval_set), "rows": eval_set.rows,
              "excluded": eval_set.excluded, "grader": dataclasses.asdict(eval_set.grader)},
      "backend": backend,
      "config": {**dataclasses.asdict(cfg), "tool_description": tool_description},
      "metrics": metrics.to_dict(),
      "timing": {"wall_s": wall, "problem_wall_s_mean": sum(r.wall_s for r in ordered) / len(ordered),
                 "generated_tokens": generated, "generated_tokens_per_s": generated / wall if wall > 0 else None,
                 "sampler_requests": requests, "python_calls": sum(t.python_calls for t in traces),
                 "python_wall_s": sum(c.wall_s for t in traces for c in t.tool_calls)},
  }
  if not main:
    return summary
  storage.write_text(out / "summary.json", json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
  plot_maj_at_k(metrics, out / "maj_at_k.png", f"{eval_set.name}: {len(eval_set)} problems x {cfg.samples} traces")
  if echo:
    print(problem_table(ordered))
    print(metrics.summary())
    print(f"wrote {out / 'traces.jsonl'}, {out / 'summary.json'}, {out / 'maj_at_k.png'} ({wall:.1f} s)")
  return summary
