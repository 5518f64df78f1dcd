"""The training run end to end on the shipped sample data: resume is exact, SIGTERM checkpoints, configs load."""

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from numina_jax.checkpoint import latest_step, load_params
from numina_jax.config import base_config, check_overrides, validate
from numina_jax.trainer import NonFiniteLossError, train

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "max_steps": 8, "global_batch_size": 4, "seq_len": 256, "lr": 3e-3, "warmup_ratio": 0.25,
    "log_every_steps": 1, "checkpoint_every_steps": 0, "eval_every_steps": 0, "remat_policy": "none",
    "progress_bar": False, "plot": False, "model.dtype": "float32", "model.hidden_size": 32,
    "model.intermediate_size": 24, "model.num_attention_heads": 4, "model.head_dim": 8,
    "model.sliding_window": 16, "data.dataset_name": "sample:cot", "data.eval_size": 16,
    "data.progress_bar": False, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,  # the 8 fake devices
}


def tiny_config(workdir, **overrides):
  c = base_config()
  for k, v in {**TINY, **overrides}.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  c.workdir = str(workdir)
  c.data.cache_dir = str(Path(workdir).parent / "cache")
  c.lock()
  return c


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_is_exact(tmp_path):
  """8 steps in one run equal 4 steps, stop, resume, 4 steps: same batches, losses and parameters."""
  a, b = tmp_path / "a", tmp_path / "b"
  ra = train(tiny_config(a))
  assert ra["final_step"] == 8 and not ra["preempted"]
  rb1 = train(tiny_config(b), stop_at_step=4)
  assert rb1["preempted"] and rb1["final_step"] == 4
  assert latest_step(str(b / "checkpoints")) == 4
  rb2 = train(tiny_config(b))
  assert rb2["start_step"] == 4 and rb2["final_step"] == 8
  la, lb = losses(a), losses(b)
  assert sorted(la) == sorted(lb) == list(range(1, 9))
  assert [la[s] for s in la] == [lb[s] for s in la]  # bit-identical: same batches, same maths
  pa, _ = load_params(str(a / "checkpoints"))
  pb, _ = load_params(str(b / "checkpoints"))
  for k in pa:
    np.testing.assert_array_equal(np.asarray(pa[k]), np.asarray(pb[k]), err_msg=k)
  # The loss fell and a held-out eval loss was recorded.
  assert la[8] < la[1]
  assert ra["eval_loss"] is not None and np.isfinite(ra["eval_loss"])
  # Rerunning a finished run trains nothing more.
  rc = train(tiny_config(a))
  assert rc["start_step"] == 8 and rc["final_step"] == 8


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  cfg = tiny_config(tmp_path / "nan", lr=1e30, warmup_ratio=0.0, **{"optim.clip_norm": 0.0},
                    checkpoint_every_steps=1, max_steps=30)
  with pytest.raises(NonFiniteLossError, match="loss is nan|loss is inf"):
    train(cfg)
  ckpts = str(tmp_path / "nan" / "checkpoints")
  step = latest_step(ckpts)
  assert step is not None and step >= 1
  params, _ = load_params(ckpts)
  assert all(np.isfinite(np.asarray(v)).all() for v in params.values())


def _cli(workdir, *extra):
  return [sys.executable, "-m", "numina_jax.train", f"--config.workdir={workdir}",
          "--config.stage2.enabled=False", "--config.export_hf=False", "--config.plot=False",
          "--config.seq_len=256", "--config.global_batch_size=2", "--config.model.hidden_size=32",
          "--config.model.intermediate_size=24", "--config.model.head_dim=8", "--config.model.num_hidden_layers=2",
          "--config.log_every_steps=1", "--config.checkpoint_every_steps=0", "--config.eval_every_steps=0",
          "--config.data.eval_size=8", f"--config.data.cache_dir={Path(workdir).parent / 'cache'}",
          "--config.progress_bar=False", *extra]


def test_sigterm_saves_a_checkpoint_the_next_run_resumes_from(tmp_path):
  wd = tmp_path / "run"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.Popen(_cli(wd, "--config.max_steps=100000"), cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = wd / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and sum(1 for _ in open(metrics)) >= 2:
      break
    time.sleep(0.5)
  assert proc.poll() is None, proc.communicate()[0][-3000:]
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert "preempted" in out
  step = latest_step(str(wd / "checkpoints"))
  assert step is not None and 2 <= step < 100000
  # The same command (with a reachable step count) resumes from there.
  res = subprocess.run(_cli(wd, f"--config.max_steps={step + 2}"), cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
  assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
  summary = json.loads((wd / "summary.json").read_text())
  assert summary["start_step"] == step and summary["final_step"] == step + 2


@pytest.mark.parametrize("path", sorted(glob.glob(str(REPO / "configs" / "*.py"))))
def test_every_shipped_config_loads_and_validates(path):
  from numina_jax.train import load_config_file
  stages = ["cot", "tir"] if "oss" in os.path.basename(path) else [None]
  for stage in stages:
    cfg = load_config_file(path if stage is None else f"{path}:{stage}")
    cfg.lock()
    validate(cfg)
    assert cfg.stage in ("cot", "tir")


def test_bad_override_fails_with_a_clear_message():
  cfg = base_config()
  with pytest.raises(ValueError, match=r"unknown config field --config\.lrr; did you mean --config\.lr\?"):
    check_overrides(cfg, ["--config.lrr=3e-5"])
  check_overrides(cfg, ["--config.lr=3e-5", "--config.data.dataset_name=x"])
  res = subprocess.run([sys.executable, "-m", "numina_jax.train", "--config.optim.wieght_decay=0.1"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert res.returncode != 0
  assert "unknown config field --config.optim.wieght_decay; did you mean --config.optim.weight_decay?" in res.stderr
  assert "Traceback" not in res.stderr


@pytest.mark.parametrize("field,value,msg", [
    ("lr", -1.0, "config.lr: must be > 0"),
    ("remat_policy", "some", "config.remat_policy: 'some' is not one of"),
    ("microbatch_size", 5, "config.microbatch_size: 5 does not divide global_batch_size 32"),
    ("model.moe_kernel", "fast", "config.model.moe_kernel: 'fast' is not one of"),
    ("model.moe_capacity_factor", -1.0, "config.model.moe_capacity_factor: must be >= 0"),
])
def test_bad_values_are_named(field, value, msg):
  cfg = base_config()
  node = cfg
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
    validate(cfg)
