# Helpers shared by the launch scripts (sourced, not run).

# True when $1 is a positive decimal integer.
is_positive_int() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }

# Quotes one word for a POSIX shell, only where needed.
shell_quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,+@%^-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Prints a command on one line, each word quoted so the line can be pasted
# into a shell.
print_command() {
  local first=1 word
  for word in "$@"; do
    ((first)) || printf ' '
    first=0
    shell_quote "$word"
  done
  printf '\n'
}

# The value of main.py flag $1 in the remaining arguments (`--flag V` or
# `--flag=V`); empty when absent.
main_arg_value() {
  local name="$1" value=''
  shift
  while (($#)); do
    case "$1" in
      "$name") value="${2:-}"; shift ;;
      "$name"=*) value="${1#*=}" ;;
    esac
    shift
  done
  printf '%s' "$value"
}

# Fails unless MAIN_ARGS (after the script name $1) name a config and a
# workdir, and leave the process-group flags to the script.
check_main_args() {
  local script="$1" flag
  shift
  [[ -n "$(main_arg_value --config "$@")" ]] ||
    { echo "$script: error: no --config in MAIN_ARGS (after --), e.g. -- --config configs/digits.py --workdir DIR" >&2; exit 2; }
  [[ -n "$(main_arg_value --workdir "$@")" ]] ||
    { echo "$script: error: no --workdir in MAIN_ARGS (after --), e.g. -- --config configs/digits.py --workdir DIR" >&2; exit 2; }
  for flag in --coordinator_address --num_processes --process_id; do
    if [[ " $* " == *" $flag "* || " $* " == *" $flag="* ]]; then
      echo "$script: error: $flag is set by this script; remove it from MAIN_ARGS" >&2
      exit 2
    fi
  done
}

# Fails unless the config file of spec $3 (`path[:arg]`) exists under dir $2.
check_config_file() {
  local script="$1" dir="$2" spec="$3" path
  path="${spec%%:*}"
  [[ "$path" == /* ]] || path="$dir/$path"
  [[ -f "$path" ]] || { echo "$script: error: config file '${spec%%:*}' not found (looked for $path)" >&2; exit 2; }
}
