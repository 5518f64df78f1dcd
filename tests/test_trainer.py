"""The training run end to end on the shipped sample data: resume is exact, SIGTERM checkpoints, configs load."""

import glob
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from multihost import cpu_env
from numina_jax.checkpoint import latest_step, load_params, training_manager
from numina_jax.config import base_config, check_overrides, validate
from numina_jax.trainer import NAN_AT_STEP_ENV, NonFiniteLossError, train

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


def test_a_nonfinite_step_is_never_saved_or_is_skipped(tmp_path, monkeypatch):
  """Step 3's loss (and so its gradients) is NaN: the run stops there, its checkpoint on disk is step 2, and with
  optim.skip_nonfinite the update is skipped instead, counted, and training goes on."""
  monkeypatch.setenv(NAN_AT_STEP_ENV, "3")
  cfg = tiny_config(tmp_path / "stop", checkpoint_every_steps=1, max_steps=5)
  with pytest.raises(NonFiniteLossError, match=r"loss is nan, grad_norm is nan, param_norm is nan at step 3: "
                                               r"stopping; nothing from step 3 on was saved, the last good "
                                               r"checkpoint is step 2 in "):
    train(cfg)
  ckpts = str(tmp_path / "stop" / "checkpoints")
  assert latest_step(ckpts) == 2
  params, _ = load_params(ckpts)
  assert all(np.isfinite(np.asarray(v)).all() for v in params.values())

  wd = tmp_path / "skip"
  r = train(tiny_config(wd, checkpoint_every_steps=1, max_steps=5,
                        **{"optim.skip_nonfinite": True, "checkpoint.max_to_keep": 5}))
  assert r["final_step"] == 5 and r["skipped_updates"] == 1
  rows = {row["step"]: row for row in map(json.loads, open(wd / "metrics.jsonl")) if "loss" in row}
  assert [rows[s]["skipped_updates"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
  assert np.isnan(rows[3]["loss"]) and all(np.isfinite(rows[s]["loss"]) for s in (1, 2, 4, 5))
  # The skipped step left the parameters as they were after step 2.
  p2, _ = load_params(str(wd / "checkpoints"), step=2)
  p3, _ = load_params(str(wd / "checkpoints"), step=3)
  for k in p2:
    np.testing.assert_array_equal(np.asarray(p2[k]), np.asarray(p3[k]), err_msg=k)


def _cli(workdir, *extra):
  return [sys.executable, "-m", "numina_jax.train", f"--config.workdir={workdir}",
          "--config.next_stage=", "--config.export_hf=False", "--config.plot=False",
          "--config.seq_len=256", "--config.global_batch_size=2", "--config.model.hidden_size=32",
          "--config.model.intermediate_size=24", "--config.model.head_dim=8", "--config.model.num_hidden_layers=2",
          "--config.log_every_steps=1", "--config.checkpoint_every_steps=0", "--config.eval_every_steps=0",
          "--config.data.eval_size=8", f"--config.data.cache_dir={Path(workdir).parent / 'cache'}",
          "--config.progress_bar=False", *extra]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_the_next_run_resumes_from(tmp_path):
  wd = tmp_path / "run"
  env = cpu_env(1)
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
  from numina_jax.config import load_config_file
  for stage in (None, "cot", "tir"):
    cfg = load_config_file(path if stage is None else f"{path}:{stage}")
    cfg.lock()
    validate(cfg)
    assert cfg.stage in ("cot", "tir")


def test_bad_override_fails_with_a_clear_message():
  cfg = base_config()
  with pytest.raises(ValueError, match=r"unknown config field --config\.lrr; did you mean --config\.lr\?"):
    check_overrides(cfg, ["--config.lrr=3e-5"])
  check_overrides(cfg, ["--config.lr=3e-5", "--config.data.dataset_name=x"])
  with pytest.raises(ValueError, match=r"--config\.model\.router_aux_loss_coef was renamed "
                                       r"--config\.model\.load_balancing_loss_coef"):
    check_overrides(cfg, ["--config.model.router_aux_loss_coef=0.1"])


@pytest.mark.slow
def test_the_train_cli_names_a_misspelled_override():
  res = subprocess.run([sys.executable, "-m", "numina_jax.train", "--config.optim.wieght_decay=0.1"], cwd=REPO,
                       capture_output=True, text=True, timeout=120, env=cpu_env(1))
  assert res.returncode != 0
  assert "unknown config field --config.optim.wieght_decay; did you mean --config.optim.weight_decay?" in res.stderr
  assert "Traceback" not in res.stderr


def test_every_cli_loads_a_config_the_same_way():
  from numina_jax.config import load_config
  path = str(REPO / "configs" / "oss20b_gpu.py")
  cfg = load_config([f"--config={path}:tir", "--config.lr=3e-5", "--config.mesh.fsdp=4", "--config.export_hf=true",
                     "--config.data.dataset_name=x"])
  assert cfg.stage == "tir" and cfg.lr == 3e-5 and cfg.mesh.fsdp == 4 and cfg.export_hf is True
  assert cfg.data.dataset_name == "x" and isinstance(cfg.mesh.fsdp, int)
  with pytest.raises(ValueError, match=r"unknown config field --config\.mesh\.fsdb; did you mean --config\.mesh\.fsdp\?"):
    load_config(["--config.mesh.fsdb=4"])
  with pytest.raises(ValueError, match="config.mesh.fsdp"):
    load_config(["--config.mesh.fsdp=four"])
  with pytest.raises(FileNotFoundError, match="no config file at nowhere.py"):
    load_config(["--config", "nowhere.py"])


@pytest.mark.parametrize("field,value,msg", [
    ("lr", -1.0, "config.lr: must be > 0"),
    ("distributed.num_processes", -2, "config.distributed.num_processes: must be >= 0"),
    ("distributed.coordinator_address", "10.0.0.1:1234",
     "config.distributed.coordinator_address: is set but config.multihost is False; add --config.multihost=True"),
    ("remat_policy", "some", "config.remat_policy: 'some' is not one of"),
    ("microbatch_size", 5, "config.microbatch_size: 5 does not divide global_batch_size 32"),
    ("model.moe_kernel", "fast", "config.model.moe_kernel: 'fast' is not one of"),
    ("model.moe_capacity_factor", -1.0, "config.model.moe_capacity_factor: must be >= 0"),
    ("sctir.samples", 0, "config.sctir.samples: must be an integer >= 1"),
    ("checkpoint.best_metric", "sctir_maj", "config.checkpoint.best_metric: sctir_maj needs SC-TIR during training"),
    ("model.loss_chunk", 384, "config.model.loss_chunk: 384 does not divide seq_len 2048"),
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


def test_a_chained_stage_starts_from_the_previous_one_on_its_own_sources():
  from numina_jax.config import DEFAULT_CONFIG, load_config_file, next_stage_config
  from numina_jax.data.sources import source_specs

  def names(data):
    return [(s.name, s.weight) for s in source_specs(data)]

  cot = load_config_file(DEFAULT_CONFIG)
  assert (cot.stage, cot.next_stage) == ("cot", "tir")
  with cot.unlocked():
    cot.workdir = "runs/x/stage1_cot"
  tir = load_config_file(f"{DEFAULT_CONFIG}:tir")
  c2 = next_stage_config(cot, tir, root="runs/x", index=2, previous_workdir=cot.workdir)
  assert names(c2.data) == [("sample:tir", 1.0)] and (c2.stage, c2.lr, c2.max_steps) == ("tir", 2e-3, 50)
  assert c2.model.init_checkpoint == "runs/x/stage1_cot/checkpoints" and c2.workdir == "runs/x/stage2_tir"
  assert c2.model.hf_path == "" and c2.model.init_step == -1
  tir.data.mixture = ("sample:tir=2", "sample:cot=1")
  c2 = next_stage_config(cot, tir, root="gs://b/r", index=2, previous_workdir="gs://b/r/stage1_cot")
  assert names(c2.data) == [("sample:tir", 2.0), ("sample:cot", 1.0)]
  assert (c2.workdir, c2.model.init_checkpoint) == ("gs://b/r/stage2_tir", "gs://b/r/stage1_cot/checkpoints")
  tir.data.mixture = ("sample:cot=3",)
  with pytest.raises(ValueError, match=r"config.next_stage: stage 'tir' would train on stage 'cot''s data "
                                       r"\['sample:cot'\]"):
    next_stage_config(cot, tir, root="w", index=2, previous_workdir="w/stage1_cot")
  with pytest.raises(ValueError, match=r"config.next_stage='tir' needs the config file's get_config\('tir'\)"):
    train(load_config_file(DEFAULT_CONFIG))
  with pytest.raises(ValueError, match="the stage2 block is gone"):
    check_overrides(cot, ["--config.stage2.enabled=True"])


def test_progress_writes_a_plain_line_every_n_steps_or_30_s_whichever_is_rarer(caplog):
  import io
  from numina_jax.progress import Progress
  now = [0.0]
  p = Progress("train[cot]", total=100, initial=0, every_steps=5, stream=io.StringIO(), clock=lambda: now[0])
  assert not p.interactive
  logged = []
  with caplog.at_level(logging.INFO, logger="numina_jax"):
    for step in range(1, 101):
      now[0] += 4.0  # 5 steps take 20 s, so the 30 s bound is the rarer one: a line every 8 steps (32 s)
      if step % 5 == 0:
        p.note({"loss": 1.0 / step, "lr": 1e-3, "tokens_per_s": 1234.0})
      p.update(step)
      logged += [(step, r.getMessage()) for r in caplog.records]
      caplog.clear()
  assert [s for s, _ in logged] == list(range(8, 101, 8))
  assert logged[0][1] == ("train[cot] step 8/100 (8%), loss 0.2000, lr 1.00e-03, tok_s 1,234, elapsed 0:00:32, "
                          "eta 0:06:08")
  now[0] = 0.0
  q = Progress("x", total=100, initial=0, every_steps=10, stream=io.StringIO(), clock=lambda: now[0])
  with caplog.at_level(logging.INFO, logger="numina_jax"):
    for step in range(1, 31):
      now[0] += 60.0  # slow steps: every 10 steps is the rarer bound
      q.update(step)
  assert [r.getMessage().split(",")[0] for r in caplog.records] == [f"x step {s}/100 (%d%%)" % s for s in (10, 20, 30)]


def test_metric_writer_drops_lines_logged_past_the_resume_step(tmp_path):
  """A run that logged steps 1-5 but last saved step 3 resumes at 3: steps 4 and 5 are not logged twice."""
  from numina_jax.metrics import MetricWriter, read_metrics
  w = MetricWriter(str(tmp_path), resume_step=0)
  for s in range(1, 6):
    w.write(s, {"loss": float(s)})
  w.write(3, {"eval_loss": 0.5})
  w.close()
  w = MetricWriter(str(tmp_path), resume_step=3)
  w.write(4, {"loss": 40.0})
  w.close()
  assert [(r["step"], r.get("loss", r.get("eval_loss"))) for r in read_metrics(str(tmp_path))] == [
      (1, 1.0), (2, 2.0), (3, 3.0), (3, 0.5), (4, 40.0)]


@pytest.mark.slow
def test_a_stage_ends_with_sctir_on_its_held_out_problems(tmp_path):
  """The demo's last step, through the CLI: real sampling of the trained model and real sandboxed python on the
  rows the run held out, written by the evaluation CLI's code."""
  from numina_jax.data.pipeline import held_out_rows
  from numina_jax.eval.datasets import held_out_set
  cfg = base_config()
  cfg.data.dataset_name = "sample:tir"
  (spec, rows), = held_out_rows(cfg.data)
  assert len(rows) == round(0.02 * 600)  # data.eval_size of the 600 sample rows
  s = held_out_set(cfg.data, limit=3)
  assert [p.id for p in s.problems] == [str(i) for i in rows[:3]] and all(isinstance(p.answer, int) for p in s)

  wd = tmp_path / "run"
  res = subprocess.run(_cli(wd, "--config.max_steps=2", "--config.seq_len=512", "--config.data.dataset_name=sample:tir",
                            "--config.stage=tir",
                            "--config.sctir.at_end=True", "--config.sctir.limit=3", "--config.sctir.samples=2",
                            "--config.sctir.every_steps=1", "--config.checkpoint.best_metric=sctir_maj",
                            "--config.sctir.max_tokens_per_round=16", "--config.sctir.max_len=512"),
                       cwd=REPO, env=cpu_env(1), capture_output=True, text=True, timeout=900)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  summary = json.loads((wd / "sctir" / "summary.json").read_text())
  assert summary["set"]["problems"] == 3 and summary["backend"]["kind"] == "training"
  assert summary["backend"]["step"] == 2 and summary["config"]["samples"] == 2
  traces = [json.loads(line) for line in open(wd / "sctir" / "traces.jsonl")]
  assert sorted({t["problem"] for t in traces}) == sorted(str(i) for i in rows[:3]) and len(traces) == 6
  assert all(0 < t["generated_tokens"] <= 2 * 16 for t in traces)
  assert (wd / "sctir" / "maj_at_k.png").stat().st_size > 0
  assert "3 problems x 2 traces" in res.stdout and "sctir:" in res.stdout
  run_summary = json.loads((wd / "summary.json").read_text())
  assert run_summary["sctir"]["num_problems"] == 3
  # During training (sctir.every_steps=1): logged like the eval loss, and the checkpoints ranked by it.
  rows = [json.loads(line) for line in open(wd / "metrics.jsonl")]
  sctir_rows = {r["step"]: r for r in rows if "sctir_maj" in r}
  assert sorted(sctir_rows) == [1, 2] and all(0 <= r["sctir_maj"] <= 1 for r in sctir_rows.values())
  assert (wd / "sctir" / "step_1" / "summary.json").exists() and (wd / "sctir" / "step_2" / "summary.json").exists()
  mgr = training_manager(str(wd / "checkpoints"), max_to_keep=3)
  recorded = {s: mgr.metrics(s) for s in mgr.all_steps()}
  mgr.close()
  assert {s: m["sctir_maj"] for s, m in recorded.items() if m} == {s: r["sctir_maj"] for s, r in sctir_rows.items()}


def test_the_best_checkpoint_follows_the_recorded_score(tmp_path):
  """checkpoint.score ranks steps: SC-TIR maj@N (higher better) when the run chose it, else minus the eval loss;
  BestN keeps the best and best_step() (what a next stage starts from) names it."""
  import orbax.checkpoint as ocp
  from numina_jax.checkpoint import best_step
  d = str(tmp_path / "ckpt")
  mgr = training_manager(d, max_to_keep=1, keep_best=1, async_save=False)
  for step, metrics in ((1, {"sctir_maj": 0.5, "score": 0.5}), (2, {"sctir_maj": 0.75, "score": 0.75}),
                        (3, None), (4, {"sctir_maj": 0.25, "score": 0.25})):
    mgr.save(step, args=ocp.args.Composite(x=ocp.args.JsonSave({"step": step})), metrics=metrics, force=True)
  mgr.wait_until_finished()
  assert sorted(mgr.all_steps()) == [2, 4]  # the best (0.75) and the latest
  mgr.close()
  assert best_step(d) == 2
  d2 = str(tmp_path / "old")  # a run that recorded only eval losses: the lowest wins
  mgr = training_manager(d2, max_to_keep=1, keep_best=1, async_save=False)
  for step, loss in ((1, 2.0), (2, 1.5), (3, 1.7)):
    mgr.save(step, args=ocp.args.Composite(x=ocp.args.JsonSave({})), metrics={"eval_loss": loss}, force=True)
  mgr.wait_until_finished()
  assert sorted(mgr.all_steps()) == [2, 3]
  mgr.close()
  assert best_step(d2) == 2
