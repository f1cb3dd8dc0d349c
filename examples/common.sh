# Shared by the example scripts (sourced): `need_binaries`, `wait_for`, and a trap that stops
# every process whose pid was added to `pids` on exit or Ctrl-C. Set `name` and `state` first.

need_binaries() { # need_binaries DIR BINARY...
    local dir=$1
    shift
    for b in "$@"; do
        if [ ! -x "$dir/$b" ]; then
            echo "$name: $dir/$b is missing; run 'cargo build --release' first" >&2
            exit 1
        fi
    done
}

pids=()
cleanup() {
    trap - EXIT INT TERM
    echo
    echo "stopping..."
    if [ ${#pids[@]} -gt 0 ]; then
        kill -TERM "${pids[@]}" 2>/dev/null || true
    fi
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            echo "$name: timed out waiting for $what; logs are in $state" >&2
            exit 1
        fi
        sleep 0.2
    done
}
