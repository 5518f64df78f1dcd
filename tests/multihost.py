"""A multi-host job on one machine: the real `python -m numina_jax.train` CLI as N processes on 127.0.0.1 with
4 CPU devices each (collectives over gloo), every host's output captured, and a timeout that kills them all."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def cpu_env(devices: int, **extra: str) -> dict[str, str]:
  """This environment with `devices` fake CPU devices, JAX on CPU, and this checkout first on the path."""
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).split()
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  env.update(extra)
  return env


class Job:
  """`hosts` processes of `python -m numina_jax.train ARGS`, joined through `--config.distributed.*` overrides.

    with Job(args, log_dir=tmp_path) as job:
      job.wait_for(lambda: metrics_exist())
      job.signal(1, signal.SIGTERM)
      codes = job.wait()
  Leaving the block kills whatever still runs. Output goes to files (a full pipe would block a host).
  """

  def __init__(self, args: Sequence[str], *, log_dir: str | os.PathLike, hosts: int = 2, devices_per_host: int = 4,
               timeout: float = 300,
               host_env: Mapping[int, Mapping[str, str]] | None = None):
    self.args, self.hosts, self.timeout = list(args), hosts, timeout
    self.log_dir = Path(log_dir)
    self.log_dir.mkdir(parents=True, exist_ok=True)
    self.env = [cpu_env(devices_per_host, **dict((host_env or {}).get(i, {}))) for i in range(hosts)]
    self.procs: list[subprocess.Popen] = []
    self._deadline = 0.0

  def command(self, i: int, port: int) -> list[str]:
    return [sys.executable, "-m", "numina_jax.train", *self.args, "--config.multihost=True",
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            f"--config.distributed.num_processes={self.hosts}", f"--config.distributed.process_id={i}",
            "--config.distributed.initialization_timeout=120"]

  def log_path(self, i: int) -> Path:
    return self.log_dir / f"host{i}.log"

  def __enter__(self) -> "Job":
    port = free_port()
    self._deadline = time.time() + self.timeout
    for i in range(self.hosts):
      with open(self.log_path(i), "w") as out:
        self.procs.append(subprocess.Popen(self.command(i, port), cwd=REPO, env=self.env[i], stdout=out,
                                           stderr=subprocess.STDOUT, text=True, start_new_session=True))
    return self

  def __exit__(self, *exc) -> None:
    self.kill()

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    for p in self.procs:
      p.wait()

  def output(self, i: int) -> str:
    return self.log_path(i).read_text(errors="replace")

  def outputs(self, tail: int = 4000) -> str:
    return "\n".join(f"----- host {i} (exit {p.poll()}) -----\n{self.output(i)[-tail:]}"
                     for i, p in enumerate(self.procs))

  def signal(self, i: int, sig: int) -> None:
    self.procs[i].send_signal(sig)

  def wait_for(self, condition: Callable[[], bool], poll: float = 0.2) -> None:
    """Waits until `condition()` holds while every host still runs; a host that ended or the timeout fails."""
    while not condition():
      if any(p.poll() is not None for p in self.procs):
        self.kill()
        raise AssertionError("a host ended before the awaited condition\n" + self.outputs())
      if time.time() > self._deadline:
        self.kill()
        raise AssertionError(f"timed out after {self.timeout} s waiting for a condition (hang?)\n" + self.outputs())
      time.sleep(poll)

  def wait(self) -> list[int]:
    """Exit codes of all hosts; on the timeout (a hang) every host is killed and the test fails."""
    for p in self.procs:
      try:
        p.wait(timeout=max(self._deadline - time.time(), 0.1))
      except subprocess.TimeoutExpired:
        self.kill()
        raise AssertionError(f"timed out after {self.timeout} s (hang?); all hosts killed\n" + self.outputs())
    return [p.returncode for p in self.procs]
