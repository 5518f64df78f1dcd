"""A stand-in for `gcloud` in tests/test_launch.py: records every call and plays a TPU slice on this machine.

Each call appends its argv as one JSON line to $FAKE_GCLOUD_DIR/calls.jsonl. `queued-resources describe` answers
from the states listed in $FAKE_GCLOUD_DIR/states.json, one per call (the last repeats; NOT_FOUND fails as gcloud
does). `tpu-vm describe` reports READY and $FAKE_GCLOUD_WORKERS workers (default 2). `tpu-vm scp` and
`tpu-vm ssh --command` act on one home folder per worker, $FAKE_GCLOUD_DIR/workers/N, with
$FAKE_GCLOUD_DIR/worker_bin first on PATH and FAKE_WORKER_ID=N; like gcloud, ssh to several workers exits 0
whatever their commands return.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def _flags(argv: list[str]) -> dict[str, str]:
  return dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def _describe_queued_resource(root: Path, argv: list[str]) -> int:
  states = json.loads((root / "states.json").read_text())
  pos_file = root / "states.pos"
  pos = int(pos_file.read_text()) if pos_file.exists() else 0
  fmt = _flags(argv).get("format", "")
  if fmt == "value(state.state)":
    state = states[min(pos, len(states) - 1)]
    pos_file.write_text(str(pos + 1))
  else:  # a detailed look at the state last served
    state = states[min(max(pos - 1, 0), len(states) - 1)]
  if state == "NOT_FOUND":
    print(f"ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: queuedResources/{argv[4]} was not found",
          file=sys.stderr)
    return 1
  if fmt == "value(state.state)":
    print(state)
  else:
    print(f"state:\n  state: {state}\n  failedData:\n    error:\n      message: fake capacity error in the zone")
  return 0


def _workers(root: Path, flag: str) -> list[tuple[int, Path]]:
  n = int(os.environ.get("FAKE_GCLOUD_WORKERS", "2"))
  ids = range(n) if flag == "all" else [int(flag)]
  out = []
  for i in ids:
    home = root / "workers" / str(i)
    home.mkdir(parents=True, exist_ok=True)
    out.append((i, home))
  return out


def _ssh(root: Path, argv: list[str]) -> int:
  flags = _flags(argv)
  if "command" not in flags:
    print("fake gcloud: interactive ssh is not supported", file=sys.stderr)
    return 2
  workers = _workers(root, flags.get("worker", "0"))
  rcs = []
  for i, home in workers:
    env = dict(os.environ, HOME=str(home), FAKE_WORKER_ID=str(i),
               PATH=f"{root / 'worker_bin'}{os.pathsep}{os.environ['PATH']}")
    rcs.append(subprocess.run(["bash", "-c", flags["command"]], cwd=home, env=env).returncode)
  return 0 if len(workers) > 1 else rcs[0]


def _scp(root: Path, argv: list[str]) -> int:
  positional = [a for a in argv[4:] if not a.startswith("--")]
  src, dest = positional
  _, path = dest.split(":", 1)
  if os.path.isabs(path):
    print(f"fake gcloud: scp to an absolute path {path} is not supported", file=sys.stderr)
    return 2
  for _, home in _workers(root, _flags(argv).get("worker", "0")):
    shutil.copy(src, home / path)
  return 0


def main(argv: list[str]) -> int:
  root = Path(os.environ["FAKE_GCLOUD_DIR"])
  with open(root / "calls.jsonl", "a") as f:
    f.write(json.dumps(argv) + "\n")
  group, verb = argv[2:4] if len(argv) >= 4 else ("", "")
  if argv[:2] == ["compute", "tpus"] and group == "queued-resources":
    if verb == "describe":
      return _describe_queued_resource(root, argv)
    if verb in ("create", "delete", "list"):
      print(f"fake gcloud: queued-resources {verb} done")
      return 0
  if argv[:2] == ["compute", "tpus"] and group == "tpu-vm":
    if verb == "describe":
      print(f"READY\t{os.environ.get('FAKE_GCLOUD_WORKERS', '2')}")
      return 0
    if verb == "ssh":
      return _ssh(root, argv)
    if verb == "scp":
      return _scp(root, argv)
  print(f"fake gcloud: unexpected call {argv}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
