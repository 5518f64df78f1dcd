"""Joining a multi-host job: `jax.distributed.initialize()` as the first JAX call, with errors that say what to check.

Nothing in numina_jax touches the XLA backend at import or config validation, so `train()` can call this first.
"""

from __future__ import annotations

import logging
import socket
import time

import jax

log = logging.getLogger("numina_jax")


class DistributedStartError(RuntimeError):
  pass


def initialize(dist_cfg) -> None:
  """Connects this process to the job described by `config.distributed` (unset fields are auto-detected).

  On Cloud TPU, SLURM, Open MPI and Kubernetes jax finds the coordinator, process count and index itself; anywhere
  else (two processes on one machine included) set all three fields. Called twice, the second call does nothing.
  """
  from jax._src import distributed as jax_distributed
  from jax._src import xla_bridge

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
