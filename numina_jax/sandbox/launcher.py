"""Runs inside the sandbox (standard library only): drops to the sandbox user, sets rlimits, runs the code it is sent.

The host passes this file's text to `python -I -S -c`; see `numina_jax.sandbox.bwrap.Sandbox` for the arguments.
Requests arrive on fd `ctl` (8-byte big-endian length, then UTF-8 code); events go out on fd `res`, one line each:
`start` when the code begins, then `done ok` or `done error <hex of the UTF-8 condensed traceback>`. Nothing heavier
than `os` is imported before the code runs (json and traceback would cost more than the rest of the start-up).
"""

import _sitebuiltins
import builtins
import os
import resource
import sys

_MAX_ERROR_CHARS = 20000  # a traceback longer than this is cut from the front; the host truncates further
_sources: dict = {}  # cell file name -> code, for tracebacks


def _drop_user(uid: int, gid: int) -> None:
  # As root, bwrap maps host root into the namespace so the mounts can reach root-only folders; the code itself
  # must run as an ordinary uid, or RLIMIT_NPROC would not bind (the kernel exempts root) and files owned by root
  # would be its own.
  os.setgroups([])
  os.setgid(gid)
  os.setuid(uid)
  if os.getuid() != uid or os.geteuid() != uid:
    raise SystemExit(f"sandbox launcher: could not switch to uid {uid}")


def _set_limits(spec: str) -> None:
  """`spec`: NAME=soft:hard,... (e.g. RLIMIT_AS=1073741824:1073741824)."""
  for item in spec.split(","):
    name, values = item.split("=")
    soft, hard = values.split(":")
    resource.setrlimit(getattr(resource, name), (int(soft), int(hard)))


def _close_other_fds(keep: set) -> None:
  for fd in sorted(int(f) for f in os.listdir("/proc/self/fd")):
    if fd > 2 and fd not in keep:
      try:
        os.close(fd)
      except OSError:
        pass  # the directory's own fd, already closed


def _read_exact(fd: int, n: int):
  chunks, got = [], 0
  while got < n:
    chunk = os.read(fd, n - got)
    if not chunk:
      return None
    chunks.append(chunk)
    got += len(chunk)
  return b"".join(chunks)


def _send(fd: int, line: str) -> None:
  data = (line + "\n").encode()
  while data:
    data = data[os.write(fd, data):]


def _flush() -> None:
  for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
    try:
      stream.flush()
    except Exception:  # noqa: BLE001 - the user may have closed or replaced the stream
      pass


def _register_sources() -> None:
  """Puts the cells' code where tracebacks and `inspect` look for source lines, once linecache is loaded."""
  linecache = sys.modules.get("linecache")
  if linecache is not None:
    for name, code in _sources.items():
      linecache.cache[name] = (len(code), None, code.splitlines(True), name)


def _user_frames_only(te, summary, seen: set) -> None:
  """Keeps only frames of the user's cells in `te` and everything chained to it (cause, context, groups)."""
  if id(te) in seen:
    return
  seen.add(id(te))
  te.stack = summary.from_list([f for f in te.stack if f.filename.startswith("<cell")])
  for other in (te.__cause__, te.__context__, *(getattr(te, "exceptions", None) or ())):
    if other is not None:
      _user_frames_only(other, summary, seen)


def condensed_traceback(exc: BaseException) -> str:
  """The exception line and the frames in the user's code, as python prints them; the runner's frames and library
  internals are left out."""
  try:
    import traceback  # noqa: PLC0415 - loaded only when there is an error to format
    _register_sources()
    te = traceback.TracebackException.from_exception(exc)
    _user_frames_only(te, traceback.StackSummary, set())
    text = "".join(te.format()).rstrip("\n")
  except BaseException:  # noqa: BLE001 - out of memory or file descriptors: the bare exception line still helps
    try:
      text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    except BaseException:  # noqa: BLE001
      text = "Exception"
  if len(text) > _MAX_ERROR_CHARS:
    text = "..." + text[-_MAX_ERROR_CHARS:]
  return text


def run_cell(code: str, filename: str, namespace: dict, res: int) -> str:
  """Compiles and executes one cell in `namespace`; returns the "done" line."""
  _sources[filename] = code
  _register_sources()
  try:
    compiled = compile(code, filename, "exec", dont_inherit=True)
  except BaseException as exc:  # noqa: BLE001 - SyntaxError, or ValueError for NUL bytes: the user's error
    _send(res, "start")
    return _error(condensed_traceback(exc))
  _send(res, "start")
  try:
    exec(compiled, namespace)  # noqa: S102 - running the code is the point; containment is bwrap's and the rlimits'
  except SystemExit as exc:
    return "done ok" if exc.code in (None, 0) else _error(f"SystemExit: {exc.code}")
  except BaseException as exc:  # noqa: BLE001 - every user exception is reported, KeyboardInterrupt included
    return _error(condensed_traceback(exc))
  finally:
    _flush()
  return "done ok"


def _error(text: str) -> str:
  return "done error " + text.encode("utf-8", errors="backslashreplace").hex()


def main() -> None:
  mode, ctl, res, uid, gid, limits, *site = sys.argv[1:]
  ctl, res, uid, gid = int(ctl), int(res), int(uid), int(gid)
  if uid >= 0:
    _drop_user(uid, gid)
  _set_limits(limits)
  _close_other_fds({ctl, res})
  # What `site` would give, without running the installation's .pth files (python runs with -S for a fast start).
  sys.argv = ["-c"]
  sys.path[:0] = [""]  # like `python -c`: the working folder (the scratch tmpfs) is importable
  sys.path.extend(site)
  builtins.exit = _sitebuiltins.Quitter("exit", "Ctrl-D (i.e. EOF)")
  builtins.quit = _sitebuiltins.Quitter("quit", "Ctrl-D (i.e. EOF)")
  namespace = {"__name__": "__main__", "__builtins__": builtins}
  calls = 0
  while True:
    header = _read_exact(ctl, 8)
    if header is None:
      os._exit(0)
    code = (_read_exact(ctl, int.from_bytes(header, "big")) or b"").decode("utf-8", errors="replace")
    calls += 1
    done = run_cell(code, "<cell>" if mode == "once" else f"<cell {calls}>", namespace, res)
    _flush()
    _send(res, done)
    if mode == "once":
      # Leave at once: non-daemon threads and atexit hooks of the code do not hold the call open, and anything it
      # started dies with the namespace when this process (its pid 2) exits.
      os._exit(0 if done == "done ok" else 1)


if __name__ == "__main__":
  main()
