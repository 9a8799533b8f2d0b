#!/usr/bin/env bash
# Trains on a Cloud TPU VM slice (one host or a pod slice of many): creates it
# or reuses it, copies this checkout to every worker and installs it there,
# then starts `main.py --distributed` on all workers at once. Each worker is
# one JAX process; jax.distributed.initialize() finds its peers from the TPU
# metadata.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/tpu_pod.sh --tpu-name NAME --zone ZONE --project PROJECT [OPTIONS] -- MAIN_ARGS...

Steps (each printed by --dry-run):
  1. create the slice (--create) or check that it exists and is READY;
  2. pack this checkout (tracked and untracked, not ignored, files) into a
     tarball, copy it to every worker, unpack it into ~/REMOTE_DIR and
     `pip install -e` it with jax[tpu], gcsfs and google-cloud-storage (for
     gs:// workdirs) into the venv ~/REMOTE_DIR_venv
     (skip with --skip-install);
  3. run `python main.py --distributed MAIN_ARGS` on every worker
     (gcloud compute tpus tpu-vm ssh --worker=all).

MAIN_ARGS must include --config (a path inside this checkout, which is what
the workers run) and --workdir, a gs:// path: the workers of a pod share no
disk, and checkpoints are written by all of them.

Required:
  --tpu-name NAME        the TPU VM slice
  --zone ZONE            e.g. us-central2-b
  --project PROJECT      Google Cloud project id
Creating a slice:
  --create               create it first (fails if it exists)
  --accelerator-type T   e.g. v4-32, v5litepod-16 (required with --create)
  --version RUNTIME      TPU software version, e.g. tpu-ubuntu2204-base (required with --create)
  --spot                 create a Spot slice (preemptible; train.py saves on SIGTERM)
Install and run:
  --skip-install         reuse the code and venv already on the workers
  --setup CMD            shell command run on every worker before the install,
                         e.g. to get Python >= 3.11
  --python PATH          Python (>= 3.11) on the workers for the venv (default python3)
  --remote-dir DIR       directory under the workers' home (default dssn_jax)
  --background           detach: nohup on every worker, log in ~/REMOTE_DIR/train.log
  --local-workdir        allow a --workdir that is not gs:// (single-host slices only)
  --dry-run              print the commands, one per line; run nothing
  -h, --help             this help

Example:
  launch/tpu_pod.sh --tpu-name dssn --zone us-central2-b --project my-proj \
      --create --accelerator-type v4-32 --version tpu-ubuntu2204-base -- \
      --config configs/pascal.py:split=92 --workdir gs://my-bucket/runs/voc92 \
      --config.data.root=/mnt/data/VOC2012 --config.data.splits_dir=/mnt/data/splits/pascal
USAGE
}

die() { echo "tpu_pod.sh: error: $*" >&2; exit 2; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
# shellcheck source=launch/common.sh
. "$here/common.sh"

dry_run=0
tpu=''
zone=''
project=''
create=0
accel=''
version=''
spot=0
skip_install=0
setup=''
python='python3'
remote_dir='dssn_jax'
background=0
local_workdir=0
main_args=()
seen_dashdash=0

while (($#)); do
  opt="${1%%=*}"
  case "$opt" in
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift; continue ;;
    --create) create=1; shift; continue ;;
    --spot) spot=1; shift; continue ;;
    --skip-install) skip_install=1; shift; continue ;;
    --background) background=1; shift; continue ;;
    --local-workdir) local_workdir=1; shift; continue ;;
    --) shift; main_args=("$@"); seen_dashdash=1; break ;;
    --tpu-name|--zone|--project|--accelerator-type|--version|--setup|--python|--remote-dir)
      if [[ "$1" == *=* ]]; then
        optval="${1#*=}"; shift
      else
        (($# >= 2)) || die "$opt needs a value"
        optval="$2"; shift 2
      fi ;;
    *) die "unknown option $1 (see --help; main.py flags go after --)" ;;
  esac
  case "$opt" in
    --tpu-name) tpu="$optval" ;;
    --zone) zone="$optval" ;;
    --project) project="$optval" ;;
    --accelerator-type) accel="$optval" ;;
    --version) version="$optval" ;;
    --setup) setup="$optval" ;;
    --python) python="$optval" ;;
    --remote-dir) remote_dir="$optval" ;;
  esac
done

[[ -n "$tpu" ]] || die 'missing --tpu-name NAME (the TPU VM slice to create or use)'
[[ -n "$zone" ]] || die 'missing --zone ZONE (e.g. us-central2-b)'
[[ -n "$project" ]] || die 'missing --project PROJECT (the Google Cloud project id)'
if ((create)); then
  [[ -n "$accel" ]] || die '--create needs --accelerator-type (e.g. v4-32, v5litepod-16)'
  [[ -n "$version" ]] || die '--create needs --version (the TPU runtime, e.g. tpu-ubuntu2204-base)'
else
  [[ -z "$accel$version" ]] || die '--accelerator-type and --version only apply with --create'
  ((!spot)) || die '--spot only applies with --create'
fi
[[ "$remote_dir" =~ ^[A-Za-z0-9_.-]+$ ]] ||
  die "--remote-dir must be a plain directory name under the workers' home, got '$remote_dir'"
((seen_dashdash)) || die 'no -- MAIN_ARGS; e.g. -- --config configs/pascal.py --workdir gs://BUCKET/run'
check_main_args tpu_pod.sh "${main_args[@]+"${main_args[@]}"}"
config="$(main_arg_value --config "${main_args[@]}")"
[[ "$config" != /* ]] ||
  die "--config '$config' must be relative to the repository root: the workers run the copy of this checkout"
check_config_file tpu_pod.sh "$root" "$config"
workdir="$(main_arg_value --workdir "${main_args[@]}")"
if [[ "$workdir" != gs://* ]] && ((!local_workdir)); then
  die "--workdir '$workdir' is not a gs:// path; the workers of a pod share no disk (use gs://BUCKET/PATH, or --local-workdir on a single-host slice)"
fi

where=(--zone="$zone" --project="$project")
tarball="${TMPDIR:-/tmp}/$remote_dir-src-$$.tar.gz"
filelist="${TMPDIR:-/tmp}/$remote_dir-src-$$.files"
venv="${remote_dir}_venv"

# 1. The slice.
if ((create)); then
  slice_cmd=(gcloud compute tpus tpu-vm create "$tpu" "${where[@]}"
             --accelerator-type="$accel" --version="$version")
  ((!spot)) || slice_cmd+=(--spot)
else
  slice_cmd=(gcloud compute tpus tpu-vm describe "$tpu" "${where[@]}" '--format=value(state)')
fi

# 2. Install on every worker.
pack_cmd=(tar -czf "$tarball" -C "$root" -T "$filelist")
copy_cmd=(gcloud compute tpus tpu-vm scp "$tarball" "$tpu:$remote_dir-src.tar.gz"
          --worker=all "${where[@]}")
py_check="$python -c \"import sys; sys.exit(sys.version_info < (3, 11))\" || { echo \"dssn_jax needs Python >= 3.11 on the workers; $python is older or missing: see --python and --setup\" >&2; exit 1; }"
install_script="set -e; $py_check; rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf $remote_dir-src.tar.gz -C $remote_dir && $python -m venv $venv && $venv/bin/pip install -q --upgrade pip && $venv/bin/pip install -q \"jax[tpu]\" gcsfs google-cloud-storage -e ./$remote_dir"
install_cmd=(gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${where[@]}" --command "$install_script")
setup_cmd=()
[[ -z "$setup" ]] || setup_cmd=(gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${where[@]}" --command "$setup")

# 3. Train on every worker.
train_line="../$venv/bin/python main.py --distributed"
for word in "${main_args[@]}"; do
  train_line+=" $(shell_quote "$word")"
done
if ((background)); then
  train_script="cd $remote_dir && nohup $train_line > train.log 2>&1 < /dev/null & echo \"started on \$(hostname); log: ~/$remote_dir/train.log\""
else
  train_script="cd $remote_dir && $train_line"
fi
train_cmd=(gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${where[@]}" --command "$train_script")

if ((dry_run)); then
  print_command "${slice_cmd[@]}"
  if ((!skip_install)); then
    echo "git -C $(shell_quote "$root") ls-files --cached --others --exclude-standard > $(shell_quote "$filelist")"
    print_command "${pack_cmd[@]}"
    print_command "${copy_cmd[@]}"
    ((${#setup_cmd[@]} == 0)) || print_command "${setup_cmd[@]}"
    print_command "${install_cmd[@]}"
  fi
  print_command "${train_cmd[@]}"
  exit 0
fi

command -v gcloud >/dev/null || die 'gcloud not found: install the Google Cloud CLI and run `gcloud auth login`'
run() { echo "+ $(print_command "$@")" >&2; "$@"; }

if ((create)); then
  run "${slice_cmd[@]}"
else
  echo "+ $(print_command "${slice_cmd[@]}")" >&2
  state="$("${slice_cmd[@]}")" ||
    die "cannot describe TPU '$tpu' in $zone/$project; create it with --create --accelerator-type T --version V"
  [[ "$state" == READY ]] || die "TPU '$tpu' is in state '$state', not READY"
fi

if ((!skip_install)); then
  [[ -d "$root/.git" || -f "$root/.git" ]] || die "$root is not a git checkout: cannot list the files to copy"
  trap 'rm -f "$tarball" "$filelist"' EXIT
  # Tracked and untracked files that git does not ignore, minus deleted ones.
  : >"$filelist"
  while IFS= read -r -d '' f; do
    [[ -e "$root/$f" ]] && printf '%s\n' "$f" >>"$filelist"
  done < <(git -C "$root" ls-files -z --cached --others --exclude-standard)
  run "${pack_cmd[@]}"
  run "${copy_cmd[@]}"
  ((${#setup_cmd[@]} == 0)) || run "${setup_cmd[@]}"
  run "${install_cmd[@]}"
fi
run "${train_cmd[@]}"
