"""Shared pieces of the benchmark drivers: pinning, processes we start, the orchestrator
under test, the bare reference engine, statistics and the printed tables.

Every process a driver starts is recorded here and ended by its own pid (never by a
name pattern). Engines the orchestrator spawned are ended through the API; if that
fails, through the pid and /proc starttime in their `.bap-process.json` record under
our own temporary ORCH_DATA_DIR (so nothing outside this run is ever touched).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("BENCH_RESULTS") or ROOT / "bench" / "results")
VENV = ROOT / ".venv"
PYTHON = str(VENV / "bin" / "python")
BAP_ENGINE = str(VENV / "bin" / "bap-engine")
HOST = "127.0.0.1"
ORCH_CPU = 0  # the orchestrator, its Postgres, and the engines they spawn
LOAD_CPU = 1  # wrk, the Python drivers, the health fixture
# The same env names the subprocess backend forwards to an engine (backends/subprocess.py).
ENGINE_BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")


def log(msg: str) -> None:
    """Progress goes to stderr; tables go to stdout (run.sh copies stdout to bench/results/latest.txt)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- pinning ----------------------------------------------------------------------------
def pin_self(cpu: int) -> None:
    """Pin every thread of this process to one CPU (threads started later inherit it)."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), {cpu})


def pin_pid_tree(pid: int, cpu: int) -> list[int]:
    """Pin a process and all its descendants (and their threads). Returns the pids pinned."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    done: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), {cpu})
            done.append(p)
        todo.extend(children.get(p, []))
    return done


def affinity_of(pid: int) -> str:
    try:
        return ",".join(str(c) for c in sorted(os.sched_getaffinity(pid)))
    except OSError:
        return "?"


# ---- ports and processes ----------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _proc_starttime(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    parts = raw[raw.rindex(")") + 2 :].split()
    if parts[0] in ("Z", "X"):
        return None
    return int(parts[19])


def end_pid(pid: int, starttime: int | None = None, grace_s: float = 5.0, group: bool = False) -> None:
    """SIGTERM (SIGCONT first: it may be SIGSTOPped), wait, SIGKILL. Only if it is still the
    same process (starttime check) when one is given."""
    if starttime is not None and _proc_starttime(pid) != starttime:
        return
    kill = os.killpg if group else os.kill
    for sig in (signal.SIGCONT, signal.SIGTERM):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, sig)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if _proc_starttime(pid) is None:
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        kill(pid, signal.SIGKILL)


def reap_engine_records(data_dir: Path) -> int:
    """Kill engines left running by an orchestrator of ours (by their recorded pid + starttime)."""
    n = 0
    for record in (data_dir / "engines").glob("*/.bap-process.json"):
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(record.read_text())
            pid, start = doc.get("pid"), doc.get("starttime")
            if isinstance(pid, int) and isinstance(start, int) and _proc_starttime(pid) == start:
                end_pid(pid, start, grace_s=2.0, group=True)
                n += 1
    return n


def stop_postmaster(pgdata: Path) -> None:
    """Stop the Postgres we started under pgdata, if it is still up (pid from postmaster.pid)."""
    pidfile = pgdata / "postmaster.pid"
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int(pidfile.read_text().splitlines()[0])
        if _proc_starttime(pid) is not None and str(pgdata) in Path(f"/proc/{pid}/cmdline").read_text():
            os.kill(pid, signal.SIGINT)  # Postgres "fast" shutdown
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and _proc_starttime(pid) is not None:
                time.sleep(0.05)


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB."""
    vals = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":", 1)
            vals[k] = int(v.split()[0]) / 1024
    return vals.get("VmRSS", 0.0), vals.get("VmHWM", 0.0)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    parts = raw[raw.rindex(")") + 2 :].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int | None) -> float:
    """CPU seconds of a process and its children (e.g. a postmaster and its backends)."""
    if pid is None:
        return 0.0
    total = 0.0
    for p in pin_pid_tree(pid, ORCH_CPU):  # (re)pins new backends too: they are ours, on CPU 0
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += cpu_seconds(p)
    return total


def clean_env() -> dict[str, str]:
    """Our environment without any ORCH_* (the caller's settings must not leak into a run)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}


# ---- the orchestrator under test ---------------------------------------------------------
@dataclass
class Orchestrator:
    """One `bap-engine serve` pinned to CPU 0 (taskset), embedded Postgres unless a URL is given."""

    name: str
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    argv: Sequence[str] = (BAP_ENGINE, "serve")
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    admin_key: str = ""
    users: dict[str, set[str]] = field(default_factory=dict)  # platform key -> users to destroy

    @property
    def data_dir(self) -> Path:
        return self.workdir / self.name

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float = 120) -> None:
        self.port = free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = clean_env()
        env.update({
            "ORCH_DATA_DIR": str(self.data_dir), "ORCH_HOST": HOST, "ORCH_PORT": str(self.port),
            "ORCH_HEALTH_CHECK_INTERVAL_S": "3600", "ORCH_RECONCILE_INTERVAL_S": "3600",
            "ORCH_LOG_LEVEL": "WARNING",
        })
        env.update(self.env)
        logf = open(self.workdir / f"{self.name}.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(["taskset", "-c", str(ORCH_CPU), *self.argv], env=env, stdout=logf,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir,
                                     start_new_session=True)
        logf.close()
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2) as c:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"orchestrator {self.name} exited ({self.proc.returncode}); "
                                       f"see {self.workdir / (self.name + '.log')}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await c.get(self.base + "/health")).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"orchestrator {self.name} not healthy after {timeout:.0f}s")
                await asyncio.sleep(0.1)
        key = self.env.get("ORCH_ADMIN_KEY")
        self.admin_key = key or (self.data_dir / "admin.key").read_text().strip()
        pin_pid_tree(self.pid, ORCH_CPU)
        where = f"serve pid {self.pid} on :{self.port}, CPU {affinity_of(self.pid)}"
        postmaster = self.postmaster()
        if postmaster is not None:  # pg_ctl daemonizes it: not a descendant of serve, so pinned here
            pinned = pin_pid_tree(postmaster, ORCH_CPU)
            where += f"; embedded Postgres pid {postmaster} ({len(pinned)} processes), CPU {affinity_of(postmaster)}"
        log(f"{self.name}: {where}")

    def postmaster(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data_dir / "pg" / "postmaster.pid").read_text().split()[0])
        return None

    async def register(self, c: httpx.AsyncClient, slug: str, policy: dict[str, object] | None = None) -> str:
        body: dict[str, object] = {"slug": slug, "display_name": slug}
        if policy is not None:
            body["policy"] = policy
        r = await c.post(self.base + "/products/register", json=body, headers={"X-Admin-Key": self.admin_key})
        r.raise_for_status()
        key = str(r.json()["platform_api_key"])
        self.users.setdefault(key, set())
        return key

    def track(self, key: str, user: str) -> None:
        self.users.setdefault(key, set()).add(user)

    async def destroy_all(self, c: httpx.AsyncClient, key: str | None = None, concurrency: int = 8) -> tuple[int, int]:
        """DELETE the engines we created through the API (of one product key, or all).
        Returns (destroyed, failed)."""
        gate = asyncio.Semaphore(concurrency)
        ok = bad = 0

        failures: list[str] = []

        async def one(key: str, user: str) -> None:
            nonlocal ok, bad
            async with gate:
                try:
                    r = await c.delete(f"{self.base}/engines/{user}", headers={"X-Platform-Key": key}, timeout=90)
                    if r.status_code in (200, 404):
                        ok += 1
                        return
                    failures.append(f"{user}: HTTP {r.status_code} {r.text[:120]}")
                except httpx.HTTPError as err:
                    failures.append(f"{user}: {type(err).__name__}")
                bad += 1

        keys = [key] if key is not None else list(self.users)
        pairs = [(k, u) for k in keys for u in self.users.get(k, ())]
        await asyncio.gather(*(one(k, u) for k, u in pairs))
        for k in keys:
            self.users.get(k, set()).clear()
        if failures:
            log(f"{self.name}: {bad} DELETE /engines/{{u}} failed, e.g. {failures[0]}")
        return ok, bad

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        serve_log = self.workdir / f"{self.name}.log"
        if serve_log.exists():  # kept for a look at errors: bench/results/<name>-serve.log
            with contextlib.suppress(OSError):
                RESULTS.mkdir(parents=True, exist_ok=True)
                (RESULTS / f"{self.name}-serve.log").write_bytes(serve_log.read_bytes()[-1_000_000:])
        if self.data_dir.exists():
            n = reap_engine_records(self.data_dir)
            if n:
                log(f"{self.name}: ended {n} leftover engine process(es) by recorded pid")
            stop_postmaster(self.data_dir / "pg")


# ---- the bare reference engine ---------------------------------------------------------
@dataclass
class BareEngine:
    proc: subprocess.Popen[bytes]
    url: str
    started: float


def spawn_bare(workdir: Path, name: str, port: int, cpu: int = ORCH_CPU) -> BareEngine:
    """Start `python -m bap_engine.refengine` with the env the subprocess backend gives an engine,
    its own session, its own data dir, pinned to `cpu` (Popen runs on that CPU, as the
    orchestrator's spawn does, and the child inherits the affinity)."""
    directory = workdir / name
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    env = {k: os.environ[k] for k in ENGINE_BASE_ENV if k in os.environ}
    env.update(ENGINE_KEY_HASH=hashlib.sha256(secrets.token_bytes(32)).hexdigest(), ENGINE_VERSION="bench",
               PORT=str(port), HOST=HOST, SQLITE_DB_PATH=str(directory / "brain.sqlite"),
               BAP_ENGINE_ID=name, BAP_DEPLOYMENT="bench-bare")
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})  # this thread only (Linux): the child inherits it
    try:
        logfd = os.open(directory / "engine.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        started = time.perf_counter()
        try:
            proc = subprocess.Popen([PYTHON, "-m", "bap_engine.refengine"], stdin=subprocess.DEVNULL, stdout=logfd,
                                    stderr=subprocess.STDOUT, env=env, cwd=directory, start_new_session=True)
        finally:
            os.close(logfd)
    finally:
        os.sched_setaffinity(0, before)
    return BareEngine(proc, f"http://{HOST}:{port}", started)


def end_bare(engines: Iterable[BareEngine]) -> None:
    for e in engines:
        if e.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(e.proc.pid, signal.SIGTERM)
    for e in engines:
        try:
            e.proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(e.proc.pid, signal.SIGKILL)
            e.proc.wait(5)


# Engine ports of this run (orchestrator ranges and bare engines), all in 30000-32767: below the
# kernel's ephemeral range (ip_local_port_range, 32768-60999 by default), so no outgoing
# connection of any process on the machine can hold one, and above the test suite's 20000-29999.
#   core 30000-30999, wake 31000-31099, docker 31100-31399 (+ bare 31800-31899),
#   kubernetes 31400-31699 (+ bare pods 31900-31999), sweep serve 31700-31799 (unused),
#   bare refengines of core 32000-32767; second_wave serve 31700-31779 (the sweep's serve boots no
#   engine there) + bare 31780-31799
def ephemeral_overlap(low: int = 30000, high: int = 32767) -> str | None:
    """A warning when the machine's ephemeral port range overlaps ours, else None."""
    try:
        lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return None
    if lo <= high and hi >= low:
        return f"ephemeral ports {lo}-{hi} overlap the engine ports {low}-{high}: expect spurious PortInUse"
    return None


class PortPicker:
    """Ports for bare engines from a range no orchestrator of this run allocates from."""

    def __init__(self, low: int, high: int) -> None:
        self._next, self._high = low, high

    def take(self) -> int:
        while self._next <= self._high:
            p = self._next
            self._next += 1
            if port_free(p):
                return p
        raise RuntimeError("bench: no free port left for bare engines")


async def wait_healthy(url: str, timeout: float) -> bool:
    """The orchestrator's own boot poll (same probe, same cadence), for bare engines."""
    from bap_engine.lifecycle.probe import wait_healthy as orchestrator_wait_healthy

    return await orchestrator_wait_healthy(url, timeout, 10.0)


# ---- statistics and tables ------------------------------------------------------------------
def pct(values: Sequence[float], q: float) -> float:
    """Percentile with linear interpolation (q in 0..100)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ms(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "n/a"
    return f"{seconds * 1000:,.1f} ms" if seconds < 10 else f"{seconds:,.2f} s"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "MISS")


@dataclass
class Table:
    title: str
    notes: list[str] = field(default_factory=list)
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)

    def add(self, metric: str, measured: str, target: str = "", ok: bool | None = None) -> None:
        self.rows.append((metric, measured, target, verdict(ok)))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def render(self) -> str:
        head = ("metric", "measured", "target / reference", "result")
        widths = [max(len(r[i]) for r in [head, *self.rows]) for i in range(4)]
        line = "  ".join("-" * w for w in widths)
        out = [f"== {self.title} ==", "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)), line]
        out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in self.rows]
        out += [f"  * {n}" for n in self.notes]
        return "\n".join(out) + "\n"

    def print(self) -> None:
        print(self.render(), flush=True)


def skipped(title: str, name: str, reason: str) -> None:
    print(f"== {title} ==\n{name}: skipped ({reason})\n", flush=True)


def install_sigterm() -> None:
    """`timeout` sends SIGTERM: turn it into an exception so every finally (cleanup) runs."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def run(main: Coroutine[object, object, None]) -> None:
    """Run a driver's async main on uvloop (what the orchestrator uses). On SIGTERM/SIGINT the
    main task is cancelled, so its finally blocks (destroy, stop) run before we exit 130."""
    install_sigterm()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(main)
    except KeyboardInterrupt as err:
        log(f"interrupted ({err}); cleaned up")
        sys.exit(130)


def main_entry(main: Callable[[Path], Coroutine[object, object, int]]) -> None:
    """`python bench/<section>.py WORKDIR`: run the section's `main(workdir)` and exit with its code."""
    workdir = Path(sys.argv[1])
    workdir.mkdir(parents=True, exist_ok=True)
    code = [0]

    async def _main() -> None:
        code[0] = await main(workdir)

    run(_main())
    sys.exit(code[0])
