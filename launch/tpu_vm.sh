#!/usr/bin/env bash
# numina_jax on a Cloud TPU slice: a queued resource (spot or on-demand) described by one env file, this checkout
# shipped to every worker, jobs run detached on all of them, logs and status gathered from all of them.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
prog=launch/tpu_vm.sh
KNOWN_VARS="PROJECT ZONE BUCKET SLICE ACCELERATOR SPOT RUNTIME REMOTE_DIR PYTHON"
REQUIRED_VARS="PROJECT ZONE BUCKET SLICE ACCELERATOR SPOT"

usage() {
  cat <<EOF
usage: $prog [--env FILE] [--dry-run] COMMAND [options]

Commands (\`$prog COMMAND --help\` for each):
  create      request the slice as a queued resource and wait until it is ACTIVE
  wait        wait until the queued resource is ACTIVE (after --no-wait, a timeout, or Ctrl-C)
  setup       ship the committed code (git archive HEAD) to every worker, make its venv, install .[tpu]
  train       python -m numina_jax.train on every worker, detached; flags pass through
  sweep       python -m numina_jax.sweep likewise
  evaluate    python -m numina_jax.evaluate likewise
  logs        the job's log from every worker, each line prefixed with its worker (-f follows)
  status      queued resource state, workers, and whether a job runs on each
  stop        SIGTERM the job on every worker (the trainer saves a checkpoint) and wait for it to exit
  ssh         a shell on one worker, or a command on all of them
  list        the queued resources in the zone
  delete      delete the queued resource and its TPU VMs

Global options (anywhere before a \`--\`):
  --env FILE  the slice's env file (default: \$NUMINA_SLICE_ENV, else launch/slice.env; see
              launch/slice.env.example): PROJECT ZONE BUCKET SLICE ACCELERATOR SPOT [RUNTIME REMOTE_DIR PYTHON]
  --dry-run   print every gcloud command (quoted, runnable) instead of running it; nothing is created or changed
  -h, --help  this help, or a command's

gcloud's ssh to several workers at once needs your key in ssh-agent: ssh-add ~/.ssh/google_compute_engine

A typical run:
  cp launch/slice.env.example launch/slice.env      # and fill it in
  $prog create && $prog setup
  $prog train --config configs/oss120b_v5.py
  $prog logs -f
  $prog stop && $prog delete
EOF
}

usage_cmd() {
  case $1 in
    create) cat <<EOF
usage: $prog create [--no-wait] [--timeout DURATION] [--poll SECONDS]

Requests SLICE as a queued resource (gcloud compute tpus queued-resources create, --spot when SPOT=true, node id
SLICE) and waits until it is ACTIVE, printing each state it passes through. Fails on FAILED or SUSPENDED. If the
queued resource already exists it only waits for it.
  --no-wait           return once the request is made
  --timeout DURATION  give up waiting after DURATION (e.g. 3600, 90m, 12h; 0: never; default 6h); the request
                      stays queued: \`$prog wait\` goes on waiting, \`$prog delete\` withdraws it
  --poll SECONDS      time between state checks (default 30)
EOF
      ;;
    wait) cat <<EOF
usage: $prog wait [--timeout DURATION] [--poll SECONDS]

Waits until the queued resource SLICE is ACTIVE; fails on FAILED or SUSPENDED. Options as for create.
EOF
      ;;
    setup) cat <<EOF
usage: $prog setup [--allow-dirty]

Ships this checkout to every worker and installs it: \`git archive HEAD\` is copied with gcloud scp to all workers
and unpacked into REMOTE_DIR/src (replacing the previous code); REMOTE_DIR/venv is made with uv (Python PYTHON,
default 3.12) and gets \`pip install -e src[tpu]\`. Refuses while a job runs on a worker. Refuses when the work tree
has uncommitted changes or untracked files, since they would not be shipped; commit them, or:
  --allow-dirty   ship the work tree as it is (tracked and untracked files, less what .gitignore excludes)
EOF
      ;;
    train | sweep | evaluate) cat <<EOF
usage: $prog $1 [FLAGS...]   (or: $prog $1 -- FLAGS...)

Runs \`python -m numina_jax.$1 FLAGS\` on every worker of SLICE at once, from REMOTE_DIR/src, detached (it
survives the ssh session), appending to REMOTE_DIR/logs/$1.log, with NUMINA_BUCKET=BUCKET in its environment.
The configs set multihost=True, so the workers join one jax.distributed job. Refuses if a job already runs.
Flags after \`--\` pass through untouched (e.g. \`$prog $1 -- --help\` for the module's own help).
Rerunning the same command after a preemption resumes from the latest checkpoint in the (gs://) workdir.
EOF
      ;;
    logs) cat <<EOF
usage: $prog logs [-f] [-n LINES] [--job train|sweep|evaluate] [--worker N|all]

The job's log from every worker, each line prefixed with "[worker N]".
  -f, --follow     keep following (Ctrl-C to stop; the job goes on)
  -n, --lines N    lines from the end of each log (default 50)
  --job JOB        which log (default: the job started last)
  --worker N|all   one worker or all of them (default all)
EOF
      ;;
    status) cat <<EOF
usage: $prog status

The queued resource's state; when ACTIVE, the TPU VM's state and worker count, and for every worker whether its
job runs, since when, its last log line, and the revision installed.
EOF
      ;;
    stop) cat <<EOF
usage: $prog stop [--no-wait] [--timeout SECONDS]

Sends SIGTERM to the job on every worker (to its process group, so a sweep's running trial gets it too). The
trainer saves a checkpoint at an agreed step and exits; rerun the same train command to resume.
  --no-wait          only send the signal
  --timeout SECONDS  how long to wait for the job to exit on each worker (default 900)
EOF
      ;;
    ssh) cat <<EOF
usage: $prog ssh [--worker N|all] [COMMAND...]

Without COMMAND, an interactive shell on one worker (default 0). With COMMAND (its words joined with spaces, as
ssh does), runs it on the workers (default all).
EOF
      ;;
    list) cat <<EOF
usage: $prog list

The queued resources in ZONE of PROJECT (gcloud compute tpus queued-resources list).
EOF
      ;;
    delete) cat <<EOF
usage: $prog delete [--yes]

Deletes the queued resource SLICE and its TPU VMs (queued-resources delete --force). gcloud asks to confirm.
Stop the job first (\`$prog stop\`) so that it saves a checkpoint.
  --yes   do not ask (gcloud --quiet)
EOF
      ;;
    *) usage ;;
  esac
}

info() { printf '%s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
usage_error() { printf 'error: %s\n' "$*" >&2; printf "see: %s --help\n" "$prog${cmd:+ $cmd}" >&2; exit 2; }
indent() { local s="  ${1//$'\n'/$'\n'  }"; printf '%s\n' "$s"; }
# Quotes one word for a shell, readably: bare when it is safe, else in single quotes (after a leading --flag=).
shq() {
  local w=$1
  if [[ $w =~ ^[-A-Za-z0-9_@%+=:,./]+$ ]]; then
    printf '%s' "$w"
  elif [[ $w =~ ^(--[-A-Za-z0-9_.]+=)(.+)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    shq "${BASH_REMATCH[2]}"
  else
    w=${w//\'/\'\\\'\'}
    printf "'%s'" "$w"
  fi
}
quoted() {  # a command line, runnable as printed
  local sep="" w
  for w in "$@"; do printf '%s' "$sep"; shq "$w"; sep=" "; done
  printf '\n'
}

# Every gcloud call goes through here, so --dry-run prints them all and runs none.
gc() {
  if ((dry_run)); then quoted gcloud "$@"; else gcloud "$@"; fi
}

# The env file ------------------------------------------------------------------------------------------------------
var_help() {
  case $1 in
    PROJECT) echo "the gcloud project that owns the TPU quota" ;;
    ZONE) echo "a zone with the accelerator, e.g. us-east5-a" ;;
    BUCKET) echo "the GCS bucket for checkpoints, e.g. my-bucket" ;;
    SLICE) echo "the name of the queued resource and its TPU VM, e.g. oss120b" ;;
    ACCELERATOR) echo "the TPU type, e.g. v5p-128 or v6e-64" ;;
    SPOT) echo "true for spot capacity, false for on-demand" ;;
  esac
}

load_env() {
  local file=$1 n=0 line name value re_sq re_dq re_plain
  [[ -f $file ]] || die "no slice env file at $file: copy launch/slice.env.example to launch/slice.env and fill it \
in, or pass --env FILE (or set NUMINA_SLICE_ENV)"
  # Only the file counts, not the caller's environment.
  PROJECT="" ZONE="" BUCKET="" SLICE="" ACCELERATOR="" SPOT="" RUNTIME="" REMOTE_DIR="" PYTHON=""
  re_sq="^[[:space:]]*([A-Za-z_][A-Za-z0-9_]*)='([^']*)'[[:space:]]*(#.*)?$"
  re_dq="^[[:space:]]*([A-Za-z_][A-Za-z0-9_]*)=\"([^\"]*)\"[[:space:]]*(#.*)?$"
  re_plain="^[[:space:]]*([A-Za-z_][A-Za-z0-9_]*)=([^[:space:]\"'#]*)[[:space:]]*(#.*)?$"
  while IFS= read -r line || [[ -n $line ]]; do
    n=$((n + 1))
    line=${line%$'\r'}
    [[ $line =~ ^[[:space:]]*(#.*)?$ ]] && continue
    if [[ $line =~ $re_sq || $line =~ $re_dq || $line =~ $re_plain ]]; then
      name=${BASH_REMATCH[1]}
      value=${BASH_REMATCH[2]}
    else
      die "$file:$n: expected NAME=VALUE (quote a value that has spaces), got: $line"
    fi
    case " $KNOWN_VARS " in
      *" $name "*) printf -v "$name" '%s' "$value" ;;
      *) die "$file:$n: unknown variable $name (known: $KNOWN_VARS)" ;;
    esac
  done <"$file"

  for name in $REQUIRED_VARS; do
    [[ -n ${!name} ]] || die "$file: $name is not set ($(var_help "$name"))"
  done
  [[ $SPOT == true || $SPOT == false ]] || die "$file: SPOT must be true or false, not '$SPOT'"
  [[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "$file: ZONE '$ZONE' does not look like a zone (e.g. us-east5-a)"
  [[ $ACCELERATOR =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] \
    || die "$file: ACCELERATOR '$ACCELERATOR' does not look like a TPU type (e.g. v5p-128, v6e-64)"
  [[ $SLICE =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
    || die "$file: SLICE '$SLICE' must be lowercase letters, digits and dashes, starting with a letter"
  BUCKET=${BUCKET#gs://}
  BUCKET=${BUCKET%/}
  [[ $BUCKET =~ ^[a-z0-9][-a-z0-9._]{1,220}[a-z0-9]$ ]] \
    || die "$file: BUCKET '$BUCKET' is not a bucket name (give the name, e.g. my-bucket)"
  if [[ -z $RUNTIME ]]; then
    case $ACCELERATOR in
      v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
      v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
      v5litepod-* | v5e-*) RUNTIME=v2-alpha-tpuv5-lite ;;
      v2-* | v3-* | v4-*) RUNTIME=tpu-ubuntu2204-base ;;
      *) die "$file: no default RUNTIME for $ACCELERATOR; set RUNTIME (see cloud.google.com/tpu/docs/runtimes)" ;;
    esac
  fi
  REMOTE_DIR=${REMOTE_DIR:-numina_jax}
  [[ $REMOTE_DIR != \~* ]] || die "$file: REMOTE_DIR '$REMOTE_DIR': give it relative to the home directory \
(e.g. numina_jax) or absolute, without ~"
  PYTHON=${PYTHON:-3.12}
  [[ $PYTHON =~ ^3\.[0-9]+$ ]] || die "$file: PYTHON must be a version like 3.12, not '$PYTHON'"
  loc=(--project="$PROJECT" --zone="$ZONE")
}

# Options of the commands -------------------------------------------------------------------------------------------
parse_duration() {  # 90, 90s, 30m, 6h -> seconds
  [[ $2 =~ ^([0-9]+)([smh]?)$ ]] || usage_error "$1 '$2': expected seconds or a duration like 90m or 6h"
  case ${BASH_REMATCH[2]} in
    m) echo $((BASH_REMATCH[1] * 60)) ;;
    h) echo $((BASH_REMATCH[1] * 3600)) ;;
    *) echo "${BASH_REMATCH[1]}" ;;
  esac
}

need_value() { [[ $# -ge 2 && -n $2 ]] || usage_error "$1 needs a value"; }

# Queued resource ---------------------------------------------------------------------------------------------------
hms() { printf '%02d:%02d:%02d' $(($1 / 3600)) $(($1 % 3600 / 60)) $(($1 % 60)); }

qr_state() {  # prints the queued resource's state; fails if gcloud cannot describe it
  gcloud compute tpus queued-resources describe "$SLICE" "${loc[@]}" --format='value(state.state)'
}

wait_active() {
  local timeout=$1 poll=$2 start=$SECONDS state last="" fails=0 elapsed tty=0
  [[ -t 2 ]] && tty=1
  trap 'echo >&2; info "stopped waiting; the request stays queued: $prog wait waits again, $prog delete withdraws it"
    exit 130' INT
  while :; do
    if state=$(qr_state 2>"$tmp/err"); then
      fails=0
    else
      fails=$((fails + 1))
      ((fails < 3)) || die "cannot read the state of queued resource $SLICE: $(tail -n 3 "$tmp/err")"
      state=$last
    fi
    elapsed=$((SECONDS - start))
    if ((tty)); then
      [[ -z $last || $state == "$last" ]] || echo >&2
      printf '\r[%s] queued resource %s: %-24s' "$(hms "$elapsed")" "$SLICE" "$state" >&2
    elif [[ $state != "$last" ]]; then
      info "[$(hms "$elapsed")] queued resource $SLICE: $state"
    fi
    last=$state
    case $state in
      ACTIVE)
        ((tty)) && echo >&2
        break
        ;;
      FAILED | SUSPENDED | SUSPENDING | DELETING)
        ((tty)) && echo >&2
        gcloud compute tpus queued-resources describe "$SLICE" "${loc[@]}" --format='yaml(state)' >&2 || true
        die "queued resource $SLICE is $state (a spot slice is SUSPENDED when preempted). Delete it ($prog delete) \
and create it again, or try another zone"
        ;;
    esac
    if ((timeout > 0 && elapsed >= timeout)); then
      ((tty)) && echo >&2
      die "queued resource $SLICE is still $state after $(hms "$elapsed"); the request stays queued: $prog wait goes \
on waiting, $prog delete withdraws it"
    fi
    sleep "$poll"
  done
  trap - INT
  node_workers
  info "slice $SLICE is ACTIVE: $nworkers workers ($ACCELERATOR). Next: $prog setup"
}

# Workers -----------------------------------------------------------------------------------------------------------
# Sets nworkers from the TPU VM node, which must be READY (0 in a dry run: nothing to check against).
node_workers() {
  local out state
  nworkers=0
  if ((dry_run)); then
    gc compute tpus tpu-vm describe "$SLICE" "${loc[@]}" --format='value(state,networkEndpoints.len())'
    return
  fi
  out=$(gcloud compute tpus tpu-vm describe "$SLICE" "${loc[@]}" \
    --format='value(state,networkEndpoints.len())' 2>"$tmp/err") \
    || die "no TPU VM $SLICE in $ZONE ($(tail -n 1 "$tmp/err")); is the slice created and ACTIVE? ($prog status)"
  read -r state nworkers <<<"$out"
  [[ $state == READY ]] || die "TPU VM $SLICE is ${state:-in no state}, not READY; see $prog status"
  [[ $nworkers =~ ^[1-9][0-9]*$ ]] || die "TPU VM $SLICE reports no workers ('$out')"
}

# A command line for the workers' login shell that runs launch/worker.sh ACTION REMOTE_DIR ARGS from the installed code.
# shellcheck disable=SC2016  # $f and $(hostname) expand on the worker
worker_cmd() {
  local action=$1 args fmt
  shift
  args=$(quoted "$action" "$REMOTE_DIR" "$@")
  fmt='f=%s/src/launch/worker.sh; if [ -f "$f" ]; then NUMINA_BUCKET=%s bash "$f" %s; '
  fmt+='else echo "[worker $(hostname)] FAILED: $f is missing: run %s setup"; fi'
  # shellcheck disable=SC2059  # the format is built above
  printf "$fmt" "$(shq "$REMOTE_DIR")" "$(shq "$BUCKET")" "$args" "$prog"
}

# Runs a remote command on every worker and checks that each one reported "done:" (gcloud's ssh to several workers
# does not pass their exit codes on). mode: "stream" shows output as it comes, "sorted" groups it by worker once all
# are done, "quiet" shows only what went wrong.
ssh_all() {
  local what=$1 mode=$2 remote=$3 out=$tmp/ssh.out ndone bad
  if ((dry_run)); then
    gc compute tpus tpu-vm ssh "$SLICE" "${loc[@]}" --worker=all --command="$remote"
    return
  fi
  if [[ $mode == stream ]]; then
    gcloud compute tpus tpu-vm ssh "$SLICE" "${loc[@]}" --worker=all --command="$remote" | tee "$out" || true
  else
    gcloud compute tpus tpu-vm ssh "$SLICE" "${loc[@]}" --worker=all --command="$remote" >"$out" || true
    [[ $mode == quiet ]] || sort -s -t ' ' -k 2,2n "$out"
  fi
  ndone=$(grep -c '^\[worker [^]]*\] done:' "$out" || true)
  bad=$(grep '^\[worker [^]]*\] \(FAILED\|busy\):' "$out" || true)
  [[ -z $bad ]] || die "$what failed on $(grep -c . <<<"$bad") of $nworkers workers:"$'\n'"$bad"
  ((ndone >= nworkers)) || die "$what: only $ndone of $nworkers workers reported back (see above)"
}

# Commands ----------------------------------------------------------------------------------------------------------
cmd_create() {
  local timeout=21600 poll=30 wait=1 state spot=()
  while (($#)); do
    case $1 in
      --no-wait) wait=0 ;;
      --timeout) need_value "$@"; timeout=$(parse_duration "$1" "$2"); shift ;;
      --timeout=*) timeout=$(parse_duration --timeout "${1#*=}") ;;
      --poll) need_value "$@"; poll=$2; shift ;;
      --poll=*) poll=${1#*=} ;;
      *) usage_error "create: unknown argument '$1'" ;;
    esac
    shift
  done
  [[ $poll =~ ^[0-9]*\.?[0-9]+$ ]] || usage_error "--poll '$poll': expected seconds"
  [[ $SPOT == true ]] && spot=(--spot)
  local create=(compute tpus queued-resources create "$SLICE" --node-id="$SLICE" "${loc[@]}"
    --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" ${spot[@]+"${spot[@]}"})
  if ((dry_run)); then
    gc "${create[@]}"
    if ((wait)); then
      echo "# then, every ${poll}s until ACTIVE (giving up after ${timeout}s):"
      gc compute tpus queued-resources describe "$SLICE" "${loc[@]}" --format='value(state.state)'
    fi
    return
  fi
  if state=$(qr_state 2>/dev/null); then
    case $state in
      FAILED | SUSPENDED | SUSPENDING | DELETING)
        die "queued resource $SLICE already exists and is $state (a spot slice is SUSPENDED when preempted): delete \
it ($prog delete), then create it again" ;;
      *) info "queued resource $SLICE already exists ($state)" ;;
    esac
  else
    info "requesting $ACCELERATOR$([[ $SPOT == true ]] && echo ' (spot)') as queued resource $SLICE in $ZONE"
    gcloud "${create[@]}"
  fi
  if ((wait)); then wait_active "$timeout" "$poll"; else info "requested; $prog wait waits until it is ACTIVE"; fi
}

cmd_wait() {
  local timeout=21600 poll=30
  while (($#)); do
    case $1 in
      --timeout) need_value "$@"; timeout=$(parse_duration "$1" "$2"); shift ;;
      --timeout=*) timeout=$(parse_duration --timeout "${1#*=}") ;;
      --poll) need_value "$@"; poll=$2; shift ;;
      --poll=*) poll=${1#*=} ;;
      *) usage_error "wait: unknown argument '$1'" ;;
    esac
    shift
  done
  [[ $poll =~ ^[0-9]*\.?[0-9]+$ ]] || usage_error "--poll '$poll': expected seconds"
  if ((dry_run)); then
    echo "# every ${poll}s until ACTIVE (giving up after ${timeout}s):"
    gc compute tpus queued-resources describe "$SLICE" "${loc[@]}" --format='value(state.state)'
    return
  fi
  wait_active "$timeout" "$poll"
}

# shellcheck disable=SC2016  # $d, $t and $(hostname) in the remote command expand on the worker
cmd_setup() {
  local allow_dirty=0 dirty rev treeish index tarball name remote fmt
  while (($#)); do
    case $1 in
      --allow-dirty) allow_dirty=1 ;;
      *) usage_error "setup: unknown argument '$1'" ;;
    esac
    shift
  done
  git -C "$here" rev-parse --is-inside-work-tree >/dev/null 2>&1 \
    || die "setup ships a git checkout, and $here is not one"
  rev=$(git -C "$here" rev-parse --short=12 HEAD)
  treeish=HEAD
  dirty=$(git -C "$here" status --porcelain --untracked-files=all)
  if [[ -n $dirty ]]; then
    if ((!allow_dirty)); then
      die "the work tree has uncommitted changes, which setup would not ship (it ships git archive HEAD):
$(indent "$dirty")
Commit them (or stash them) and run setup again, or pass --allow-dirty to ship the work tree as it is."
    fi
    # A throwaway index holding the whole work tree (less .gitignore'd files) gives a tree to archive, without
    # touching the real index or HEAD.
    index=$tmp/index
    cp "$(git -C "$here" rev-parse --path-format=absolute --git-path index)" "$index" 2>/dev/null || true
    GIT_INDEX_FILE=$index git -C "$here" add -A
    treeish=$(GIT_INDEX_FILE=$index git -C "$here" write-tree)
    rev=$rev-dirty
    info "shipping the work tree as it is (--allow-dirty):"$'\n'"$(indent "$dirty")"
  fi
  name=numina_jax-$rev.tar.gz
  if ((dry_run)); then tarball=${TMPDIR:-/tmp}/$name; else tarball=$tmp/$name; fi

  node_workers
  if ((dry_run)); then
    quoted git -C "$here" archive --format=tar.gz -o "$tarball" "$treeish"
  else
    git -C "$here" archive --format=tar.gz -o "$tarball" "$treeish"
    info "shipping revision $rev ($(du -h "$tarball" | cut -f1)) to $nworkers workers of $SLICE"
  fi
  gc compute tpus tpu-vm scp "$tarball" "$SLICE:$name" "${loc[@]}" --worker=all
  fmt='d=%s; t=%s; if rm -rf "$d/incoming" && mkdir -p "$d/incoming/src" && tar -xzf "$t" -C "$d/incoming/src" '
  fmt+='&& rm -f "$t"; then bash "$d/incoming/src/launch/worker.sh" install "$d" %s %s; '
  fmt+='else echo "[worker $(hostname)] FAILED: could not unpack $t into $d/incoming/src"; fi'
  # shellcheck disable=SC2059  # the format is built above
  printf -v remote "$fmt" "$(shq "$REMOTE_DIR")" "$(shq "$name")" "$(shq "$rev")" "$(shq "$PYTHON")"
  ssh_all setup stream "$remote"
  ((dry_run)) || info "revision $rev is installed on all $nworkers workers. Next: $prog train --config ..."
}

cmd_job() {
  local job=$1
  shift
  node_workers
  ssh_all "the check that no job runs" quiet "$(worker_cmd busy)"
  ssh_all "starting numina_jax.$job" stream "$(worker_cmd start "$job" "$@")"
  ((dry_run)) || info "numina_jax.$job runs on all $nworkers workers. Follow it: $prog logs -f; stop it: $prog stop"
}

cmd_logs() {
  local follow=0 lines=50 job=- worker=all remote
  while (($#)); do
    case $1 in
      -f | --follow) follow=1 ;;
      -n | --lines) need_value "$@"; lines=$2; shift ;;
      --lines=*) lines=${1#*=} ;;
      --job) need_value "$@"; job=$2; shift ;;
      --job=*) job=${1#*=} ;;
      --worker) need_value "$@"; worker=$2; shift ;;
      --worker=*) worker=${1#*=} ;;
      *) usage_error "logs: unknown argument '$1'" ;;
    esac
    shift
  done
  [[ $lines =~ ^[0-9]+$ ]] || usage_error "--lines '$lines': expected a number"
  [[ $job == - || $job == train || $job == sweep || $job == evaluate ]] \
    || usage_error "--job '$job': expected train, sweep or evaluate"
  [[ $worker == all || $worker =~ ^[0-9]+$ ]] || usage_error "--worker '$worker': expected a number or all"
  if ((follow)); then
    gc compute tpus tpu-vm ssh "$SLICE" "${loc[@]}" --worker="$worker" --command="$(worker_cmd logs "$job" "$lines" \
      follow)"
  elif [[ $worker != all ]]; then
    gc compute tpus tpu-vm ssh "$SLICE" "${loc[@]}" --worker="$worker" --command="$(worker_cmd logs "$job" "$lines")"
  else
    node_workers
    ssh_all logs sorted "$(worker_cmd logs "$job" "$lines")"
  fi
}

cmd_status() {
  [[ $# -eq 0 ]] || usage_error "status takes no arguments"
  local state what
  what="$ACCELERATOR, $([[ $SPOT == true ]] && echo spot || echo on-demand), $ZONE, project $PROJECT"
  if ((dry_run)); then
    gc compute tpus queued-resources describe "$SLICE" "${loc[@]}" --format='value(state.state)'
    echo "# when ACTIVE:"
    node_workers
    ssh_all status sorted "$(worker_cmd status)"
    return
  fi
  if ! state=$(qr_state 2>"$tmp/err"); then
    echo "queued resource $SLICE ($what): not found ($(tail -n 1 "$tmp/err")). Create it: $prog create"
    return
  fi
  echo "queued resource $SLICE ($what): $state"
  [[ $state == ACTIVE ]] || return 0
  node_workers
  echo "TPU VM $SLICE: READY, $nworkers workers"
  ssh_all status sorted "$(worker_cmd status)"
}

cmd_stop() {
  local timeout=900
  while (($#)); do
    case $1 in
      --no-wait) timeout=0 ;;
      --timeout) need_value "$@"; timeout=$(parse_duration "$1" "$2"); shift ;;
      --timeout=*) timeout=$(parse_duration --timeout "${1#*=}") ;;
      *) usage_error "stop: unknown argument '$1'" ;;
    esac
    shift
  done
  node_workers
  ssh_all stop stream "$(worker_cmd stop "$timeout")"
}

cmd_ssh() {
  local worker=""
  while (($#)); do
    case $1 in
      --worker) need_value "$@"; worker=$2; shift ;;
      --worker=*) worker=${1#*=} ;;
      --) shift; break ;;
      *) break ;;
    esac
    shift
  done
  [[ -z $worker || $worker == all || $worker =~ ^[0-9]+$ ]] \
    || usage_error "--worker '$worker': expected a number or all"
  if (($# == 0)); then
    [[ $worker != all ]] || usage_error "an interactive shell needs one worker (--worker N)"
    gc compute tpus tpu-vm ssh "$SLICE" "${loc[@]}" --worker="${worker:-0}"
  else
    gc compute tpus tpu-vm ssh "$SLICE" "${loc[@]}" --worker="${worker:-all}" --command="$*"
  fi
}

cmd_list() {
  [[ $# -eq 0 ]] || usage_error "list takes no arguments"
  gc compute tpus queued-resources list "${loc[@]}"
}

cmd_delete() {
  local quiet=()
  while (($#)); do
    case $1 in
      --yes | -y) quiet=(--quiet) ;;
      *) usage_error "delete: unknown argument '$1'" ;;
    esac
    shift
  done
  gc compute tpus queued-resources delete "$SLICE" "${loc[@]}" --force ${quiet[@]+"${quiet[@]}"}
}

# Main --------------------------------------------------------------------------------------------------------------
dry_run=0
help=0
cmd=""
env_file=${NUMINA_SLICE_ENV:-$here/launch/slice.env}
args=()
while (($#)); do
  case $1 in
    --)
      shift
      args+=("$@")
      break
      ;;
    --dry-run) dry_run=1 ;;
    --env)
      [[ $# -ge 2 ]] || usage_error "--env needs a file"
      env_file=$2
      shift
      ;;
    --env=*) env_file=${1#--env=} ;;
    -h | --help) help=1 ;;
    *)
      if [[ -z $cmd ]]; then
        [[ $1 != -* ]] || usage_error "unknown option '$1' before the command"
        cmd=$1
      else
        args+=("$1")
      fi
      ;;
  esac
  shift
done

if [[ -z $cmd ]]; then
  usage
  ((help)) && exit 0
  exit 2
fi
case $cmd in
  create | wait | setup | train | sweep | evaluate | logs | status | stop | ssh | list | delete) ;;
  *) usage_error "unknown command '$cmd'" ;;
esac
if ((help)); then
  usage_cmd "$cmd"
  exit 0
fi

load_env "$env_file"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/numina_jax_launch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
((dry_run)) && echo "# dry run: $prog $cmd for slice $SLICE from $env_file; no gcloud command is run"
nworkers=0

case $cmd in
  create) cmd_create ${args[@]+"${args[@]}"} ;;
  wait) cmd_wait ${args[@]+"${args[@]}"} ;;
  setup) cmd_setup ${args[@]+"${args[@]}"} ;;
  train | sweep | evaluate) cmd_job "$cmd" ${args[@]+"${args[@]}"} ;;
  logs) cmd_logs ${args[@]+"${args[@]}"} ;;
  status) cmd_status ${args[@]+"${args[@]}"} ;;
  stop) cmd_stop ${args[@]+"${args[@]}"} ;;
  ssh) cmd_ssh ${args[@]+"${args[@]}"} ;;
  list) cmd_list ${args[@]+"${args[@]}"} ;;
  delete) cmd_delete ${args[@]+"${args[@]}"} ;;
esac
