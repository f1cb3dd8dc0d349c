#!/usr/bin/env bash
# The quickstart: builds usher (release) if needed, then starts a directory that scales the
# example service `hello` from zero instances, and a sidecar:
#   - directory: QUIC udp 127.0.0.1:7400, join endpoint udp 127.0.0.1:7401, admin tcp
#     127.0.0.1:7401, [[services]] hello (0 to 3 instances of usher-test-server, one request
#     at a time each, idle after 60 s),
#   - sidecar: proxy 127.0.0.1:7410, admin 127.0.0.1:7411, joined with a sidecar token.
# State and logs go to ./.quickstart (or $USHER_EXAMPLE_DIR). Ctrl-C stops everything.
# USHER_BIN=DIR uses the binaries in DIR instead of building.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "${USHER_BIN:-}" ]; then
    echo "quickstart: cargo build --release (the first build takes a few minutes)"
    (cd "$root" && cargo build --release --quiet --bins)
fi
bin="${USHER_BIN:-$root/target/release}"
state="${USHER_EXAMPLE_DIR:-$root/.quickstart}"

name=quickstart
# shellcheck source=examples/common.sh
source "$root/examples/common.sh"
need_binaries "$bin" usher-directory usher-agent usher-sidecar usher-test-server
mkdir -p "$state"
export USHER_LOG_TEXT=1

cat >"$state/directory.toml" <<EOT
listen = "127.0.0.1:7400"
admin = "127.0.0.1:7401"
state_dir = "$state/directory"

[[services]]
name = "hello"
command = ["$bin/usher-test-server", "--port", "{port}", "--name", "hello"]
health = "http:/health"
concurrency = 1
max_instances = 3
idle_timeout = "60s"
EOT

"$bin/usher-directory" --config "$state/directory.toml" >"$state/directory.log" 2>&1 &
pids+=($!)
wait_for_directory

# The sidecar joins with a token (the directory certifies the agents it starts itself).
"$bin/usher-sidecar" --directory 127.0.0.1:7400 --join-token "$(join_token sidecar)" \
    --listen 127.0.0.1:7410 --admin 127.0.0.1:7411 --state-dir "$state/sidecar" \
    >"$state/sidecar.log" 2>&1 &
pids+=($!)
wait_for 15 "the sidecar" curl -sf http://127.0.0.1:7411/healthz

cat <<EOT
usher is running: a directory that scales 'hello' (now at zero instances) and a sidecar.

The first request starts an instance (a cold start); concurrent slow requests add more:
    curl -H 'Host: hello' http://127.0.0.1:7410/
    http_proxy=http://127.0.0.1:7410 curl http://hello/
    for i in 1 2 3 4 5 6; do curl -s -H 'Host: hello' 'http://127.0.0.1:7410/slow?ms=3000' & done; wait

Pin or release the instance count (mutations need the admin token):
    $bin/usher-directory --state-dir $state/directory scale hello 2

Watch the autoscaler's targets and decisions, the route tables and the security counters:
    open http://127.0.0.1:7401/ in a browser  # the directory's dashboard: all of the below
    curl http://127.0.0.1:7401/v1/services
    curl http://127.0.0.1:7401/v1/routes     # the directory's route table
    curl http://127.0.0.1:7411/v1/routes     # the sidecar's replica, with in-flight counts
    curl http://127.0.0.1:7401/v1/security   # refused handshakes, joins, messages

Kill an instance (pkill -9 -f '^[^ ]*usher-test-server'): the directory starts a new one.
A minute without requests scales 'hello' back to zero.
Logs and state: $state
Press Ctrl-C to stop.
EOT
wait
