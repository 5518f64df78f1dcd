"""Learning-rate sweep: short, ordinary training runs that differ only in --config.lr, then a table.

  python -m numina_jax.sweep --config configs/oss20b_gpu.py --lrs 1e-5,2e-5,3e-5,5e-5 --steps 200

Each trial is `python -m numina_jax.train --config ... --config.lr=LR --config.max_steps=STEPS` in its own
workdir (`<workdir>/sweep/lr_<LR>`), so trials resume like any run. Extra `--config.X=V` flags pass through.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

from numina_jax import storage
from numina_jax.config import DEFAULT_CONFIG, load_config


def parse_lrs(text: str) -> list[float]:
  out = []
  for part in text.split(","):
    part = part.strip()
    try:
      lr = float(part)
    except ValueError:
      raise SystemExit(f"error: --lrs: {part!r} is not a number (expected e.g. 1e-5,2e-5)") from None
    if not lr > 0:
      raise SystemExit(f"error: --lrs: learning rates must be > 0, got {part}")
    out.append(lr)
  if not out:
    raise SystemExit("error: --lrs is empty")
  return out


def trial_dir(base: str, lr: float) -> str:
  return storage.join(base, "sweep", f"lr_{lr:g}")


def run_trial(config: str, lr: float, steps: int, workdir: str, extra: list[str]) -> dict:
  cmd = [sys.executable, "-m", "numina_jax.train", f"--config={config}", f"--config.lr={lr}",
         f"--config.max_steps={steps}", f"--config.workdir={workdir}", "--config.next_stage=",
         "--config.export_hf=False", *extra]
  print(f"\n=== lr={lr:g}: {' '.join(cmd[1:])}", flush=True)
  proc = subprocess.run(cmd)
  storage.refresh(workdir)  # the trial's process wrote it
  text = storage.read_text(storage.join(workdir, "summary.json"))
  if proc.returncode != 0 or text is None:
    return {"lr": lr, "status": f"failed (exit {proc.returncode})", "workdir": workdir}
  s = json.loads(text)
  return {"lr": lr, "status": "preempted" if s.get("preempted") else "ok", "workdir": workdir,
          "final_loss": s.get("final_loss"), "eval_loss": s.get("eval_loss"), "steps": s.get("final_step")}


def best_of(rows: list[dict]) -> dict | None:
  ok = [r for r in rows if r["status"] == "ok"]
  key = "eval_loss" if ok and all(r.get("eval_loss") is not None for r in ok) else "final_loss"
  ok = [r for r in ok if r.get(key) is not None and math.isfinite(r[key])]
  return min(ok, key=lambda r: r[key]) if ok else None


def format_table(rows: list[dict]) -> str:
  def f(v):
    return "-" if v is None else f"{v:.4f}"
  lines = [f"{'lr':>10}  {'train loss':>10}  {'eval loss':>10}  {'steps':>6}  status",
           "-" * 54]
  for r in rows:
    lines.append(f"{r['lr']:>10.3g}  {f(r.get('final_loss')):>10}  {f(r.get('eval_loss')):>10}  "
                 f"{str(r.get('steps', '-')):>6}  {r['status']}")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m numina_jax.sweep", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default=None, help="training config file (default: configs/default.py)")
  p.add_argument("--lrs", required=True, help="comma-separated learning rates, e.g. 1e-5,2e-5,3e-5,5e-5")
  p.add_argument("--steps", type=int, required=True, help="optimizer steps per trial")
  p.add_argument("--workdir", default=None, help="base directory (default: the config's workdir)")
  args, extra = p.parse_known_args(argv)
  bad = [a for a in extra if not a.startswith("--config.")]
  if bad:
    p.error(f"unrecognized arguments: {' '.join(bad)} (only --config.X=V overrides pass through)")
  if args.steps <= 0:
    p.error("--steps must be > 0")
  config = args.config or DEFAULT_CONFIG
  try:
    cfg = load_config([f"--config={config}", *extra])
  except (FileNotFoundError, ValueError) as e:
    p.error(str(e))
  base = args.workdir or cfg.workdir
  rows = [run_trial(config, lr, args.steps, trial_dir(base, lr), extra) for lr in parse_lrs(args.lrs)]
  print("\n" + format_table(rows))
  best = best_of(rows)
  if best is None:
    print("no trial finished")
    return 1
  print(f"best lr: {best['lr']:g} ({best['workdir']})")
  storage.makedirs(storage.join(base, "sweep"))
  storage.write_text(storage.join(base, "sweep", "results.json"),
                     json.dumps({"trials": rows, "best": best}, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
