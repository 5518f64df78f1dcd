"""Two hosts x 4 CPU devices through the real CLI: the losses of one host x 8, hosts that agree on every save (a
skewed clock on one host, SIGTERM to one host), a two-host HF export equal to the one-host export, elastic
resume of a two-host checkpoint on one host and on another mesh, and SC-TIR during training equal to one host's."""

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from multihost import REPO, Job, cpu_env, free_port
from numina_jax.checkpoint import latest_step, load_params
from numina_jax.trainer import CLOCK_RATE_ENV, train
from test_trainer import TINY, losses

pytestmark = pytest.mark.slow

# One job for 8 devices: fsdp over all of them, so each host holds half of every sharded parameter. A constant
# learning rate makes the losses of step s independent of max_steps, so runs of any length compare step by step.
JOB = {**TINY, "mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1, "global_batch_size": 8, "warmup_ratio": 0.0,
       "optim.schedule": "constant", "data.eval_size": 8, "checkpoint_every_secs": 0, "export_hf": False}
REFERENCE_STEPS = 10
# 1-host and 2-host runs differ in the order of their all-reduce sums, other meshes in how they split matmuls.
RTOL = 1e-5


def cli_args(workdir, cache_dir, **overrides):
  values = {**JOB, **overrides, "workdir": workdir, "data.cache_dir": cache_dir, "next_stage": ""}
  return [f"--config.{k}={v}" for k, v in values.items()]


def job_config(workdir, cache_dir, **overrides):
  """The config the CLI builds from `cli_args` (configs/default.py and the same overrides), for in-process runs."""
  from numina_jax.config import DEFAULT_CONFIG, load_config
  return load_config([f"--config={DEFAULT_CONFIG}", *cli_args(str(workdir), str(cache_dir), **overrides)])


def saves(output: str) -> list[tuple[int, str]]:
  return [(int(s), r) for s, r in re.findall(r"checkpoint at step (\d+) \(([^)]*)\)", output)]


def metric_rows(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One process x 8 devices, uninterrupted (and it fills the token cache the two-host runs then share)."""
  root = tmp_path_factory.mktemp("multihost")
  wd = root / "one_host"
  train(job_config(wd, root / "cache", max_steps=REFERENCE_STEPS))
  return {"losses": losses(wd), "cache": root / "cache"}


def test_two_hosts_train_as_one_agree_on_time_based_saves_and_export_the_same_weights(reference, tmp_path):
  wd = tmp_path / "two_hosts"
  # Host 1's clock runs 1e9 times faster: it finds a time-based checkpoint due before every step, host 0
  # never. Hosts that acted on their own clocks would enter Orbax's collective save apart and hang.
  args = cli_args(wd, reference["cache"], max_steps=6, export_hf=True, checkpoint_every_secs=3600,
                  progress_bar=True)
  with Job(args, log_dir=tmp_path / "logs", host_env={1: {CLOCK_RATE_ENV: "1e9"}}, timeout=600) as job:
    codes = job.wait()
  assert codes == [0, 0], job.outputs()

  s0, s1 = saves(job.output(0)), saves(job.output(1))
  assert s0 == s1, job.outputs()
  assert [s for s, r in s0 if r == "time"] == [2, 4] and s0[-1] == (6, "end"), s0
  assert latest_step(str(wd / "checkpoints")) == 6

  # One writer: every step logged once, by host 0; the same losses as one host x 8 devices.
  rows = metric_rows(wd)
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
  assert [r["step"] for r in rows if "eval_loss" in r] == [6]
  two = losses(wd)
  np.testing.assert_allclose([two[s] for s in range(1, 7)], [reference["losses"][s] for s in range(1, 7)],
                             rtol=RTOL)
  # No progress bar in a log file (stderr is not a terminal): plain lines at most, no carriage returns.
  assert "\r" not in job.output(0)

  # The two-host export equals the one-host export of the same (final) parameters.
  from numina_jax.hf import save_pretrained
  import jax.numpy as jnp
  params, model_cfg = load_params(str(wd / "checkpoints"), step=6)
  one = tmp_path / "hf_one_host"
  save_pretrained(params, str(one), cfg=model_cfg, dtype=jnp.bfloat16, progress=False)
  two_hf = wd / "hf"
  files = sorted(p.name for p in one.iterdir())
  assert files and all((two_hf / f).exists() for f in files), (files, sorted(p.name for p in two_hf.iterdir()))
  for f in files:
    assert (two_hf / f).read_bytes() == (one / f).read_bytes(), f


def test_sigterm_to_one_host_stops_both_at_one_step_and_resumes_on_one_host_and_other_meshes(reference, tmp_path):
  wd = tmp_path / "two_hosts"
  args = cli_args(wd, reference["cache"], max_steps=100000)
  metrics = wd / "metrics.jsonl"
  with Job(args, log_dir=tmp_path / "logs", timeout=600) as job:
    job.wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1)
    job.signal(1, signal.SIGTERM)
    codes = job.wait()
  assert codes == [0, 0], job.outputs()
  assert "SIGTERM received" in job.output(1) and "SIGTERM received" not in job.output(0)
  s0, s1 = saves(job.output(0)), saves(job.output(1))
  assert s0 == s1 and len(s0) == 1 and s0[0][1] == "stop", job.outputs()
  k = s0[0][0]
  assert latest_step(str(wd / "checkpoints")) == k
  assert k + 2 <= REFERENCE_STEPS, f"stopped at step {k}, past the reference run; raise REFERENCE_STEPS"
  two = losses(wd)
  assert sorted(two) == list(range(1, k + 1))
  ref = reference["losses"]
  np.testing.assert_allclose([two[s] for s in range(1, k + 1)], [ref[s] for s in range(1, k + 1)], rtol=RTOL)

  # Elastic resume, here in this process (1 host x 8 devices): first on fsdp 4 x tensor 2 for one step, then back
  # on fsdp 8 for one more; both continue with the losses of the uninterrupted run.
  cache = reference["cache"]
  r = train(job_config(wd, cache, max_steps=100000, **{"mesh.fsdp": 4, "mesh.tensor": 2}), stop_at_step=k + 1)
  assert (r["start_step"], r["final_step"]) == (k, k + 1)
  r = train(job_config(wd, cache, max_steps=100000), stop_at_step=k + 2)
  assert (r["start_step"], r["final_step"]) == (k + 1, k + 2)
  resumed = losses(wd)
  assert sorted(resumed) == list(range(1, k + 3))
  np.testing.assert_allclose([resumed[k + 1], resumed[k + 2]], [ref[k + 1], ref[k + 2]], rtol=RTOL)


def test_a_failed_multihost_start_names_the_coordinator(tmp_path):
  port = free_port()  # nothing listens there
  res = subprocess.run(
      [sys.executable, "-m", "numina_jax.train", f"--config.workdir={tmp_path / 'run'}", "--config.multihost=True",
       f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2",
       "--config.distributed.process_id=1", "--config.distributed.initialization_timeout=3"],
      cwd=REPO, env=cpu_env(4), capture_output=True, text=True, timeout=300)
  assert res.returncode != 0
  err = res.stderr
  assert f"jax.distributed.initialize failed (coordinator 127.0.0.1:{port}, num_processes 2, process_id 1)" in err
  assert "check that process 0 is running and reachable at that address" in err
  assert "Traceback" not in err


# SC-TIR after steps 1 and 2 (ranking the checkpoints) and at the end: 2 held-out problems x 2 traces x 2 rounds.
SCTIR = {"max_steps": 2, "sctir.every_steps": 1, "sctir.at_end": True, "checkpoint.best_metric": "sctir_maj",
         "sctir.limit": 2, "sctir.samples": 2, "sctir.rounds": 2, "sctir.max_tokens_per_round": 16,
         "sctir.max_len": 512}


def sctir_records(folder):
  """traces.jsonl of an SC-TIR run, less the call timings (wall clock)."""
  rows = [json.loads(line) for line in (folder / "traces.jsonl").read_text().splitlines()]
  for r in rows:
    r["tool_calls"] = [{k: v for k, v in c.items() if k != "wall_s"} for c in r["tool_calls"]]
  return rows


def one_host_sctir(cfg, checkpoints, step, out):
  """The trainer's SC-TIR (`trainer.sctir_setup`, `write_evaluation`) in this process, one host x 8 devices, of
  the parameters saved at `step`."""
  from numina_jax import data as data_lib
  from numina_jax.checkpoint import load_model_config
  from numina_jax.eval.report import write_evaluation
  from numina_jax.model.params import param_specs
  from numina_jax.sharding import make_mesh, param_shardings
  from numina_jax.trainer import sctir_setup
  mesh = make_mesh(dict(cfg.mesh))
  model_cfg = load_model_config(checkpoints, step)
  params, _ = load_params(checkpoints, step=step, shardings=param_shardings(param_specs(model_cfg), mesh))
  eval_set, sctir_cfg, sampler = sctir_setup(cfg, model_cfg, params, mesh)
  out.mkdir(parents=True)
  return write_evaluation(eval_set, sampler, data_lib.load_tokenizer(cfg.data.tokenizer), sctir_cfg, out,
                          {"kind": "one host"}, echo=False)["metrics"]


def test_two_hosts_run_sctir_during_training_token_for_token_as_one_host(tmp_path):
  """sctir.every_steps and sctir.at_end on two hosts through the CLI: both hosts sample together and agree on the
  saves, process 0 writes, the recorded maj@2 ranks the checkpoints, and the traces are one host's, token for token,
  for the same saved parameters."""
  wd = tmp_path / "two_hosts"
  with Job(cli_args(wd, tmp_path / "cache", **SCTIR), log_dir=tmp_path / "logs", timeout=600) as job:
    codes = job.wait()
  assert codes == [0, 0], job.outputs()
  # Both hosts took the same saves; process 0 alone echoed the final evaluation.
  assert saves(job.output(0)) == saves(job.output(1)) == [(1, "sctir"), (2, "end")], job.outputs()
  assert "2 problems x 2 traces" in job.output(0) and "2 problems x 2 traces" not in job.output(1)

  runs = {d: wd / "sctir" / d for d in ("step_1", "step_2", ".")}
  records = {d: sctir_records(folder) for d, folder in runs.items()}
  summaries = {d: json.loads((folder / "summary.json").read_text()) for d, folder in runs.items()}
  assert [len(r) for r in records.values()] == [4, 4, 4]
  assert all(0 < t["generated_tokens"] <= 2 * 16 for rows in records.values() for t in rows)
  assert all(s["backend"]["hosts"] == 2 for s in summaries.values())
  assert records["."] == records["step_2"]  # at the end: the same parameters and seeds as after step 2

  # metrics.jsonl (process 0's) holds each step's maj@2, the checkpoints were ranked by the same values, and both
  # are the maj@2 of the traces written.
  maj = {r["step"]: r["sctir_maj"] for r in metric_rows(wd) if "sctir_maj" in r}
  assert maj == {s: summaries[f"step_{s}"]["metrics"]["maj_at"]["2"] for s in (1, 2)}
  from numina_jax.checkpoint import training_manager
  mgr = training_manager(str(wd / "checkpoints"), max_to_keep=3)
  recorded = {s: mgr.metrics(s) for s in mgr.all_steps()}
  mgr.close()
  assert {s: m["sctir_maj"] for s, m in recorded.items() if m} == maj
  assert json.loads((wd / "summary.json").read_text())["sctir"]["maj_at_n"] == maj[2]

  # The same parameters and seeds on 1 host x 8 devices: the same tokens, answers and tool calls, the same metrics.
  cfg = job_config(wd, tmp_path / "cache", **SCTIR)
  for s in (1, 2):
    metrics = one_host_sctir(cfg, str(wd / "checkpoints"), s, tmp_path / "one_host" / f"step_{s}")
    assert sctir_records(tmp_path / "one_host" / f"step_{s}") == records[f"step_{s}"], s
    assert json.loads(json.dumps(metrics)) == summaries[f"step_{s}"]["metrics"], s


def test_two_hosts_run_the_models_python_once_and_feed_every_host_its_output(tmp_path):
  """SC-TIR's host protocol on scripted traces whose python prints a random number (a tiny random model writes no
  python call): process 0 runs the code in its sandbox (stateful: the second call reads the first one's variable),
  and both hosts feed the sampler the same tokens next round; process 0 alone writes; a sandbox that fails on
  process 0 fails every host."""
  import multihost_sctir_worker as worker
  from numina_jax.data import demo_tokenizer
  env = cpu_env(4)
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(worker.__file__), env["PYTHONPATH"]])
  port = free_port()
  procs = [subprocess.Popen([sys.executable, worker.__file__, str(port), str(i), str(tmp_path / str(i))], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    logs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
  a, b = (json.loads((tmp_path / str(i) / "asked.json").read_text()) for i in range(2))
  assert a["prompts"] == b["prompts"] and a["maj"] == b["maj"] == 1.0
  assert sorted(p.name for p in (tmp_path / "0" / "sctir").iterdir()) == ["maj_at_k.png", "summary.json",
                                                                           "traces.jsonl"]
  assert list((tmp_path / "1" / "sctir").iterdir()) == []

  tok = demo_tokenizer()
  traces = [json.loads(line) for line in (tmp_path / "0" / "sctir" / "traces.jsonl").read_text().splitlines()]
  assert len(traces) == len(worker.PROBLEMS) * worker.SAMPLES
  drawn = []
  for t in traces:
    first, second = t["tool_calls"]
    assert (first["status"], second["status"]) == ("ok", "ok"), t["tool_calls"]
    x = int(first["output"])
    assert second["output"].startswith(f"{x + 1}\n")  # the session kept x
    drawn.append(x)
    # What host 1 sent in round 2 carries host 0's output, and the final trace extends its round-3 prompt.
    round2, round3 = (b["prompts"][f"{t['problem']}/{t['trace']}/{r}"] for r in (2, 3))
    assert tok.decode(round2).endswith(f"<|message|>{x}\n<|end|><|start|>assistant")
    assert t["token_ids"][:len(round3)] == round3 and len(t["token_ids"]) > len(round3)
  assert len(set(drawn)) == len(drawn)  # the outputs are random: hosts that each ran the code would disagree
  assert a["failure"].startswith("SandboxError: no working bubblewrap")
  assert b["failure"].startswith("HostError: probing the sandbox failed on the main host: SandboxError: no working "
                                 "bubblewrap")
