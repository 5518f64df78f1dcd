"""Learning-rate sweeps: real short training runs per lr, a table, the best lr."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from multihost import cpu_env
from numina_jax.sweep import best_of, format_table, parse_lrs

REPO = Path(__file__).resolve().parents[1]


def test_parse_lrs_and_errors():
  assert parse_lrs("1e-5, 2e-5,3e-5") == [1e-5, 2e-5, 3e-5]
  with pytest.raises(SystemExit, match="'abc' is not a number"):
    parse_lrs("1e-5,abc")
  with pytest.raises(SystemExit, match="must be > 0"):
    parse_lrs("0")


def test_best_prefers_eval_loss_and_skips_failures():
  rows = [{"lr": 1e-5, "status": "ok", "final_loss": 1.0, "eval_loss": 2.0, "workdir": "a"},
          {"lr": 2e-5, "status": "ok", "final_loss": 1.5, "eval_loss": 1.2, "workdir": "b"},
          {"lr": 5e-5, "status": "failed (exit 1)", "workdir": "c"}]
  assert best_of(rows)["lr"] == 2e-5
  table = format_table(rows)
  assert "failed (exit 1)" in table and "1.2000" in table


@pytest.mark.slow
def test_sweep_runs_one_training_run_per_lr(tmp_path):
  cmd = [sys.executable, "-m", "numina_jax.sweep", "--lrs", "1e-4,3e-3", "--steps", "3",
         "--workdir", str(tmp_path), "--config.seq_len=256", "--config.global_batch_size=2",
         "--config.model.hidden_size=32", "--config.model.intermediate_size=24", "--config.model.head_dim=8",
         "--config.eval_every_steps=0", "--config.checkpoint_every_steps=0", "--config.plot=False",
         "--config.progress_bar=False", "--config.data.eval_size=8",
         f"--config.data.cache_dir={tmp_path / 'cache'}"]
  res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=cpu_env(1))  # 1 device a trial
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  assert "best lr:" in res.stdout
  results = json.loads((tmp_path / "sweep" / "results.json").read_text())
  assert [t["lr"] for t in results["trials"]] == [1e-4, 3e-3]
  for t in results["trials"]:
    assert t["status"] == "ok" and t["steps"] == 3
    summary = json.loads((Path(t["workdir"]) / "summary.json").read_text())
    assert summary["final_step"] == 3
    # Each trial trained with its own learning rate.
    rows = [json.loads(line) for line in open(Path(t["workdir"]) / "metrics.jsonl")]
    peak = max(r["lr"] for r in rows if "lr" in r)
    assert peak <= t["lr"] * (1 + 1e-6) and peak > 0
  # Three steps at 1e-4 barely move a random model; at 3e-3 its held-out loss falls: the sweep must pick 3e-3, by
  # the eval loss each trial recorded.
  low, high = results["trials"]
  assert high["eval_loss"] < low["eval_loss"] - 0.05, (low, high)
  assert results["best"]["lr"] == 3e-3 and "best lr: 0.003" in res.stdout


@pytest.mark.slow
def test_sweep_rejects_unknown_override(tmp_path):
  res = subprocess.run([sys.executable, "-m", "numina_jax.sweep", "--lrs", "1e-5", "--steps", "1",
                        "--config.lrr=1"], cwd=REPO, capture_output=True, text=True, timeout=120, env=cpu_env(1))
  assert res.returncode != 0 and "did you mean --config.lr" in res.stderr
