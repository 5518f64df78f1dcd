"""One host of the two-process SC-TIR test: joins a 2-process JAX job, runs SC-TIR over scripted traces whose
python prints a random number (so the hosts' own sandboxes would disagree), and writes what its sampler was asked.

  python tests/multihost_sctir_worker.py PORT PROCESS_ID OUT_DIR
"""

import json
import sys
from pathlib import Path

PROBLEMS = (("a", 3), ("b", 5))
SAMPLES, ROUNDS = 2, 3
# Stateful: the second call reads the first one's variable, so it works only in the session of the host that ran it.
FIRST = "import random\nx = random.getrandbits(48)\nprint(x)"
SECOND = "print(x + 1)"


def script(pid, trace, round_):
  if round_ < ROUNDS:
    return f"<|channel|>analysis to=python code<|message|>{FIRST if round_ == 1 else SECOND}<|call|>"
  return f"<|channel|>final<|message|>\\boxed{{{dict(PROBLEMS)[pid]}}}<|return|>"


def main(port: str, process_id: str, out: str) -> None:
  import jax
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id))
  from scripted_sampler import ScriptedSampler
  from numina_jax.data import demo_tokenizer
  from numina_jax.distributed import JaxHosts
  from numina_jax.eval.datasets import EvalSet, EvalProblem
  from numina_jax.eval.grading import Grader
  from numina_jax.eval.report import write_evaluation
  from numina_jax.eval.sctir import SCTIR, HostError, SCTIRConfig
  from numina_jax.sandbox import SandboxConfig, SandboxError

  out = Path(out)
  tok = demo_tokenizer()
  problems = tuple(EvalProblem(pid, f"Problem {pid}: what is the answer?", gold) for pid, gold in PROBLEMS)
  eval_set = EvalSet("scripted", "test", problems, Grader("integer"), {}, len(problems))
  cfg = SCTIRConfig(samples=SAMPLES, rounds=ROUNDS, stateful=True, call_timeout_s=20.0)
  sampler = ScriptedSampler(tok, script, [p.id for p in problems], samples=SAMPLES, rounds=ROUNDS, seed=cfg.seed)
  (out / "sctir").mkdir(parents=True)
  summary = write_evaluation(eval_set, sampler, tok, cfg, out / "sctir", {"kind": "scripted"}, sandbox_workers=2,
                             echo=False, hosts=JaxHosts())
  # A sandbox that cannot start on the main host: it raises there, and every other host raises too (none waits).
  try:
    SCTIR(sampler, tok, cfg, sandbox=SandboxConfig(bwrap="/nonexistent/bwrap"), hosts=JaxHosts())
    failure = None
  except (SandboxError, HostError) as e:
    failure = f"{type(e).__name__}: {e}"
  (out / "asked.json").write_text(json.dumps({
      "prompts": {"/".join(map(str, k)): v for k, v in sorted(sampler.prompts.items())},
      "maj": summary["metrics"]["maj_at"][SAMPLES], "failure": failure}))


if __name__ == "__main__":
  main(*sys.argv[1:])
