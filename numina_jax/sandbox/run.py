"""Sandboxed python: a fresh interpreter per call (`run_python`), or one stateful interpreter per trace
(`PythonSession`); both return a `SandboxResult` whose `.output` is what the model is shown."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import signal
import threading
import time

from numina_jax.sandbox.bwrap import Exchange, Sandbox, exchange, find_bwrap
from numina_jax.sandbox.config import SandboxConfig, SandboxError, resolve

STATUSES = ("ok", "error", "timeout", "killed")
RESTARTED = "The python session was restarted: variables and imports from earlier calls are gone."


@dataclasses.dataclass(frozen=True)
class SandboxResult:
  status: str  # "ok" | "error" (an exception, or a non-zero exit) | "timeout" | "killed" (a signal, an output flood)
  output: str  # what the model is shown: stdout, stderr, then the condensed traceback or the reason it stopped
  stdout: str  # as written, up to max_capture_bytes in all with stderr
  stderr: str
  error: str  # the condensed traceback, or why the code was stopped, or that a session restarted; often "" when ok
  returncode: int | None  # the interpreter's exit status (None: a session still running)
  wall_s: float  # the whole call, as the caller waited for it
  truncated: bool  # the output was cut: to max_output_chars for `.output`, or past max_capture_bytes

  @property
  def ok(self) -> bool:
    return self.status == "ok"


def _cut(text: str, limit: int) -> tuple[str, bool]:
  """`text` in at most `limit` characters plus a marker: its start and its end, the middle dropped."""
  if len(text) <= limit:
    return text, False
  head = limit * 2 // 3
  tail = limit - head
  return f"{text[:head]}\n[... {len(text) - limit} characters cut ...]\n{text[len(text) - tail:]}", True


def _join(a: str, b: str) -> str:
  return a + ("\n" if a and b and not a.endswith("\n") else "") + b


def shown_output(stdout: str, stderr: str, error: str, limit: int, dropped: int = 0) -> tuple[str, bool]:
  """What the model sees, at most `limit` characters plus markers: the output (and a note of `dropped` bytes never
  kept) cut in the middle if needed, then the error or stop reason, whose end (the exception line) is kept."""
  body = _join(stdout, stderr)
  if dropped:
    body = _join(body, f"[... {dropped} more bytes of output were not kept ...]")
  if not error:
    return _cut(body, limit)
  cut_error = len(error) > limit // 2
  if cut_error:
    error = "..." + error[len(error) - limit // 2:]
  body, cut_body = _cut(body, max(0, limit - len(error) - 1))
  return _join(body, error), cut_error or cut_body


def _signal_name(n: int) -> str:
  try:
    return signal.Signals(n).name
  except ValueError:
    return f"signal {n}"


def _stopped_reason(ex: Exchange, config: SandboxConfig, timeout_s: float, returncode: int | None,
                    session: bool) -> tuple[str, str]:
  """(status, error) for a call the launcher did not finish normally."""
  if ex.stopped == "timeout":
    return "timeout", f"Execution timed out after {timeout_s:g} s."
  if ex.stopped == "output":
    return "killed", f"Execution stopped: the output passed {config.max_capture_bytes} bytes."
  if returncode is not None and (returncode >= 128 or returncode < 0):  # bwrap reports a signal as 128 + number
    sig = returncode - 128 if returncode >= 128 else -returncode
    why = {signal.SIGXCPU: f" (the CPU time limit of {config.cpu_limit_s(session)} s)",
           signal.SIGSEGV: " (a crash, e.g. a stack overflow)"}.get(sig, "")
    return "killed", f"Execution was killed by {_signal_name(sig)}{why}."
  if returncode == 0:
    return "ok", ""
  if returncode is None:
    return "error", "The python process closed its connection to the sandbox."
  return "error", f"The python process exited with code {returncode}."


def _result(ex: Exchange, config: SandboxConfig, timeout_s: float, returncode: int | None, t0: float, *,
            session: bool, note: str = "") -> SandboxResult:
  if ex.stopped == "startup":
    raise SandboxError(f"the sandboxed interpreter did not start within {config.startup_timeout_s:g} s "
                       "(SandboxConfig.startup_timeout_s); is the host overloaded?")
  if ex.done is not None and ex.stopped is None:
    status, error = ex.done["status"], ex.done["error"]
  else:
    status, error = _stopped_reason(ex, config, timeout_s, returncode, session)
  if note:
    error = f"{error}\n{note}" if error else note
  stdout = bytes(ex.stdout).decode("utf-8", errors="replace")
  stderr = bytes(ex.stderr).decode("utf-8", errors="replace")
  output, cut = shown_output(stdout, stderr, error, config.max_output_chars, ex.dropped)
  return SandboxResult(status=status, output=output, stdout=stdout, stderr=stderr, error=error,
                       returncode=returncode, wall_s=time.perf_counter() - t0, truncated=cut or ex.dropped > 0)


def run_python(code: str, config: SandboxConfig | None = None, **overrides) -> SandboxResult:
  """Runs `code` in a fresh sandboxed interpreter. `overrides` are SandboxConfig fields, e.g. `timeout_s=10`.

  Returns a result for anything the code does (an exception, a timeout, a flood, a crash); raises SandboxError
  only when the sandbox itself cannot run (no working bwrap, a start-up that fails or hangs).
  """
  if not isinstance(code, str):
    raise TypeError(f"run_python takes the code as a str, got {type(code).__name__}")
  config = resolve(config, overrides)
  t0 = time.perf_counter()
  sb = Sandbox(find_bwrap(config), config, session=False)
  try:
    ex = exchange(sb, code, timeout_s=config.timeout_s, startup_timeout_s=config.startup_timeout_s,
                  max_capture_bytes=config.max_capture_bytes, session=False)
    if ex.started is None and ex.stopped is None:
      raise SandboxError(f"the sandboxed interpreter failed to start: {sb.stderr_after_exit()}")
  finally:
    sb.close()
  return _result(ex, config, config.timeout_s, sb.proc.returncode, t0, session=False)


# Sessions are started from this one long-lived thread: bwrap's --die-with-parent follows the thread that started
# it, and a pool thread that exits would take its sessions with it.
_spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-spawner")


class PythonSession:
  """One stateful interpreter in its own sandbox, as gpt-oss's python tool is: variables persist between `run`s.

  A call that times out or crashes kills the sandbox; its result says so and that the state is gone (as NeMo-Skills
  does), and the next call starts a fresh interpreter. Output past max_capture_bytes is read and dropped rather
  than killing the session. Processes the code leaves running live until the session restarts or closes.
  """

  def __init__(self, config: SandboxConfig | None = None, **overrides):
    self.config = resolve(config, overrides)
    self.restarts = 0  # how many times the interpreter was lost and started afresh
    self._sb: Sandbox | None = None
    self._lock = threading.Lock()
    self._closed = False

  def run(self, code: str, *, timeout_s: float | None = None) -> SandboxResult:
    """Runs `code` in the session's interpreter; `timeout_s` overrides the config's for this call."""
    if not isinstance(code, str):
      raise TypeError(f"PythonSession.run takes the code as a str, got {type(code).__name__}")
    timeout_s = self.config.timeout_s if timeout_s is None else timeout_s
    if not timeout_s > 0:
      raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    with self._lock:
      if self._closed:
        raise SandboxError("this PythonSession is closed")
      t0 = time.perf_counter()
      note = ""
      for _ in range(2):
        fresh = self._sb is None
        if fresh:
          self._sb = _spawner.submit(Sandbox, find_bwrap(self.config), self.config, session=True).result()
        sb = self._sb
        ex = exchange(sb, code, timeout_s=timeout_s, startup_timeout_s=self.config.startup_timeout_s,
                      max_capture_bytes=self.config.max_capture_bytes, session=True)
        if ex.started is not None or ex.stopped is not None:
          break
        # It ended before this call began. A fresh interpreter: the sandbox is broken. One from earlier calls (a
        # thread it left running spent its CPU budget, say): its state is gone, and the call runs on a fresh one.
        why = sb.stderr_after_exit()
        self._sb = None
        sb.close()
        if fresh:
          raise SandboxError(f"the sandboxed interpreter failed to start: {why}")
        self.restarts += 1
        _, reason = _stopped_reason(Exchange(), self.config, timeout_s, sb.proc.returncode, True)
        note = f"The python session had ended since the last call ({reason.rstrip('.')}). {RESTARTED}"
      alive = ex.done is not None and ex.stopped is None and sb.res_r in sb.open_fds
      if not alive:
        self._sb = None
        sb.close()
        self.restarts += 1
        note = RESTARTED
      return _result(ex, self.config, timeout_s, None if alive else sb.proc.returncode, t0, session=True,
                     note=note)

  def close(self) -> None:
    with self._lock:
      self._closed = True
      if self._sb is not None:
        self._sb.close()
        self._sb = None

  def __enter__(self) -> "PythonSession":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    if getattr(self, "_sb", None) is not None:
      self._sb.close()
