#!/usr/bin/env bash
# Starts training on GPUs: one node with all its GPUs (one process, JAX sees
# every local GPU), or several nodes through SLURM `srun` (one process per
# node; jax.distributed.initialize finds its peers from SLURM's environment).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/gpu.sh [OPTIONS] -- MAIN_ARGS...

One node (default): runs `python main.py MAIN_ARGS` here; JAX uses every GPU
it sees (--gpus-per-node G restricts it to GPUs 0..G-1).

Several nodes (--nodes N with N > 1, or --slurm): runs through SLURM
  srun --nodes=N --ntasks-per-node=1 --gpus-per-node=G ... \
    env JAX_LOCAL_DEVICE_IDS=0,..,G-1 python main.py --distributed MAIN_ARGS
from a login node (srun allocates) or inside an sbatch/salloc allocation.
One process per node drives all G GPUs of its node. The workdir must be on a
filesystem every node sees (checkpoints are written by all processes).

MAIN_ARGS must include --config and --workdir.

Options:
  --nodes N             number of nodes (default 1)
  --gpus-per-node G     GPUs per node (required with SLURM)
  --partition NAME      SLURM partition (default: the cluster's)
  --time HH:MM:SS       SLURM time limit (default: the partition's)
  --account NAME        SLURM account
  --cpus-per-task C     CPUs per process, for grain workers (SLURM)
  --job-name NAME       SLURM job name (default dssn_jax)
  --srun-arg ARG        extra srun argument (repeatable), e.g. --srun-arg=--exclusive
  --slurm               use srun also for one node
  --python PATH         Python interpreter on the nodes (default: $PYTHON, else python3)
  --dry-run             print the command, one per line; run nothing
  -h, --help            this help

Examples:
  launch/gpu.sh -- --config configs/pascal.py:split=92 --workdir runs/voc92 \
      --config.data.root=/data/VOC2012 --config.data.splits_dir=/data/splits/pascal
  launch/gpu.sh --nodes 2 --gpus-per-node 4 --partition gpu --time 48:00:00 -- \
      --config configs/pascal.py:split=92 --workdir /shared/runs/voc92 \
      --config.data.root=/shared/VOC2012 --config.data.splits_dir=/shared/splits/pascal
USAGE
}

die() { echo "gpu.sh: error: $*" >&2; exit 2; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
# shellcheck source=launch/common.sh
. "$here/common.sh"

dry_run=0
python="${PYTHON:-python3}"
nodes=1
gpus=''
partition=''
time_limit=''
account=''
cpus=''
job_name='dssn_jax'
slurm=0
srun_extra=()
main_args=()
seen_dashdash=0

# Reads the value of option $1 from "$2" (set when it was --opt=value) or the
# next argument; sets `optval` and how many words were used in `used`.
take() {
  local name="$1" inline="$2" next="${3-}" have_next="$4"
  if [[ -n "$inline" ]]; then optval="${inline#*=}"; used=1; return; fi
  ((have_next)) || die "$name needs a value"
  optval="$next"; used=2
}

while (($#)); do
  opt="${1%%=*}"
  inline=''
  [[ "$1" == *=* ]] && inline="$1"
  case "$opt" in
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift; continue ;;
    --slurm) slurm=1; shift; continue ;;
    --) shift; main_args=("$@"); seen_dashdash=1; break ;;
    --nodes|--gpus-per-node|--partition|--time|--account|--cpus-per-task|--job-name|--srun-arg|--python)
      take "$opt" "$inline" "${2-}" "$(($# >= 2))" ;;
    *) die "unknown option $1 (see --help; main.py flags go after --)" ;;
  esac
  case "$opt" in
    --nodes) nodes="$optval" ;;
    --gpus-per-node) gpus="$optval" ;;
    --partition) partition="$optval" ;;
    --time) time_limit="$optval" ;;
    --account) account="$optval" ;;
    --cpus-per-task) cpus="$optval" ;;
    --job-name) job_name="$optval" ;;
    --srun-arg) srun_extra+=("$optval") ;;
    --python) python="$optval" ;;
  esac
  shift "$used"
done

((seen_dashdash)) || die 'no -- MAIN_ARGS; e.g. launch/gpu.sh -- --config configs/digits.py --workdir DIR'
is_positive_int "$nodes" || die "--nodes must be a positive integer, got '$nodes'"
[[ -z "$gpus" ]] || is_positive_int "$gpus" || die "--gpus-per-node must be a positive integer, got '$gpus'"
[[ -z "$cpus" ]] || is_positive_int "$cpus" || die "--cpus-per-task must be a positive integer, got '$cpus'"
[[ -z "$time_limit" || "$time_limit" =~ ^([0-9]+-)?[0-9]+(:[0-9]{2}){0,2}$ ]] ||
  die "--time must look like HH:MM:SS or D-HH:MM:SS, got '$time_limit'"
check_main_args gpu.sh "${main_args[@]+"${main_args[@]}"}"
check_config_file gpu.sh "$PWD" "$(main_arg_value --config "${main_args[@]}")"

main_py="$root/main.py"
((nodes > 1)) && slurm=1

if ((!slurm)); then
  [[ -z "$partition" ]] || die '--partition is a SLURM option; add --slurm or --nodes N>1'
  [[ -z "$time_limit" ]] || die '--time is a SLURM option; add --slurm or --nodes N>1'
  [[ -z "$account" ]] || die '--account is a SLURM option; add --slurm or --nodes N>1'
  [[ -z "$cpus" ]] || die '--cpus-per-task is a SLURM option; add --slurm or --nodes N>1'
  ((${#srun_extra[@]} == 0)) || die '--srun-arg is a SLURM option; add --slurm or --nodes N>1'
  cmd=()
  if [[ -n "$gpus" ]]; then
    cmd=(env "CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((gpus - 1)))")
  fi
  cmd+=("$python" "$main_py" "${main_args[@]}")
else
  [[ -n "$gpus" ]] || die '--gpus-per-node is required with SLURM (srun --gpus-per-node, and the GPUs each process drives)'
  cmd=(srun "--nodes=$nodes" --ntasks-per-node=1 "--gpus-per-node=$gpus")
  [[ -z "$cpus" ]] || cmd+=("--cpus-per-task=$cpus")
  [[ -z "$partition" ]] || cmd+=("--partition=$partition")
  [[ -z "$time_limit" ]] || cmd+=("--time=$time_limit")
  [[ -z "$account" ]] || cmd+=("--account=$account")
  cmd+=("--job-name=$job_name" --kill-on-bad-exit=1 --label)
  cmd+=("${srun_extra[@]+"${srun_extra[@]}"}")
  if ((nodes > 1)); then
    # One process per node: without JAX_LOCAL_DEVICE_IDS, SLURM auto-detection
    # would give each process only GPU $SLURM_LOCALID (that is, GPU 0).
    cmd+=(env "JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))" "$python" "$main_py" --distributed)
  else
    cmd+=("$python" "$main_py")
  fi
  cmd+=("${main_args[@]}")
  if ((!dry_run)); then
    command -v srun >/dev/null || die 'srun not found: run this on a SLURM login node (or drop --slurm/--nodes for one local node)'
  fi
fi

if ((dry_run)); then
  print_command "${cmd[@]}"
  exit 0
fi
exec "${cmd[@]}"
