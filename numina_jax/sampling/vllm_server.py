"""Start a local vLLM OpenAI-compatible server for a model folder, wait until it is healthy, stop it (process group).

  python -m numina_jax.sampling.vllm_server runs/demo/stage2_tir/hf --python .venv-vllm/bin/python --dtype float32
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

import httpx2 as httpx
from tqdm.auto import tqdm


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port nobody listens on right now (the OS's pick)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def tail(path: str | os.PathLike, lines: int = 40) -> str:
  try:
    with open(path, "rb") as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(0, f.tell() - 64 * 1024))
      text = f.read().decode("utf-8", "replace")
  except OSError as e:
    return f"(cannot read {path}: {e})"
  return "\n".join(text.splitlines()[-lines:])


class VllmServer:
  """`python -m vllm.entrypoints.openai.api_server` (what `vllm serve` runs) on `host`:`port` for `model_dir`.

  `python` is the interpreter of a venv with vLLM (its own venv: vLLM pins its own torch). The server runs in its
  own process group, logging to `log_path` (a temporary file by default); `start()` returns once `/health`
  answers 200 and raises with the log's tail when the server exits or is not ready in `startup_timeout_s`.
  `stop()` ends the whole group (API server and engine core). `env` is added to this process's environment, less
  PYTHONPATH (the server's venv must not import this one's packages). On vLLM's CPU build, set
  VLLM_CPU_KVCACHE_SPACE (GiB of KV cache, default 4) to fit the machine.
  """

  def __init__(self, model_dir: str | os.PathLike, *, python: str | os.PathLike = sys.executable,
               served_model_name: str | None = None, host: str = "127.0.0.1", port: int | None = None,
               dtype: str = "auto", max_model_len: int | None = None, enforce_eager: bool = False,
               extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
               startup_timeout_s: float = 600.0, log_path: str | os.PathLike | None = None):
    self.model_dir = Path(model_dir)
    if not (self.model_dir / "config.json").is_file():
      raise FileNotFoundError(f"{self.model_dir} has no config.json: not a Hugging Face model folder")
    self.python = str(python)
    if not os.access(self.python, os.X_OK):
      raise FileNotFoundError(f"python {self.python} not found or not executable; make a vLLM venv "
                              "(tests/setup_vllm.sh makes .venv-vllm/)")
    self.served_model_name = served_model_name or self.model_dir.name
    self.host = host
    self.port = port or free_port(host)
    self.args = ["-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
                 "--served-model-name", self.served_model_name, "--host", host, "--port", str(self.port),
                 "--dtype", dtype]
    if max_model_len is not None:
      self.args += ["--max-model-len", str(max_model_len)]
    if enforce_eager:
      self.args.append("--enforce-eager")
    self.args += list(extra_args)
    self.env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    self.env.update(env or {})
    self.startup_timeout_s = startup_timeout_s
    self.log_path = Path(log_path) if log_path else None
    self.proc: subprocess.Popen | None = None

  @property
  def url(self) -> str:
    return f"http://{self.host}:{self.port}"

  def start(self) -> "VllmServer":
    if self.proc is not None:
      raise RuntimeError(f"vLLM server at {self.url} already started")
    if self.log_path is None:
      fd, name = tempfile.mkstemp(prefix=f"vllm-{self.port}-", suffix=".log")
      os.close(fd)
      self.log_path = Path(name)
    with open(self.log_path, "wb") as log:
      self.proc = subprocess.Popen([self.python, *self.args], stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
    try:
      self._wait_healthy()
    except BaseException:
      self.stop()
      raise
    return self

  def _wait_healthy(self) -> None:
    deadline = time.monotonic() + self.startup_timeout_s
    # A minute or more on CPU; the bar shows only on a terminal.
    with httpx.Client(timeout=5.0) as client, tqdm(desc=f"starting vLLM (log: {self.log_path})",
                                                   bar_format="{desc}: {elapsed}", disable=None) as bar:
      while True:
        bar.refresh()
        code = self.proc.poll()
        if code is not None:
          raise RuntimeError(f"vLLM server for {self.model_dir} exited with status {code} before it was ready; "
                             f"the end of its log {self.log_path}:\n{tail(self.log_path)}")
        try:
          if client.get(self.url + "/health").status_code == 200:
            return
        except httpx.TransportError:
          pass
        if time.monotonic() > deadline:
          raise TimeoutError(f"vLLM server at {self.url} not healthy after {self.startup_timeout_s:g} s; "
                             f"the end of its log {self.log_path}:\n{tail(self.log_path)}")
        time.sleep(1.0)

  def stop(self, grace_s: float = 30.0) -> None:
    """SIGTERM to the server's process group, SIGKILL to whatever of it is left after `grace_s`."""
    proc, self.proc = self.proc, None
    if proc is None:
      return
    try:
      os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
      pass
    # The API server is the group's leader; the engine core, its child, may outlive it briefly.
    if not _group_ends(proc, grace_s):
      try:
        os.killpg(proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      _group_ends(proc, 10.0)

  def __enter__(self) -> "VllmServer":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()


def _group_ends(proc: subprocess.Popen, wait_s: float) -> bool:
  """Whether the leader `proc` and every other process of its group are gone within `wait_s`."""
  deadline = time.monotonic() + wait_s
  while True:
    proc.poll()  # reaps the leader, else it lingers as a zombie in the group
    try:
      os.killpg(proc.pid, 0)
    except ProcessLookupError:
      return True
    if time.monotonic() > deadline:
      return False
    time.sleep(0.2)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m numina_jax.sampling.vllm_server",
      description="Serve a Hugging Face model folder with vLLM on this machine until Ctrl-C, then stop it whole. "
                  "Arguments after -- go to vLLM unchanged.")
  parser.add_argument("model_dir", help="model folder (config.json, safetensors, tokenizer), e.g. an export")
  parser.add_argument("--python", default=os.environ.get("NUMINA_VLLM_PYTHON", ".venv-vllm/bin/python"),
                      help="python of the venv with vLLM (default: $NUMINA_VLLM_PYTHON or .venv-vllm/bin/python)")
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--port", type=int, default=None, help="default: a free port")
  parser.add_argument("--name", default=None, help="served model name (default: the folder's name)")
  parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 (float32 to match transformers)")
  parser.add_argument("--max-model-len", type=int, default=None, help="longest prompt + completion")
  parser.add_argument("--enforce-eager", action="store_true", help="no compilation: starts sooner, runs slower")
  parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for /health")
  parser.add_argument("--log", default=None, help="server log file (default: a temporary file)")
  args_list = list(sys.argv[1:] if argv is None else argv)
  split = args_list.index("--") if "--" in args_list else len(args_list)
  args = parser.parse_args(args_list[:split])
  try:
    server = VllmServer(args.model_dir, python=args.python, served_model_name=args.name, host=args.host,
                        port=args.port, dtype=args.dtype, max_model_len=args.max_model_len,
                        enforce_eager=args.enforce_eager, extra_args=args_list[split + 1:],
                        startup_timeout_s=args.startup_timeout, log_path=args.log)
  except FileNotFoundError as e:
    parser.error(str(e))
  # Both stop the server, also when this was started in the background (where SIGINT comes ignored).
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
  signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with server:
      print(f"serving {server.served_model_name!r} at {server.url} (log: {server.log_path}); Ctrl-C stops it",
            file=sys.stderr)
      code = server.proc.wait()
      sys.exit(f"vLLM exited with status {code}; the end of its log:\n{tail(server.log_path)}")
  except KeyboardInterrupt:
    pass
  except (RuntimeError, TimeoutError) as e:
    sys.exit(str(e))


if __name__ == "__main__":
  main()
