#!/usr/bin/env bash
# Start a Docker daemon for bap-engine on this machine (idempotent; run as root; used by CI).
#
# If `docker info` already works, nothing is done. Otherwise:
#   * installs docker.io and jq with apt when dockerd is missing,
#   * installs /usr/local/sbin/runc-clamp-oom (root here lacks CAP_SYS_RESOURCE, so a negative
#     oom_score_adj - which Kubernetes' dockershim always asks for - would fail; the wrapper clamps it to 0),
#   * starts dockerd with that wrapper as the default runtime, PID in /run/bap-dockerd.pid,
#     log in /tmp/bap-dockerd.log, and waits (60 s max) until `docker info` works.
# scripts/docker-down.sh stops only a dockerd that this script started.
set -euo pipefail

PIDFILE=${BAP_DOCKERD_PIDFILE:-/run/bap-dockerd.pid}
LOG=${BAP_DOCKERD_LOG:-/tmp/bap-dockerd.log}
WRAPPER=/usr/local/sbin/runc-clamp-oom
TIMEOUT_S=60

log() { echo "docker-up: $*" >&2; }

if docker info >/dev/null 2>&1; then
    log "daemon already reachable; nothing to do"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    log "must run as root to install and start dockerd"
    exit 1
fi

if ! command -v dockerd >/dev/null 2>&1 || ! command -v jq >/dev/null 2>&1; then
    log "installing docker.io and jq"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io jq
fi

if [ ! -x "$WRAPPER" ]; then
    log "installing $WRAPPER"
    cat >"$WRAPPER" <<'W'
#!/bin/bash
# root lacks CAP_SYS_RESOURCE here: clamp negative oom_score_adj to 0, then exec the real runc
args=("$@"); bundle=""
for ((i=0; i<${#args[@]}; i++)); do
  case "${args[$i]}" in --bundle|-b) bundle="${args[$((i+1))]}";; --bundle=*) bundle="${args[$i]#--bundle=}";; esac
done
if [ -n "$bundle" ] && [ -f "$bundle/config.json" ] && jq -e '(.process.oomScoreAdj // 0) < 0' "$bundle/config.json" >/dev/null 2>&1; then
  jq -c '.process.oomScoreAdj = 0' "$bundle/config.json" >"$bundle/config.json.tmp" && mv "$bundle/config.json.tmp" "$bundle/config.json"
fi
exec /usr/bin/runc "$@"
W
    chmod +x "$WRAPPER"
fi

# A pidfile whose process is still alive means our dockerd is starting or wedged: do not start a second one.
if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    log "dockerd from $PIDFILE (pid $(cat "$PIDFILE")) is alive; waiting for it"
else
    log "starting dockerd (log: $LOG)"
    nohup dockerd --add-runtime "clamp=$WRAPPER" --default-runtime=clamp >"$LOG" 2>&1 &
    echo $! >"$PIDFILE"
fi

pid=$(cat "$PIDFILE")
deadline=$((SECONDS + TIMEOUT_S))
until docker info >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then
        log "dockerd (pid $pid) exited; last log lines:"
        tail -20 "$LOG" >&2
        rm -f "$PIDFILE"
        exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        log "dockerd not ready after ${TIMEOUT_S}s; see $LOG"
        exit 1
    fi
    sleep 0.1
done
log "daemon ready (pid $pid)"
