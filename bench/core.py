"""Core benchmark (issue 2 item 11): admit throughput, provision latency, bursts.

Run by bench/run.sh pinned to CPU 1 (the load side). It starts `bap-engine serve` with a
fresh ORCH_DATA_DIR (embedded Postgres as its child) pinned to CPU 0, measures, and
destroys everything it created. Bare reference engines are spawned pinned to CPU 0 too:
engines the orchestrator spawns inherit its CPU 0 pinning, so that is the fair floor.

    python bench/core.py WORKDIR RESULTS_DIR
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

from common import (
    LOAD_CPU,
    ROOT,
    BareEngine,
    Orchestrator,
    PortPicker,
    Table,
    cpu_seconds,
    end_bare,
    ephemeral_overlap,
    log,
    median,
    ms,
    pct,
    run,
    spawn_bare,
    tree_cpu_seconds,
    wait_healthy,
)

WRK_CONNECTIONS = 16
WRK_SECONDS = 10
WRK_WARMUP_SECONDS = 2
PROVISION_USERS = 20
BURSTS = (20, 100)
BOOT_TIMEOUT_S = 60
HIGH_RPM = 100_000_000

# JupyterHub 6 on the same machine, same pinning and wrk settings (issue 2).
PEER = {"rps": 280, "p99_ms": 130, "spawn_overhead_ms": 130, "burst20_s": 2.5}


def wrk_admit(base: str, key: str, user: str, seconds: int, raw_out: Path | None) -> dict[str, float]:
    """One wrk run (pinned to the load CPU) of admit for a running engine; the Lua done() line parsed."""
    env = {**os.environ, "BAP_BENCH_PLATFORM_KEY": key, "BAP_BENCH_USER": user}
    argv = ["taskset", "-c", str(LOAD_CPU), "wrk", "-t1", f"-c{WRK_CONNECTIONS}", f"-d{seconds}s", "--latency",
            "--timeout", "5s", "-s", str(ROOT / "bench" / "admit.lua"), base]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 30, check=False)
    if raw_out is not None:
        raw_out.write_text(out.stdout + out.stderr)
    for line in out.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            doc: dict[str, float] = json.loads(line[len("BENCH_JSON "):])
            return doc
    raise RuntimeError(f"wrk produced no result (rc {out.returncode}): {out.stderr.strip()[:300]}")


def pyspy_path() -> str | None:
    return os.environ.get("BENCH_PYSPY") or shutil.which("py-spy")


async def admit(c: httpx.AsyncClient, o: Orchestrator, key: str, user: str, *, provision: bool = False,
                wake: bool = False, timeout: float = 120) -> dict[str, object]:
    r = await c.post(f"{o.base}/engines/{user}/admit", json={"auto_provision": provision, "auto_wake": wake},
                     headers={"X-Platform-Key": key}, timeout=timeout)
    doc: dict[str, object] = r.json()
    if r.status_code != 200:
        raise RuntimeError(f"admit {user}: HTTP {r.status_code} {doc}")
    return doc


async def admit_section(c: httpx.AsyncClient, o: Orchestrator, results: Path, t: Table) -> None:
    rows: list[tuple[str, dict[str, float]]] = []
    for label, policy in (("no rate limit", None), (f"rate_limit_rpm {HIGH_RPM:,}", {"rate_limit_rpm": HIGH_RPM})):
        slug = "bench-open" if policy is None else "bench-limited"
        key = await o.register(c, slug, policy)
        doc = await admit(c, o, key, "wrk-user", provision=True)
        o.track(key, "wrk-user")
        if doc.get("admitted") is not True:
            raise RuntimeError(f"admit for the wrk user was not admitted: {doc}")
        log(f"admit ({label}): warm-up {WRK_WARMUP_SECONDS}s, then {WRK_SECONDS}s at {WRK_CONNECTIONS} connections")
        wrk_admit(o.base, key, "wrk-user", WRK_WARMUP_SECONDS, None)
        c0, p0 = cpu_seconds(o.pid), tree_cpu_seconds(o.postmaster())
        res = wrk_admit(o.base, key, "wrk-user", WRK_SECONDS, results / f"wrk-admit-{slug}.txt")
        res["serve_cpu_s"] = cpu_seconds(o.pid) - c0
        res["pg_cpu_s"] = tree_cpu_seconds(o.postmaster()) - p0
        rows.append((label, res))
        if os.environ.get("BENCH_PROFILE") == "1" and pyspy_path() and policy is None:
            await profile_admit(o, key, results)
    for label, res in rows:
        rps = res["requests"] / (res["duration_us"] / 1e6)
        errors = sum(int(res[k]) for k in res if k.startswith("errors_"))
        t.add(f"admit, {label}: requests/s", f"{rps:,.0f}", f">= 1,500 (JupyterHub ~{PEER['rps']})", rps >= 1500)
        t.add(f"admit, {label}: p50 / p99", f"{res['p50_us'] / 1000:.1f} / {res['p99_us'] / 1000:.1f} ms",
              f"p99 <= 25 ms (JupyterHub ~{PEER['p99_ms']})", res["p99_us"] <= 25_000)
        serve_ms = res["serve_cpu_s"] * 1000 / max(res["requests"], 1)
        pg_ms = res["pg_cpu_s"] * 1000 / max(res["requests"], 1)
        t.add(f"admit, {label}: CPU per admit, serve + Postgres", f"{serve_ms:.2f} + {pg_ms:.2f} ms",
              f"=> at most {1000 / (serve_ms + pg_ms):,.0f} req/s on one free core")
        if errors:
            t.note(f"admit, {label}: {errors} errors (non-2xx {int(res['errors_status'])}, "
                   f"timeouts {int(res['errors_timeout'])}) out of {int(res['requests'])} requests")
    t.note(f"admit: wrk -t1 -c{WRK_CONNECTIONS} -d{WRK_SECONDS}s --latency, bench/admit.lua, after a "
           f"{WRK_WARMUP_SECONDS}s warm-up; raw output in bench/results/wrk-admit-*.txt; CPU per admit = "
           "utime+stime of serve (and of the postmaster and its backends) during the run / requests: it does "
           "not depend on what else the machine runs, unlike requests/s")


async def profile_admit(o: Orchestrator, key: str, results: Path) -> None:
    """Optional (BENCH_PROFILE=1): py-spy the serve process during an extra, unmeasured wrk run."""
    from profile_summary import summarize

    spy = pyspy_path()
    assert spy is not None
    raw = results / "admit-profile.collapsed"
    log(f"profiling serve pid {o.pid} with py-spy during an extra {WRK_SECONDS}s wrk run (not measured)")
    argv = ["taskset", "-c", str(LOAD_CPU), spy, "record", "--pid", str(o.pid), "--rate", "250", "--duration",
            str(WRK_SECONDS), "--format", "raw", "--nonblocking", "--output", str(raw)]
    prof = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await asyncio.to_thread(wrk_admit, o.base, key, "wrk-user", WRK_SECONDS, None)
        await asyncio.to_thread(prof.wait, WRK_SECONDS + 30)
    finally:
        if prof.poll() is None:
            prof.kill()
            prof.wait()
    if raw.exists():
        (results / "admit-profile.txt").write_text(summarize(raw.read_text()))
        log(f"profile summary in {results / 'admit-profile.txt'}")


async def provision_section(c: httpx.AsyncClient, o: Orchestrator, workdir: Path, t: Table) -> None:
    """20 users one at a time through the API, interleaved with 20 bare starts (same noise for both)."""
    key = await o.register(c, "bench-provision")
    ports = PortPicker(32000, 32199)
    orch: list[float] = []
    bare: list[float] = []
    engines: list[BareEngine] = []
    cpu0 = cpu_seconds(o.pid)
    try:
        for i in range(PROVISION_USERS):
            user = f"prov-{i}"
            t0 = time.perf_counter()
            r = await c.post(f"{o.base}/engines/provision", json={"user_id": user},
                             headers={"X-Platform-Key": key}, timeout=BOOT_TIMEOUT_S + 10)
            dt = time.perf_counter() - t0
            o.track(key, user)
            if r.status_code != 200:
                raise RuntimeError(f"provision {user}: HTTP {r.status_code} {r.text[:200]}")
            orch.append(dt)
            e = spawn_bare(workdir / "bare-provision", f"bare-{i}", ports.take())
            engines.append(e)
            if not await wait_healthy(e.url, BOOT_TIMEOUT_S):
                raise RuntimeError(f"bare engine {i} not healthy within {BOOT_TIMEOUT_S}s")
            bare.append(time.perf_counter() - e.started)
        serve_cpu = (cpu_seconds(o.pid) - cpu0) / PROVISION_USERS
    finally:
        end_bare(engines)
        await o.destroy_all(c, key)
    over50 = median(orch) - median(bare)
    t.add("provision p50 / p90 (20 users, one at a time)", f"{ms(median(orch))} / {ms(pct(orch, 90))}")
    t.add("bare refengine start -> healthy p50 / p90", f"{ms(median(bare))} / {ms(pct(bare, 90))}", "the floor")
    t.add("orchestrator overhead (p50 - bare p50)", ms(over50),
          f"<= 30 ms (JupyterHub ~{PEER['spawn_overhead_ms']} ms)", over50 <= 0.030)
    t.add("orchestrator overhead at p90", ms(pct(orch, 90) - pct(bare, 90)))
    t.add("serve CPU per provision", ms(serve_cpu))
    t.note("provision: POST /engines/provision timed by the client; each one followed by one bare start "
           "(interleaved, so machine noise hits both alike)")


async def burst_section(c: httpx.AsyncClient, o: Orchestrator, workdir: Path, t: Table) -> None:
    key = await o.register(c, "bench-burst")
    ports = PortPicker(32200, 32767)
    limits = httpx.Limits(max_connections=max(BURSTS) + 10, max_keepalive_connections=max(BURSTS) + 10)
    async with httpx.AsyncClient(limits=limits, timeout=BOOT_TIMEOUT_S + 30) as burst_client:
        for n in BURSTS:
            users = [f"burst{n}-{i}" for i in range(n)]
            for u in users:
                o.track(key, u)
            log(f"burst of {n}: admit with auto_provision, all at once")
            cpu0 = cpu_seconds(o.pid)
            t0 = time.perf_counter()
            docs = await asyncio.gather(*(admit(burst_client, o, key, u, provision=True) for u in users),
                                        return_exceptions=True)
            orch_s = time.perf_counter() - t0
            serve_cpu = cpu_seconds(o.pid) - cpu0
            failed = [d for d in docs if not (isinstance(d, dict) and d.get("admitted") is True)]
            destroyed, bad = await o.destroy_all(c, key)
            log(f"burst of {n}: {orch_s:.2f}s, {len(failed)} not admitted; destroyed {destroyed} engines")
            log(f"burst of {n}: bare engines, all at once")
            engines: list[BareEngine] = []
            try:
                t0 = time.perf_counter()
                for i in range(n):
                    engines.append(spawn_bare(workdir / f"bare-burst{n}", f"bare-{i}", ports.take()))
                ok = await asyncio.gather(*(wait_healthy(e.url, BOOT_TIMEOUT_S) for e in engines))
                bare_s = time.perf_counter() - t0
            finally:
                end_bare(engines)
            ratio = orch_s / bare_s
            peer = f", JupyterHub ~{PEER['burst20_s']} s" if n == 20 else ""
            t.add(f"burst of {n} new users (admit auto_provision)", ms(orch_s),
                  f"<= 1.2x bare{peer}", None if failed else ratio <= 1.2)
            t.add(f"bare start of {n} refengines at once -> all healthy", ms(bare_s), "the floor")
            t.add(f"burst of {n}: ratio to bare", f"{ratio:.2f}x", "<= 1.20x", None if failed else ratio <= 1.2)
            t.add(f"burst of {n}: serve CPU during it (on CPU 0, shared with the booting engines)", ms(serve_cpu))
            if failed:
                t.note(f"burst of {n}: {len(failed)} admits failed, e.g. {str(failed[0])[:160]}")
            if not all(ok):
                t.note(f"burst of {n}: {ok.count(False)} bare engines never became healthy")
    t.note("bursts: concurrent httpx requests from the driver (CPU 1); bare engines spawned pinned to CPU 0, "
           "like the engines the orchestrator spawns (they inherit its pinning), health polled with the "
           "orchestrator's own probe and cadence")


async def main(workdir: Path, results: Path) -> int:
    t = Table("Core: subprocess backend + reference engine (orchestrator and Postgres on CPU 0, load on CPU 1)")
    o = Orchestrator("core", workdir, env={"ORCH_PORT_MIN": "30000", "ORCH_PORT_MAX": "30999",
                                           "ORCH_BOOT_TIMEOUT_S": str(BOOT_TIMEOUT_S)})
    rc = 0
    warn = ephemeral_overlap()
    if warn:
        t.note(warn)
    async with httpx.AsyncClient(timeout=30) as c:
        try:
            await o.start()
            await admit_section(c, o, results, t)
            await provision_section(c, o, workdir, t)
            await burst_section(c, o, workdir, t)
        except Exception as err:  # print what we have, say what broke
            t.note(f"ERROR: {type(err).__name__}: {err}")
            rc = 1
        finally:
            with_engines = sum(len(u) for u in o.users.values())
            if o.proc is not None and o.proc.poll() is None and with_engines:
                destroyed, bad = await o.destroy_all(c)
                log(f"destroyed {destroyed} engines ({bad} failed)")
            o.stop()
            t.print()
    return rc


if __name__ == "__main__":
    wd, res = Path(sys.argv[1]), Path(sys.argv[2])
    wd.mkdir(parents=True, exist_ok=True)
    res.mkdir(parents=True, exist_ok=True)
    code = [0]

    async def _main() -> None:
        code[0] = await main(wd, res)

    run(_main())
    sys.exit(code[0])
