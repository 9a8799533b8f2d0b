#!/usr/bin/env bash
# Rehearses a multi-host run on one machine: N processes on 127.0.0.1, each
# with its own forced CPU devices, joined by jax.distributed (gloo
# collectives), exactly as N TPU/GPU hosts would be.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/local_multihost.sh [OPTIONS] N_PROCESSES DEVICES_PER_PROCESS -- MAIN_ARGS...

Starts N_PROCESSES copies of `python main.py MAIN_ARGS` on 127.0.0.1, each with
  JAX_PLATFORMS=cpu
  XLA_FLAGS=--xla_force_host_platform_device_count=DEVICES_PER_PROCESS
  --coordinator_address 127.0.0.1:PORT --num_processes N --process_id i
(PORT: a free local port). Output lines are prefixed with [i]. Waits for all;
if one fails, the others are stopped (SIGTERM, then SIGKILL after the grace
period) and the script exits with the failed process's status.

MAIN_ARGS must include --config and --workdir.

Options:
  --dry-run         print the command of each process, one per line; run nothing
  --python PATH     Python interpreter (default: $PYTHON, else python3)
  --port PORT       coordinator port (default: a free one)
  --grace SECONDS   how long stopped processes get before SIGKILL (default 20)
  --main FILE       the program to start (default: main.py of this checkout)
  -h, --help        this help

Example:
  launch/local_multihost.sh 2 2 -- --config configs/digits.py --workdir /tmp/mh \
      --config.train.steps=20
USAGE
}

die() { echo "local_multihost.sh: error: $*" >&2; exit 2; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
# shellcheck source=launch/common.sh
. "$here/common.sh"

dry_run=0
python="${PYTHON:-python3}"
port=''
grace=20
main_py="$root/main.py"
positional=()
main_args=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --python) (($# >= 2)) || die '--python needs a value'; python="$2"; shift 2 ;;
    --python=*) python="${1#*=}"; shift ;;
    --port) (($# >= 2)) || die '--port needs a value'; port="$2"; shift 2 ;;
    --port=*) port="${1#*=}"; shift ;;
    --grace) (($# >= 2)) || die '--grace needs a value'; grace="$2"; shift 2 ;;
    --grace=*) grace="${1#*=}"; shift ;;
    --main) (($# >= 2)) || die '--main needs a value'; main_py="$2"; shift 2 ;;
    --main=*) main_py="${1#*=}"; shift ;;
    --) shift; main_args=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) positional+=("$1"); shift ;;
  esac
done

((${#positional[@]} == 2)) ||
  die "expected N_PROCESSES DEVICES_PER_PROCESS before --, got ${#positional[@]} value(s): ${positional[*]:-none} (see --help)"
n_proc="${positional[0]}"
n_dev="${positional[1]}"
is_positive_int "$n_proc" || die "N_PROCESSES must be a positive integer, got '$n_proc'"
is_positive_int "$n_dev" || die "DEVICES_PER_PROCESS must be a positive integer, got '$n_dev'"
is_positive_int "$grace" || die "--grace must be a positive integer, got '$grace'"
[[ -f "$main_py" ]] || die "--main: no such file '$main_py'"
check_main_args local_multihost.sh "${main_args[@]+"${main_args[@]}"}"
check_config_file local_multihost.sh "$PWD" "$(main_arg_value --config "${main_args[@]}")"

if [[ -z "$port" ]]; then
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')" ||
    die "could not run '$python' to find a free port (set --python)"
fi
is_positive_int "$port" || die "--port must be a port number, got '$port'"

xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$n_dev"

# The command of process $1, as an array in `cmd`.
command_of() {
  cmd=(env JAX_PLATFORMS=cpu "XLA_FLAGS=$xla_flags" PYTHONUNBUFFERED=1
       "$python" "$main_py" "${main_args[@]}"
       --coordinator_address "127.0.0.1:$port" --num_processes "$n_proc" --process_id "$1")
}

if ((dry_run)); then
  for ((i = 0; i < n_proc; i++)); do
    command_of "$i"
    print_command "${cmd[@]}"
  done
  exit 0
fi

tmp="$(mktemp -d "${TMPDIR:-/tmp}/local_multihost.XXXXXX")"
jobs_pids=()

# Stops every process still running: SIGTERM (train.py saves a checkpoint and
# exits), then SIGKILL once the grace period is over.
stop_all() {
  local f pid t
  for f in "$tmp"/pid.*; do
    [[ -e "$f" ]] || continue
    pid="$(cat "$f")"
    kill -TERM "$pid" 2>/dev/null || true
  done
  for ((t = 0; t < grace * 10; t++)); do
    local alive=0
    for f in "$tmp"/pid.*; do
      [[ -e "$f" ]] || continue
      kill -0 "$(cat "$f")" 2>/dev/null && alive=1
    done
    ((alive)) || break
    sleep 0.1
  done
  for f in "$tmp"/pid.*; do
    [[ -e "$f" ]] || continue
    kill -KILL "$(cat "$f")" 2>/dev/null || true
  done
}

cleanup() { rm -rf "$tmp"; }
trap cleanup EXIT
trap 'echo "local_multihost.sh: interrupted; stopping all processes" >&2; stop_all; exit 130' INT TERM

echo "local_multihost.sh: $n_proc processes x $n_dev CPU devices, coordinator 127.0.0.1:$port" >&2
for ((i = 0; i < n_proc; i++)); do
  command_of "$i"
  # The subshell records the Python pid (to stop it) and exits with its status;
  # pipefail makes that the status of the pipeline job.
  (
    "${cmd[@]}" </dev/null 2>&1 &
    echo "$!" >"$tmp/pid.$i"
    wait "$!"
  ) | awk -v p="[$i] " '{ print p $0; fflush() }' &
  jobs_pids+=("$!")
done

status=0
remaining=$n_proc
done_flags=()
while ((remaining > 0)); do
  for ((i = 0; i < n_proc; i++)); do
    [[ -n "${done_flags[i]:-}" ]] && continue
    kill -0 "${jobs_pids[i]}" 2>/dev/null && continue
    rc=0
    wait "${jobs_pids[i]}" || rc=$?
    done_flags[i]=1
    remaining=$((remaining - 1))
    if ((rc != 0 && status == 0)); then
      status=$rc
      echo "local_multihost.sh: process $i exited with status $rc; stopping the others" >&2
      stop_all
    fi
  done
  ((remaining > 0)) && sleep 0.2
done
if ((status == 0)); then
  echo "local_multihost.sh: all $n_proc processes finished" >&2
fi
exit "$status"
