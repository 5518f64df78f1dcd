"""Two hosts x 4 CPU devices through the real CLI: the losses of one host x 8, hosts that agree on every save (a
skewed clock on one host, SIGTERM to one host), a two-host HF export equal to the one-host export, and elastic
resume of a two-host checkpoint on one host and on another mesh."""

import json
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
