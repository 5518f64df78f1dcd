"""Evaluate a model with SC-TIR (self-consistency with tool-integrated reasoning) on a validation set.

  python -m numina_jax.evaluate --hf out/hf --set aime --out runs/eval/aime
  python -m numina_jax.evaluate --checkpoint runs/x/checkpoints --tokenizer openai/gpt-oss-20b --set amc --out DIR
  python -m numina_jax.evaluate --server http://10.0.0.2:8000,http://10.0.0.3:8000 --tokenizer openai/gpt-oss-120b \\
      --set math_l5 --path ../shared/data/eval/math/math-test-5000.jsonl --limit 100 --out runs/eval/l5
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

from numina_jax import storage
from numina_jax.cli import parse_mesh
from numina_jax.eval import sctir as sctir_lib
from numina_jax.eval.report import OUTPUTS, write_evaluation
from numina_jax.eval.datasets import SETS, add_eval_set_flags, eval_set_from_flags

_FLAGS = {  # SCTIRConfig field -> the flag that sets it, so a config error names the flag
    "samples": "--samples", "rounds": "--rounds", "seed": "--seed", "temperature": "--temperature",
    "top_p": "--top-p", "max_tokens_per_round": "--max-tokens-per-round",
    "max_tokens_per_trace": "--max-tokens-per-trace", "max_context": "--max-context",
    "timeout_per_problem_s": "--timeout-per-problem", "reasoning_effort": "--reasoning-effort",
    "call_timeout_s": "--call-timeout", "max_output_chars": "--max-output-chars", "require_tool": "--require-tool",
    "on_unknown_tool": "--on-unknown-tool", "concurrent_problems": "--concurrent-problems",
    "user_template": "--user-template", "tool_description": "--tool-description"}


class UsageError(ValueError):
  """A bad flag or flag combination: the message names the flag."""


def _number(kind, lo: float, *, strict: bool = False):
  """An argparse type: an int or a finite float >= lo (> lo when strict)."""
  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      what = "an integer" if kind is int else "a number"
      raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value) or (value <= lo if strict else value < lo):
      raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {lo:g}, got {text}")
    return value
  return parse


def build_parser() -> argparse.ArgumentParser:
  d = sctir_lib.SCTIRConfig()
  p = argparse.ArgumentParser(
      prog="python -m numina_jax.evaluate", description=__doc__.split("\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="examples:\n" + "\n".join(__doc__.strip().splitlines()[2:]) + "\n\nsets:\n" +
             "\n".join(f"  {k:8s} {v.about}" for k, v in SETS.items()) +
             "\n\nWrites OUT/traces.jsonl (every trace, as problems finish), OUT/summary.json (metrics, config, "
             "timing) and OUT/maj_at_k.png, and prints a table of the problems. The rules that end or prune a "
             "trace are in numina_jax/eval/sctir.py's docstring and the README.")
  src = p.add_argument_group("model (one of)")
  src.add_argument("--checkpoint", metavar="DIR", help="Orbax checkpoint folder (a run's checkpoints, or `convert "
                   "import`'s): sampled in this process by the JAX sampler")
  src.add_argument("--hf", metavar="DIR", help="Hugging Face gpt-oss checkpoint (folder or Hub id), sampled in this "
                   "process; its tokenizer is used unless --tokenizer is given")
  src.add_argument("--server", metavar="URL[,URL...]", help="OpenAI-compatible completion servers (vLLM, "
                   "vLLM-TPU) sharing the load; needs --tokenizer")
  src.add_argument("--tokenizer", metavar="PATH_OR_ID", help="tokenizer folder or Hub id ('demo' for the demo "
                   "one); required with --checkpoint and --server")
  src.add_argument("--model", help="--server: the served model's name (default: the server's only model)")
  src.add_argument("--concurrency", type=_number(int, 1), default=256,
                   help="--server: requests in flight over all servers; each trace is its own request (its own "
                        "seed), so this bounds the batch a server decodes (default: %(default)s)")
  src.add_argument("--step", type=_number(int, 0), default=None, help="--checkpoint: the step (default: latest)")

  data = p.add_argument_group("problems")
  data.add_argument("--set", required=True, choices=sorted(SETS), help="validation set")
  add_eval_set_flags(data)

  s = p.add_argument_group("SC-TIR")
  s.add_argument("--samples", type=_number(int, 1), default=d.samples, help="traces per problem (default: %(default)s)")
  s.add_argument("--rounds", type=_number(int, 1), default=d.rounds,
                 help="sampling rounds per trace; each but the last may end in a python call (default: %(default)s)")
  s.add_argument("--seed", type=int, default=d.seed, help="run seed; each request's derives from it, the problem, "
                 "the trace and the round (default: %(default)s)")
  s.add_argument("--temperature", type=_number(float, 0), default=d.temperature, help="(default: %(default)s)")
  s.add_argument("--top-p", type=_number(float, 0, strict=True), default=d.top_p, help="(default: %(default)s)")
  s.add_argument("--max-tokens-per-round", type=_number(int, 1), default=d.max_tokens_per_round,
                 help="new tokens per round (default: %(default)s)")
  s.add_argument("--max-tokens-per-trace", type=_number(int, 1), default=d.max_tokens_per_trace,
                 help="tokens the model writes per trace, over all rounds (default: %(default)s)")
  s.add_argument("--max-context", type=_number(int, 2), default=None,
                 help="prompt + everything after it (default: --max-len in process, the servers' max_model_len)")
  s.add_argument("--timeout-per-problem", type=_number(float, 0, strict=True), default=None, metavar="SECONDS",
                 help="wall time per problem, checked as each round starts (default: none)")
  s.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default=d.reasoning_effort,
                 help="(default: %(default)s)")
  s.add_argument("--user-template", default=d.user_template,
                 help="user message with {problem} in it (default: an instruction to box the answer)")
  s.add_argument("--tool-description", default=None, metavar="TEXT",
                 help="the python tool's description in the system message (default: written from the sandbox's "
                      "limits and what it can import)")
  s.add_argument("--call-timeout", type=_number(float, 0, strict=True), default=d.call_timeout_s, metavar="SECONDS",
                 help="wall time of one python call (default: %(default)s)")
  s.add_argument("--max-output-chars", type=_number(int, 50), default=d.max_output_chars,
                 help="characters of a call's output shown to the model (default: %(default)s)")
  s.add_argument("--stateful", action="store_true", help="one python interpreter per trace (variables persist)")
  s.add_argument("--require-tool", choices=sctir_lib.REQUIRE_TOOL, default=d.require_tool,
                 help="prune answers with no python call ('call') or none that ran without error ('output') "
                      "(default: %(default)s)")
  s.add_argument("--on-unknown-tool", choices=sctir_lib.ON_UNKNOWN_TOOL, default=d.on_unknown_tool,
                 help="a call to another recipient than python (default: %(default)s)")
  s.add_argument("--concurrent-problems", type=_number(int, 1), default=d.concurrent_problems,
                 help="problems in flight at once (default: %(default)s)")
  s.add_argument("--sandbox-workers", type=_number(int, 1), default=None,
                 help="python calls run at once (default: the CPU count)")

  j = p.add_argument_group("in-process sampler (--checkpoint, --hf)")
  j.add_argument("--mesh", type=parse_mesh, default={"fsdp": -1}, metavar="AXIS=N,...",
                 help="device mesh, axes data/fsdp/expert/tensor, one may be -1 (default: fsdp=-1)")
  j.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="(default: %(default)s)")
  j.add_argument("--max-len", type=_number(int, 2), default=16384,
                 help="positions per sequence in the KV cache (default: %(default)s)")
  j.add_argument("--max-batch", type=_number(int, 1), default=64, help="sequences decoded at once (default: "
                 "%(default)s)")

  o = p.add_argument_group("output")
  o.add_argument("--out", required=True, metavar="DIR", help="folder for the results (local or gs://)")
  o.add_argument("--overwrite", action="store_true", help="replace results already in --out")
  return p


def sctir_config(args) -> sctir_lib.SCTIRConfig:
  try:
    return sctir_lib.SCTIRConfig(
        samples=args.samples, rounds=args.rounds, seed=args.seed, temperature=args.temperature, top_p=args.top_p,
        max_tokens_per_round=args.max_tokens_per_round, max_tokens_per_trace=args.max_tokens_per_trace,
        max_context=args.max_context, timeout_per_problem_s=args.timeout_per_problem,
        reasoning_effort=args.reasoning_effort, user_template=args.user_template,
        tool_description=args.tool_description, call_timeout_s=args.call_timeout,
        max_output_chars=args.max_output_chars, stateful=args.stateful, require_tool=args.require_tool,
        on_unknown_tool=args.on_unknown_tool, concurrent_problems=args.concurrent_problems)
  except ValueError as e:
    msg = str(e)
    for prefix in ("SCTIRConfig.", "SamplingParams."):
      if msg.startswith(prefix):
        field, rest = msg[len(prefix):].split(":", 1)
        raise UsageError(f"{_FLAGS.get(field, field)}:{rest}") from None
    raise UsageError(msg) from None


def _check_flags(args, injected: bool) -> None:
  sources = [f for f in ("checkpoint", "hf", "server") if getattr(args, f)]
  if not injected and len(sources) != 1:
    raise UsageError("give exactly one of --checkpoint DIR, --hf DIR or --server URL" +
                     (f" (got {', '.join('--' + s for s in sources)})" if sources else ""))
  if (args.checkpoint or args.server or injected) and not args.tokenizer:
    which = "--checkpoint" if args.checkpoint else "--server" if args.server else "this sampler"
    raise UsageError(f"--tokenizer: required with {which} (a folder, a Hub id, or 'demo')")
  if args.model and not args.server:
    raise UsageError("--model names a served model; it goes with --server")
  if args.step is not None and not args.checkpoint:
    raise UsageError("--step goes with --checkpoint")
  if args.server:
    urls = [u.strip() for u in args.server.split(",")]
    bad = [u for u in urls if not u.startswith(("http://", "https://"))]
    if bad:
      raise UsageError(f"--server: URLs start with http:// or https://, got {bad}")


def _out_dir(path: str, overwrite: bool):
  out = storage.path(path)
  if out.exists() and not out.is_dir():
    raise UsageError(f"--out {path} exists and is not a folder")
  present = [name for name in OUTPUTS if (out / name).exists()]
  if present and not overwrite:
    raise UsageError(f"--out {path} already holds {', '.join(present)}; pass --overwrite to replace them, or "
                     "choose another folder")
  storage.makedirs(out)
  for name in present:  # a summary of an earlier run must not sit beside the traces of this one
    storage.remove(out / name)
  return out


def build_sampler(args, tokenizer_name: str | None):
  """(sampler, backend description, max context) for the model flags."""
  if args.server:
    # Each backend imports only its own code: jax and the model are not needed to sample from servers.
    from numina_jax.sampling.engine import EngineSampler
    urls = [u.strip() for u in args.server.split(",")]
    sampler = EngineSampler(urls, model=args.model, max_concurrency=args.concurrency, progress=False)
    backend = {"kind": "server", "urls": sampler.urls, "model": sampler.model,
               "max_model_len": sampler.max_model_len, "tokenizer": tokenizer_name}
    return sampler, backend, sampler.max_model_len
  from numina_jax.sampling.jax_sampler import JaxSampler
  from numina_jax.sharding import make_mesh
  mesh = make_mesh(args.mesh)
  kwargs = dict(mesh=mesh, dtype=args.dtype, max_len=args.max_len, max_batch=args.max_batch, progress=False)
  if args.checkpoint:
    sampler = JaxSampler.from_checkpoint(args.checkpoint, args.step, **kwargs)
    backend = {"kind": "checkpoint", "path": args.checkpoint, "step": args.step}
  else:
    sampler = JaxSampler.from_hf(args.hf, **kwargs)
    backend = {"kind": "hf", "path": args.hf}
  backend.update(mesh=dict(mesh.shape), dtype=args.dtype, max_len=args.max_len, max_batch=args.max_batch,
                 tokenizer=tokenizer_name)
  return sampler, backend, args.max_len


def evaluate(args, sampler, tokenizer, backend: dict, max_context: int | None) -> dict:
  """Runs the evaluation the flags describe and writes the outputs; returns the summary."""
  cfg = sctir_config(args)
  if cfg.max_context is None and max_context is not None:
    cfg = dataclasses.replace(cfg, max_context=max_context)
  eval_set = eval_set_from_flags(args.set, args)
  if not len(eval_set):
    raise UsageError(f"--set {args.set}: no problems to evaluate (after --limit / --problems)")
  out = _out_dir(args.out, args.overwrite)
  return write_evaluation(eval_set, sampler, tokenizer, cfg, out, backend, sandbox_workers=args.sandbox_workers)


def main(argv: list[str] | None = None, *, sampler=None) -> int:
  """The CLI; `sampler` replaces the model flags (any `Sampler`; tests pass a scripted one)."""
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    _check_flags(args, injected=sampler is not None)
    sctir_config(args)  # flag errors before anything slow
    from numina_jax.data.tokenizer import load_tokenizer  # transformers: heavy, after the flag checks
    tokenizer_name = args.tokenizer or args.hf
    tokenizer = load_tokenizer(tokenizer_name)
    if sampler is None:
      sampler, backend, max_context = build_sampler(args, tokenizer_name)
    else:
      backend, max_context = {"kind": type(sampler).__name__, "tokenizer": tokenizer_name}, None
    evaluate(args, sampler, tokenizer, backend, max_context)
  except UsageError as e:
    parser.print_usage(sys.stderr)
    print(f"evaluate: error: {e}", file=sys.stderr)
    return 2
  except (FileNotFoundError, NotADirectoryError, ValueError, RuntimeError) as e:
    print(f"evaluate: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
