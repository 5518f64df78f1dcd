"""SIGTERM to one of two hosts (a spot preemption, or `launch/tpu_vm.sh stop`) stops both at the same step."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# One host: joins the job, then steps under the trainer's preemption guard until it agrees to stop.
HOST = """
import sys, time
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from numina_jax.trainer import _Preemption
with _Preemption() as preempt:
  print("ready", flush=True)
  for step in range(1, 2001):
    if preempt.agreed(step):
      print(f"stop at step {step}", flush=True)
      break
    time.sleep(0.01)
  else:
    print("never stopped", flush=True)
"""


@pytest.mark.slow
def test_sigterm_on_one_host_stops_both_at_an_agreed_step(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  hosts = [subprocess.Popen([sys.executable, "-c", HOST, f"127.0.0.1:{port}", str(i)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in (0, 1)]
  try:
    for h in hosts:
      assert h.stdout.readline().strip() == "ready", h.stderr.read() if h.poll() is not None else ""
    time.sleep(0.2)
    hosts[1].terminate()  # SIGTERM
    outs = [h.communicate(timeout=60) for h in hosts]
  finally:
    for h in hosts:
      if h.poll() is None:
        h.kill()
  lines = [out.strip().splitlines()[-1] for out, _ in outs]
  assert lines[0].startswith("stop at step ") and lines[0] == lines[1], (lines, [err[-2000:] for _, err in outs])
