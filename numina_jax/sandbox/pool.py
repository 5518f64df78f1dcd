"""Runs sandboxed calls in parallel: one thread per call in flight, each driving its own bwrap process."""

from __future__ import annotations

import concurrent.futures
import os
from typing import Iterable

from numina_jax.sandbox.config import SandboxConfig, resolve
from numina_jax.sandbox.run import PythonSession, SandboxResult, run_python


class SandboxPool:
  """`workers` sandboxes at a time. `submit` returns a future; `map` returns results in the order of the codes.

  A call with `session=` runs in that stateful session (one call at a time per session; sessions run in parallel).
  """

  def __init__(self, workers: int | None = None, config: SandboxConfig | None = None, **overrides):
    workers = (os.cpu_count() or 1) if workers is None else workers
    if not isinstance(workers, int) or workers < 1:
      raise ValueError(f"SandboxPool workers must be a positive int, got {workers!r}")
    self.workers = workers
    self.config = resolve(config, overrides)
    self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox")

  def submit(self, code: str, session: PythonSession | None = None,
             **overrides) -> concurrent.futures.Future[SandboxResult]:
    if session is not None:
      timeout_s = overrides.pop("timeout_s", None)
      if overrides:
        raise TypeError(f"a session call takes only timeout_s; set {sorted(overrides)} on the PythonSession")
      return self._executor.submit(session.run, code, timeout_s=timeout_s)
    return self._executor.submit(run_python, code, self.config.replace(**overrides))

  def map(self, codes: Iterable[str], **overrides) -> list[SandboxResult]:
    futures = [self.submit(code, **overrides) for code in codes]
    return [f.result() for f in futures]

  def session(self, **overrides) -> PythonSession:
    """A new stateful session with this pool's config (and `overrides`)."""
    return PythonSession(self.config.replace(**overrides))

  def close(self, cancel: bool = False) -> None:
    """Waits for the calls in flight; `cancel` drops those not started yet."""
    self._executor.shutdown(wait=True, cancel_futures=cancel)

  def __enter__(self) -> "SandboxPool":
    return self

  def __exit__(self, exc_type, *exc) -> None:
    self.close(cancel=exc_type is not None)
