#!/usr/bin/env bash
# `make bench`: the figures issues 2 (item 11), 3 (item 6), 4 (item 5) and 5 (item 5) ask for,
# measured in one run on this machine, with targets and PASS/MISS next to each figure.
#
#   CPU 0: the orchestrator (`bap-engine serve`), its Postgres, and the engines it spawns
#          (they inherit its pinning; bare reference engines are pinned there too, for a fair floor)
#   CPU 1: the load: wrk, the Python drivers, the /health fixture of the sweep
#
# Sections (each a driver under bench/, bounded by `timeout`; the whole run ~5-10 minutes):
#   core.py          admit req/s and p50/p99 (wrk), provision overhead, bursts of 20 and 100
#   wake.py          wake latency from sleep (SIGSTOP) vs the engine's bare /health round trip
#   sweep.py         health sweep over 2,000 engines, orchestrator RSS with 2,000 registered
#   second_wave.py   warm-pool admit, event commit -> SSE consumer / webhook receiver latency,
#                    200 SSE consumers on one replica and their CPU per event
#   docker_bench.py  provision vs `docker run`, unpause wake (only with a daemon and the image)
#   k8s_bench.py     provision and scale 0->1 wake vs a bare pod (only with the test cluster up)
#
# Tables go to stdout and to bench/results/latest.txt; progress goes to stderr. Raw wrk output
# lands in bench/results/. Everything runs on 127.0.0.1, in a fresh temporary directory that is
# removed at the end; every process is ended by its own pid.
#
# Environment: BENCH_PROFILE=1 also records a py-spy profile of `serve` during an extra
# (unmeasured) wrk run, summarised in bench/results/admit-profile.txt (py-spy is installed into
# a cache venv if missing). BENCH_SECTIONS="core wake sweep second_wave docker k8s" picks sections.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY="$ROOT/.venv/bin/python"
RESULTS="$ROOT/bench/results"
OUT="$RESULTS/latest.txt"
SECTIONS=${BENCH_SECTIONS:-"core wake sweep second_wave docker k8s"}
BUDGET_S=${BENCH_BUDGET_S:-660}   # optional sections are skipped once the run is past this
log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

cd "$ROOT" || exit 1
mkdir -p "$RESULTS"

# ---- tools -------------------------------------------------------------------------------
apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1 && return 0
    log "apt-get install $* failed; running apt-get update first"
    apt-get update -q >/dev/null 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
}
if ! command -v wrk >/dev/null 2>&1; then
    log "installing wrk from the Debian packages"
    apt_install wrk || { log "could not install wrk"; exit 1; }
fi
if ! command -v taskset >/dev/null 2>&1; then
    log "installing taskset (util-linux)"
    apt_install util-linux || { log "could not install taskset"; exit 1; }
fi
if [ "$(nproc)" -lt 2 ]; then
    log "needs at least 2 CPUs (orchestrator on CPU 0, load on CPU 1); this machine has $(nproc)"
    exit 1
fi
if [ "${BENCH_PROFILE:-0}" = 1 ] && [ -z "${BENCH_PYSPY:-}" ] && ! command -v py-spy >/dev/null 2>&1; then
    TOOLS="${XDG_CACHE_HOME:-$HOME/.cache}/bap-engine-bench-tools"
    if [ ! -x "$TOOLS/bin/py-spy" ]; then
        log "installing py-spy into $TOOLS"
        python3 -m venv "$TOOLS" && "$TOOLS/bin/pip" install -q py-spy >/dev/null 2>&1 || log "py-spy install failed"
    fi
    [ -x "$TOOLS/bin/py-spy" ] && export BENCH_PYSPY="$TOOLS/bin/py-spy"
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# ---- workspace and cleanup -----------------------------------------------------------------
WORK=$(mktemp -d /tmp/bap-bench.XXXXXX)
DRIVER_PID=""
cleanup() {
    local rc=$?
    if [ -n "$DRIVER_PID" ] && kill -0 "$DRIVER_PID" 2>/dev/null; then
        kill -TERM "$DRIVER_PID" 2>/dev/null   # the driver destroys what it created, then exits
        for _ in $(seq 1 300); do kill -0 "$DRIVER_PID" 2>/dev/null || break; sleep 0.1; done
    fi
    # last resort, by recorded pid only: engines of our orchestrators, then our Postgres servers
    "$PY" - "$WORK" <<'PYEOF' 2>/dev/null || true
import sys
from pathlib import Path
sys.path.insert(0, "bench")
from common import reap_engine_records, stop_postmaster
work = Path(sys.argv[1])
for data in work.glob("*/engines"):
    reap_engine_records(data.parent)
for pidfile in work.rglob("postmaster.pid"):
    stop_postmaster(pidfile.parent)
PYEOF
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- run -----------------------------------------------------------------------------------
: >"$OUT"
emit() { printf '%s\n' "$*" | tee -a "$OUT"; }
emit "bap-engine benchmark, $(date -u +%Y-%m-%dT%H:%M:%SZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
emit "machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(free -g | awk '/Mem:/ {print $2}') GB RAM; load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
emit "pinning: orchestrator + Postgres + engines it spawns on CPU 0 (taskset); wrk and drivers on CPU 1"
emit "engine ports: 30000-32767 (kernel ephemeral range $(tr '\t' '-' </proc/sys/net/ipv4/ip_local_port_range))"
emit ""

# section NAME TIMEOUT_S CPU DRIVER [ARGS...]: one driver, bounded; its stdout (the table) is kept.
section() {
    local name=$1 limit=$2 cpu=$3; shift 3
    case " $SECTIONS " in *" $name "*) ;; *) return 0 ;; esac
    log "section $name (at most ${limit}s)"
    local started=$SECONDS
    timeout --signal=TERM --kill-after=30 "$limit" taskset -c "$cpu" "$PY" "$@" >"$WORK/$name.out" &
    DRIVER_PID=$!
    wait "$DRIVER_PID"
    local rc=$?
    DRIVER_PID=""
    tee -a "$OUT" <"$WORK/$name.out"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        emit "$name: stopped after ${limit}s (time bound); figures above are partial"
        emit ""
    elif [ "$rc" != 0 ]; then
        emit "$name: driver exited with $rc (see the ERROR note above, logs under the temporary dir)"
        emit ""
    fi
    log "section $name done in $((SECONDS - started))s"
}

optional() {  # an optional section, skipped once the run is past its time budget
    if [ "$SECONDS" -gt "$BUDGET_S" ]; then
        case " $SECTIONS " in *" $1 "*) emit "$1: skipped (the run is past its ${BUDGET_S}s budget)"; emit "" ;; esac
        return 0
    fi
    section "$@"
}

section core 330 1 bench/core.py "$WORK/core" "$RESULTS"
section wake 120 1 bench/wake.py "$WORK/wake"
section sweep 200 0 bench/sweep.py "$WORK/sweep"          # plays the orchestrator: CPU 0
section second_wave 150 1 bench/second_wave.py "$WORK/second_wave"
optional docker 200 1 bench/docker_bench.py "$WORK/docker"
optional k8s 240 1 bench/k8s_bench.py "$WORK/k8s"

log "done in ${SECONDS}s; tables in $OUT"
