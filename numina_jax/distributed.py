"""Joining a multi-host job: `jax.distributed.initialize()` as the first JAX call, with errors that say what to check;
and `JaxHosts`, how the hosts of a job agree on what only one of them can decide (process 0's value for all).

Nothing in numina_jax touches the XLA backend at import or config validation, so `train()` can call this first.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from typing import Any

import jax
import numpy as np
from jax._src import distributed as jax_distributed
from jax._src import xla_bridge
from jax.experimental import multihost_utils

log = logging.getLogger("numina_jax")


class DistributedStartError(RuntimeError):
  pass


def initialize(dist_cfg) -> None:
  """Connects this process to the job described by `config.distributed` (unset fields are auto-detected).

  On Cloud TPU, SLURM, Open MPI and Kubernetes jax finds the coordinator, process count and index itself; anywhere
  else (two processes on one machine included) set all three fields. Called twice, the second call does nothing.
  """

  if jax_distributed.global_state.client is not None:
    return
  address = dist_cfg.coordinator_address or None
  num = dist_cfg.num_processes or None
  pid = dist_cfg.process_id if dist_cfg.process_id >= 0 else None
  where = (f"coordinator {address or 'auto-detected'}, num_processes {num or 'auto-detected'}, "
           f"process_id {'auto-detected' if pid is None else pid}")
  if xla_bridge.backends_are_initialized():
    raise DistributedStartError(f"cannot join the multi-host job ({where}): a JAX call already started the "
                                f"backend in this process; jax.distributed.initialize() must come first")
  explicit = None not in (address, num, pid)
  hint = ("check that process 0 is running and reachable at that address (host, port, firewall), that every "
          "process was started with the same num_processes and its own process_id, and that all started within "
          f"config.distributed.initialization_timeout ({dist_cfg.initialization_timeout} s)") if explicit else (
          "off Cloud TPU, SLURM, Open MPI and Kubernetes set config.distributed.coordinator_address (host:port of "
          "process 0), num_processes and process_id")
  # The runtime aborts the process (no Python exception) when it cannot reach the coordinator: say first what
  # is being tried, and check a given address ourselves so the common mistakes get a plain error.
  log.info("joining a multi-host job (%s)", where)
  if address is not None and pid is not None:
    _check_coordinator(address, pid, float(dist_cfg.initialization_timeout), where, hint)
  try:
    jax.distributed.initialize(
        coordinator_address=address, num_processes=num, process_id=pid,
        initialization_timeout=int(dist_cfg.initialization_timeout),
        # All three given: skip probing for a cluster environment (it may query a metadata server).
        cluster_detection_method="deactivate" if explicit else None)
  except Exception as e:  # jax raises ValueError, RuntimeError or its own XlaRuntimeError here
    raise DistributedStartError(f"jax.distributed.initialize failed ({where}): {type(e).__name__}: "
                                f"{str(e).strip()[:500]}. {hint}") from e
  log.info("joined the job as process %d of %d (%d local devices, %d in all)", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())


def _check_coordinator(address: str, pid: int, timeout: float, where: str, hint: str) -> None:
  """Process 0: the port is free to listen on. Others: something listens there within `timeout` seconds."""
  host, sep, port = address.rpartition(":")
  if not sep or not port.isdigit():
    raise DistributedStartError(f"config.distributed.coordinator_address {address!r} is not host:port")
  host = host.strip("[]")
  if pid == 0:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      try:
        s.bind(("", int(port)))
      except OSError as e:
        raise DistributedStartError(f"cannot start the coordinator ({where}): port {port} is not free here "
                                    f"({e.strerror}); pick another port for every process") from None
    return
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=2):
        return
    except OSError as e:
      if time.monotonic() > deadline:
        raise DistributedStartError(f"jax.distributed.initialize failed ({where}): no coordinator answered at "
                                    f"{address} within {timeout:g} s ({e.strerror or e}). {hint}") from None
      time.sleep(0.5)


def broadcast_json(value: Any) -> Any:
  """Process 0's `value` (anything `json.dumps` writes) on every process, decoded from JSON on all of them alike
  (tuples come back as lists, dict keys as strings). Every process must call it at the same point; what the others
  pass is ignored. Two collectives: the length, then the bytes in a power-of-two buffer (few shapes to compile)."""
  if jax.process_count() == 1:
    return json.loads(json.dumps(value))
  data = json.dumps(value, ensure_ascii=False).encode() if jax.process_index() == 0 else b""
  n = int(multihost_utils.broadcast_one_to_all(np.asarray(len(data), np.int32)))
  buffer = np.zeros(max(256, 1 << max(n - 1, 0).bit_length()), np.uint8)
  buffer[:len(data)] = np.frombuffer(data, np.uint8)
  buffer = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
  return json.loads(buffer[:n].tobytes().decode())


class JaxHosts:
  """The processes of this JAX job as code that runs the same program on every one of them sees them: `is_main`
  (process 0, the one that writes files and runs what is not deterministic, such as the model's python) and
  `share(value)`, process 0's value on every process (`broadcast_json`)."""

  def __init__(self):
    self.index, self.count = jax.process_index(), jax.process_count()

  @property
  def is_main(self) -> bool:
    return self.index == 0

  def share(self, value: Any) -> Any:
    return broadcast_json(value)
