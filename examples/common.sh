# Shared by the example scripts (sourced): `need_binaries`, `wait_for`, `wait_for_directory`,
# `join_token`, and a trap that stops every process whose pid was added to `pids` on exit or
# Ctrl-C. Set `name`, `bin` and `state` first; the directory is at 127.0.0.1:7400 (admin
# 127.0.0.1:7401) with its state in "$state/directory".

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

wait_for_directory() { # wait_for_directory: until the directory serves and its admin token exists
    wait_for 15 "the directory" test -s "$state/directory/admin-token"
    wait_for 15 "the directory's admin port" curl -sf http://127.0.0.1:7401/healthz
}

join_token() { # join_token ROLE [SERVICE]: prints a new join token for a node of ROLE
    local args=(--admin 127.0.0.1:7401 --state-dir "$state/directory" token create --role "$1")
    if [ $# -gt 1 ]; then
        args+=(--service "$2")
    fi
    "$bin/usher-directory" "${args[@]}"
}
