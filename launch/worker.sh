#!/usr/bin/env bash
# Runs on each TPU VM worker; launch/tpu_vm.sh calls it over `gcloud ... ssh --worker=all`.
#
#   worker.sh install DIR REVISION PYTHON  DIR/incoming/src becomes DIR/src; DIR/venv (made with uv) gets
#                                          `pip install -e src[tpu]`
#   worker.sh start   DIR JOB [ARGS...]    `python -m numina_jax.JOB ARGS` in DIR/src, detached, appending to
#                                          DIR/logs/JOB.log; $NUMINA_BUCKET passes through to it
#   worker.sh busy    DIR                  whether a job runs here
#   worker.sh status  DIR                  the job, whether it runs, and its last log line
#   worker.sh stop    DIR TIMEOUT          SIGTERM the job's process group (the trainer checkpoints) and wait up to
#                                          TIMEOUT seconds for it to exit (0: do not wait)
#   worker.sh logs    DIR JOB LINES [follow]   the job's log (JOB "-": the last job started here)
#
# Every output line starts with "[worker N]" (N from the TPU metadata server). A successful action ends with
# "[worker N] done: ..."; a failed one prints "[worker N] FAILED: ..." and exits 1. The launcher counts these lines,
# because gcloud's ssh to several workers does not report their exit codes.
set -euo pipefail

METADATA=http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number
worker_id=$(curl -sf -m 5 -H 'Metadata-Flavor: Google' "$METADATA" 2>/dev/null || hostname)
# Seconds a freshly started job must stay alive before `start` reports it started (it catches bad flags early).
START_CHECK_SECS=${NUMINA_START_CHECK_SECS:-5}

say() { printf '[worker %s] %s\n' "$worker_id" "$*"; }
prefix() { sed -u "s/^/[worker $worker_id] /"; }
fail() { say "FAILED: $*"; exit 1; }

# The pid of the job started here if it still runs (checked against its command line, since pids get reused).
running_pid() {
  local pid
  [[ -f $dir/job.pid ]] || return 1
  pid=$(<"$dir/job.pid")
  [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/cmdline ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q 'numina_jax\.' || return 1
  echo "$pid"
}

last_job() { if [[ -f $dir/job.name ]]; then cat "$dir/job.name"; else echo none; fi; }

do_install() {
  local rev=$1 python=$2 pid version entry name
  [[ -d $dir/incoming/src ]] || fail "nothing shipped to $dir/incoming/src (run tpu_vm.sh setup)"
  if pid=$(running_pid); then fail "numina_jax.$(last_job) is running (pid $pid); stop it first (tpu_vm.sh stop)"; fi
  if [[ -d $dir/src ]]; then
    # Jobs run in src: what they wrote there (a local workdir such as runs/) moves over to the new code.
    for entry in "$dir/src"/* "$dir/src"/.[!.]*; do
      [[ -e $entry ]] || continue
      name=${entry##*/}
      [[ $name == REVISION || $name == *.egg-info || -e $dir/incoming/src/$name ]] && continue
      mv "$entry" "$dir/incoming/src/"
      say "kept $name from the previous code (it is not part of the shipped tree)"
    done
    rm -rf "$dir/src"
  fi
  mv "$dir/incoming/src" "$dir/src"
  echo "$rev" >"$dir/src/REVISION"
  mkdir -p "$dir/logs"
  export PATH=$HOME/.local/bin:$PATH
  if ! command -v uv >/dev/null; then
    say "installing uv (https://astral.sh/uv)"
    curl -LsSf https://astral.sh/uv/install.sh | sh 2>&1 | prefix || fail "could not install uv"
  fi
  uv venv --allow-existing --python "$python" "$dir/venv" 2>&1 | prefix || fail "uv venv --python $python failed"
  uv pip install --python "$dir/venv/bin/python" -e "$dir/src[tpu]" 2>&1 | prefix \
    || fail "pip install -e $dir/src[tpu] failed (see above)"
  version=$("$dir/venv/bin/python" -c \
    'import sys, jax, numina_jax; print(f"python {sys.version.split()[0]}, jax {jax.__version__}")') \
    || fail "numina_jax does not import in $dir/venv"
  say "done: revision $rev installed in $dir ($version)"
}

do_start() {
  local job=$1 pid log quoted rc=0
  shift
  case $job in train | sweep | evaluate) ;; *) fail "unknown job '$job' (train, sweep or evaluate)" ;; esac
  [[ -x $dir/venv/bin/python && -d $dir/src ]] || fail "$dir is not set up (run tpu_vm.sh setup)"
  if pid=$(running_pid); then fail "numina_jax.$(last_job) is already running (pid $pid); stop it first"; fi
  mkdir -p "$dir/logs"
  log=$dir/logs/$job.log
  printf -v quoted ' %q' "$@"
  # Appended, never truncated: a resumed run keeps the log of the runs before it.
  printf '==== %s start: python -m numina_jax.%s%s (revision %s)\n' "$(date -u +%FT%TZ)" "$job" "$quoted" \
    "$(cat "$dir/src/REVISION" 2>/dev/null || echo unknown)" >>"$log"
  cd "$dir/src"
  # setsid: its own session, so the ssh hang-up does not reach it and `stop` can signal the whole group (a sweep's
  # trials included); stdin/stdout/stderr leave the ssh channel, so ssh returns at once.
  setsid nohup "$dir/venv/bin/python" -m "numina_jax.$job" "$@" >>"$log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$dir/job.pid"
  echo "$job" >"$dir/job.name"
  sleep "$START_CHECK_SECS"
  if ! running_pid >/dev/null; then
    wait "$pid" || rc=$?
    tail -n 20 "$log" | prefix
    [[ $rc -eq 0 ]] || fail "numina_jax.$job exited with status $rc within ${START_CHECK_SECS}s (log above, in $log)"
    say "done: numina_jax.$job finished within ${START_CHECK_SECS}s (exit status 0), log $log"
    return
  fi
  say "done: started numina_jax.$job (pid $pid), log $log"
}

do_busy() {
  local pid
  if pid=$(running_pid); then say "busy: numina_jax.$(last_job) is running (pid $pid)"; else say "done: idle"; fi
}

do_status() {
  local pid job log
  job=$(last_job)
  log=$dir/logs/$job.log
  if pid=$(running_pid); then
    say "running numina_jax.$job (pid $pid, since $(ps -o lstart= -p "$pid" | sed 's/^ *//'))"
  elif [[ $job == none ]]; then
    say "idle: no job started yet"
  else
    say "idle: numina_jax.$job is not running"
  fi
  if [[ -s $log ]]; then tail -n 1 "$log" | sed "s/^/[worker $worker_id]   last log line: /"; fi
  say "done: installed revision $(cat "$dir/src/REVISION" 2>/dev/null || echo 'none (not set up)')"
}

do_stop() {
  local timeout=$1 pid job start=$SECONDS
  job=$(last_job)
  if ! pid=$(running_pid); then say "done: nothing running"; return; fi
  # The job leads its own process group (setsid), so this reaches a sweep and the trial it is running.
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
  say "sent SIGTERM to numina_jax.$job (pid $pid): it saves a checkpoint, then exits"
  [[ $timeout -gt 0 ]] || { say "done: signalled"; return; }
  while running_pid >/dev/null; do
    ((SECONDS - start < timeout)) || fail "numina_jax.$job (pid $pid) still runs ${timeout}s after SIGTERM"
    sleep 0.2
  done
  say "done: numina_jax.$job exited after $((SECONDS - start))s"
}

do_logs() {
  local job=$1 lines=$2 follow=${3:-}
  [[ $job != - ]] || job=$(last_job)
  local log=$dir/logs/$job.log
  [[ -f $log ]] || { say "done: no log yet ($log)"; return; }
  if [[ $follow == follow ]]; then
    tail -n "$lines" -F "$log" | prefix
  else
    tail -n "$lines" "$log" | prefix
    say "done: $log"
  fi
}

[[ $# -ge 2 ]] || fail "usage: worker.sh ACTION DIR [ARGS...]"
action=$1
mkdir -p "$2"
dir=$(cd "$2" && pwd)
shift 2
case $action in
  install) [[ $# -eq 2 ]] || fail "install needs REVISION PYTHON"; do_install "$@" ;;
  start) [[ $# -ge 1 ]] || fail "start needs JOB"; do_start "$@" ;;
  busy) do_busy ;;
  status) do_status ;;
  stop) [[ $# -eq 1 ]] || fail "stop needs TIMEOUT"; do_stop "$1" ;;
  logs) [[ $# -ge 2 ]] || fail "logs needs JOB LINES"; do_logs "$@" ;;
  *) fail "unknown action '$action'" ;;
esac
