#!/usr/bin/env bash
# Stop the dockerd that scripts/docker-up.sh started (by the PID in its pidfile), and wait for it to exit.
# A daemon this project did not start (no pidfile) is left alone.
set -euo pipefail

PIDFILE=${BAP_DOCKERD_PIDFILE:-/run/bap-dockerd.pid}

if [ ! -f "$PIDFILE" ]; then
    echo "docker-down: no $PIDFILE; dockerd was not started by docker-up.sh, leaving it alone" >&2
    exit 0
fi
pid=$(cat "$PIDFILE")
if kill "$pid" 2>/dev/null; then
    # dockerd stops its containers (and its own containerd) before exiting; give it 30 s.
    for _ in $(seq 1 300); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "docker-down: dockerd (pid $pid) still alive after 30s; sending SIGKILL" >&2
        kill -9 "$pid" 2>/dev/null || true
    fi
fi
rm -f "$PIDFILE"
echo "docker-down: dockerd stopped" >&2
