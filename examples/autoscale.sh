#!/usr/bin/env bash
# Starts a directory that scales the example service `hello` from zero, and a sidecar:
#   - directory: QUIC udp 127.0.0.1:7400, admin 127.0.0.1:7401, [[services]] hello (0 to 3
#     instances of usher-test-server, one request at a time each, idle after 60 s),
#   - sidecar: proxy 127.0.0.1:7410, admin 127.0.0.1:7411.
# State and logs go to ./.autoscale (or $USHER_AUTOSCALE_DIR). Ctrl-C stops everything.
#
# Build first: cargo build --release
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${USHER_BIN:-$root/target/release}"
state="${USHER_AUTOSCALE_DIR:-$root/.autoscale}"

name=autoscale
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
wait_for 15 "the directory" test -s "$state/directory/ca.pem"

"$bin/usher-sidecar" --directory 127.0.0.1:7400 --ca "$state/directory/ca.pem" \
    --listen 127.0.0.1:7410 --admin 127.0.0.1:7411 --state-dir "$state/sidecar" \
    >"$state/sidecar.log" 2>&1 &
pids+=($!)
wait_for 15 "the sidecar" curl -sf http://127.0.0.1:7411/healthz

cat <<EOT
usher is running: a directory that scales 'hello' (now at zero instances) and a sidecar.

The first request starts an instance (a cold start); concurrent slow requests add more:
    curl -H 'Host: hello' http://127.0.0.1:7410/
    for i in 1 2 3 4 5 6; do curl -s -H 'Host: hello' 'http://127.0.0.1:7410/slow?ms=3000' & done; wait

Watch the autoscaler's targets and decisions:
    curl http://127.0.0.1:7401/v1/services

A minute without requests scales 'hello' back to zero.
Logs and state: $state
Press Ctrl-C to stop.
EOT
wait
