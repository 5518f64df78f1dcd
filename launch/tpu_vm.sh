#!/usr/bin/env bash
# Create a Cloud TPU VM slice, install numina_jax on every worker, and run training or a sweep on all of them.
#
#   launch/tpu_vm.sh create  NAME ZONE ACCELERATOR [--spot]   e.g. create oss120b us-east5-a v5p-128 --spot
#   launch/tpu_vm.sh setup   NAME ZONE                        copy this checkout to every worker, pip install
#   launch/tpu_vm.sh train   NAME ZONE [train flags...]       python -m numina_jax.train on every worker
#   launch/tpu_vm.sh sweep   NAME ZONE [sweep flags...]       python -m numina_jax.sweep on every worker
#   launch/tpu_vm.sh logs    NAME ZONE                        follow worker 0's log
#   launch/tpu_vm.sh delete  NAME ZONE
#
# Environment: PROJECT (gcloud project; default: gcloud's), RUNTIME (TPU software version; default
# v2-alpha-tpuv5), REMOTE_DIR (default ~/numina_jax). Training runs detached (nohup), so a dropped ssh does
# not stop it; on a spot slice, preemption sends SIGTERM and the trainer checkpoints before exiting. Rerun
# `train` with the same flags after recreating the slice and it resumes from the latest checkpoint
# (use a gs:// workdir so checkpoints outlive the VM).
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-2}"; }
[[ $# -ge 1 ]] || usage
cmd=$1; shift
[[ $cmd == -h || $cmd == --help ]] && usage 0
[[ $# -ge 2 ]] || { echo "error: $cmd needs NAME and ZONE" >&2; usage; }
name=$1; zone=$2; shift 2
project_flag=()
[[ -n ${PROJECT:-} ]] && project_flag=(--project "$PROJECT")
remote_dir=${REMOTE_DIR:-numina_jax}
here=$(cd "$(dirname "$0")/.." && pwd)

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${project_flag[@]}" --worker=all --command "$1"
}

quote_args() { local out=""; for a in "$@"; do out+=" $(printf '%q' "$a")"; done; echo "$out"; }

case $cmd in
  create)
    [[ $# -ge 1 ]] || { echo "error: create needs ACCELERATOR (e.g. v5p-128)" >&2; exit 2; }
    accel=$1; shift
    extra=()
    [[ ${1:-} == --spot ]] && extra+=(--spot)
    gcloud compute tpus tpu-vm create "$name" --zone "$zone" "${project_flag[@]}" \
      --accelerator-type "$accel" --version "${RUNTIME:-v2-alpha-tpuv5}" "${extra[@]}"
    ;;
  setup)
    tarball=$(mktemp /tmp/numina_jax.XXXXXX.tar.gz)
    git -C "$here" archive --format=tar.gz -o "$tarball" HEAD
    gcloud compute tpus tpu-vm scp "$tarball" "$name:/tmp/numina_jax.tar.gz" --zone "$zone" \
      "${project_flag[@]}" --worker=all
    rm -f "$tarball"
    ssh_all "mkdir -p $remote_dir && tar -xzf /tmp/numina_jax.tar.gz -C $remote_dir && cd $remote_dir && \
      python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e '.[tpu]'"
    ;;
  train|sweep)
    args=$(quote_args "$@")
    module=numina_jax.$cmd
    ssh_all "cd $remote_dir && nohup .venv/bin/python -m $module$args > $cmd.log 2>&1 &"
    echo "started $module on every worker of $name; follow with: $0 logs $name $zone"
    ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${project_flag[@]}" --worker=0 \
      --command "tail -n 200 -f $remote_dir/train.log $remote_dir/sweep.log 2>/dev/null"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$name" --zone "$zone" "${project_flag[@]}" --quiet
    ;;
  *)
    echo "error: unknown command $cmd" >&2; usage ;;
esac
