#!/usr/bin/env bash
# Starts a local usher mesh with a fixed set of instances, started by hand (no autoscaling), for
# trying failures: kill an instance or the directory and requests keep succeeding.
#   - a directory (QUIC udp 127.0.0.1:7400, join endpoint udp 127.0.0.1:7401, admin tcp
#     127.0.0.1:7401),
#   - three instances of the example service `hello` (usher-test-server), each under an agent
#     (admin 127.0.0.1:7420-7422),
#   - a sidecar (proxy 127.0.0.1:7410, admin 127.0.0.1:7411),
# every node joined with a token from `usher-directory token create`.
# State and logs go to ./.fixed-instances (or $USHER_EXAMPLE_DIR). Ctrl-C stops everything.
#
# Build first: cargo build --release
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${USHER_BIN:-$root/target/release}"
state="${USHER_EXAMPLE_DIR:-$root/.fixed-instances}"

name=fixed-instances
# shellcheck source=examples/common.sh
source "$root/examples/common.sh"
need_binaries "$bin" usher-directory usher-agent usher-sidecar usher-test-server
mkdir -p "$state"
export USHER_LOG_TEXT=1

"$bin/usher-directory" --listen 127.0.0.1:7400 --admin 127.0.0.1:7401 \
    --state-dir "$state/directory" >"$state/directory.log" 2>&1 &
pids+=($!)
wait_for_directory

# Every node joins with a token: one for the agents of hello, one for the sidecars.
agent_token="$(join_token agent hello)"
sidecar_token="$(join_token sidecar)"

for i in 1 2 3; do
    "$bin/usher-agent" --directory 127.0.0.1:7400 --join-token "$agent_token" \
        --service hello --admin "127.0.0.1:$((7419 + i))" --state-dir "$state/agent-$i" \
        --health http:/health \
        -- "$bin/usher-test-server" --port '{port}' --name "hello-$i" \
        >"$state/agent-$i.log" 2>&1 &
    pids+=($!)
done

"$bin/usher-sidecar" --directory 127.0.0.1:7400 --join-token "$sidecar_token" \
    --listen 127.0.0.1:7410 --admin 127.0.0.1:7411 --state-dir "$state/sidecar" \
    >"$state/sidecar.log" 2>&1 &
pids+=($!)

wait_for 20 "three instances of hello" bash -c "[ \"\$(curl -sf http://127.0.0.1:7411/v1/routes | grep -o '\"state\": *\"up\"' | wc -l)\" -ge 3 ]"

cat <<EOT
usher is running: a directory, three instances of 'hello' under agents, and a sidecar.

Try (each request goes to one of hello-1, hello-2, hello-3):
    curl -H 'Host: hello' http://127.0.0.1:7410/
    http_proxy=http://127.0.0.1:7410 curl http://hello/

Kill an instance or the directory; requests keep succeeding:
    pkill -9 -f '^[^ ]*usher-test-server .*hello-2'
    pkill -9 usher-directory

Look inside:
    open http://127.0.0.1:7401/ in a browser  # the directory's dashboard
    curl http://127.0.0.1:7401/v1/routes     # the directory's route table
    curl http://127.0.0.1:7411/v1/routes     # the sidecar's replica, with in-flight counts

Logs and state: $state
Press Ctrl-C to stop.
EOT
wait
