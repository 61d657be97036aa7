"""Health sweep over 2,000 engines and the orchestrator's RSS with 2,000 registered (issue 3 item 6).

Run pinned to CPU 0 (it plays the orchestrator): it starts its own Postgres (pgserver,
CPU 0), a fixture process answering GET /health on 2,000 ports (CPU 1), inserts 2,000
`running` engine rows pointing at them, and times `HealthWorker.run_once()` in-process
(wall time and process CPU time per sweep). The worker's Lifecycle gets a fixture backend
whose `list_managed` reports those engines as running (bench/fixtures/fixture_backend.py);
everything else - registry, probe, batched writes, audit sampling - is the real code.

Then two orchestrator processes on that database, one after the other, pinned to CPU 0:
  * `bap-engine serve` itself, with ORCH_WORKERS_ENABLED=false (its subprocess backend would
    see no process behind the fixture rows and the workers would try to restart them), after
    paging GET /engines over all 2,000 and GET /status;
  * the same serve with the fixture backend swapped in (bench/fixtures/serve_fixture.py) and
    its workers on, sweeping every 2 s: RSS after several sweeps, and CPU per sweep.

    python bench/sweep.py WORKDIR
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
import uuid
import warnings
from datetime import UTC, datetime
from pathlib import Path

import httpx
from cryptography.fernet import Fernet

from common import (
    BAP_ENGINE,
    HOST,
    LOAD_CPU,
    ORCH_CPU,
    PYTHON,
    ROOT,
    Orchestrator,
    Table,
    affinity_of,
    cpu_seconds,
    log,
    main_entry,
    median,
    ms,
    pin_pid_tree,
    pin_self,
    rss_mb,
)

ENGINES = 2000
SWEEPS = 5
SERVE_SWEEP_INTERVAL_S = 2.0
SERVE_WINDOW_S = 8.0
BENCH = ROOT / "bench"


def _start_pg(pgdata: Path) -> tuple[object, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        server = pgserver.get_server(pgdata, cleanup_mode="stop")
    return server, str(server.get_uri())


def _postmaster(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().split()[0])


def _pg_cpu(pgdata: Path) -> float:
    total = 0.0
    for pid in pin_pid_tree(_postmaster(pgdata), ORCH_CPU):
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


async def _wait_file(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"fixture exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"fixture did not write {path} within {timeout:.0f}s")
        await asyncio.sleep(0.1)


async def _seed(dsn: str, master: str, admin: str, ports: list[int]) -> tuple[str, dict[str, int]]:
    """One product and len(ports) running engines, inserted straight into the tables."""
    from bap_engine.db.pool import create_pool
    from bap_engine.fleet import Fleet
    from bap_engine.keys import KeySealer

    pool = await create_pool(dsn, max_size=4)
    try:
        product, platform_key = await Fleet(pool, admin).register_product("sweep", "sweep fixture", {})
        sealer = KeySealer(master)
        now = datetime.now(UTC)
        engines = {str(uuid.uuid4()): port for port in ports}
        rows = []
        for i, (engine_id, port) in enumerate(engines.items()):
            key = "sk-sept-" + secrets.token_urlsafe(32)
            rows.append((engine_id, product.id, f"fx-{i}", "running", port, f"http://{HOST}:{port}", "fixture",
                         "fixture", hashlib.sha256(key.encode()).hexdigest(), sealer.seal(key), now, now, now, now))
        async with pool.acquire() as conn:
            await conn.executemany(
                "INSERT INTO engines (id, product_id, user_id, status, port, url, ref, engine_version, api_key_hash, "
                "engine_key_enc, created_at, updated_at, last_active_at, last_health_at) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)", rows)
    finally:
        await pool.close()
    return platform_key, engines


async def _sweeps(dsn: str, master: str, admin: str, engines: dict[str, int], pgdata: Path, t: Table) -> None:
    """HealthWorker.run_once() in this process, SWEEPS times."""
    sys.path.insert(0, str(BENCH / "fixtures"))
    from fixture_backend import FixtureBackend

    from bap_engine.app import engine_env
    from bap_engine.config import load_settings
    from bap_engine.db.pool import create_pool
    from bap_engine.keys import KeySealer
    from bap_engine.lifecycle import Lifecycle
    from bap_engine.lifecycle.owner import OwnerLock
    from bap_engine.workers.health import HealthWorker

    settings = load_settings(database_url=dsn, master_key=master, admin_key=admin)
    pool = await create_pool(dsn)
    owner = OwnerLock(dsn)
    worker: HealthWorker | None = None
    try:
        lc = Lifecycle(pool, FixtureBackend(engines), settings, KeySealer(master), await owner.acquire(),
                       engine_env(settings))
        worker = HealthWorker(lc, settings)
        walls: list[float] = []
        cpus: list[float] = []
        pg: list[float] = []
        unhealthy: list[int] = []
        for i in range(SWEEPS):
            started_at = datetime.now(UTC)
            pg0, c0, w0 = _pg_cpu(pgdata), time.process_time(), time.perf_counter()
            await worker.run_once()
            w1, c1, pg1 = time.perf_counter(), time.process_time(), _pg_cpu(pgdata)
            walls.append(w1 - w0)
            cpus.append(c1 - c0)
            pg.append(pg1 - pg0)
            async with pool.acquire() as conn:
                fresh = await conn.fetchval(
                    "SELECT count(*) FROM engines WHERE health_failures = 0 AND last_health_at >= $1", started_at)
            unhealthy.append(len(engines) - int(fresh))
            log(f"sweep {i + 1}: {walls[-1] * 1000:.0f} ms wall, {cpus[-1] * 1000:.0f} ms CPU, "
                f"{unhealthy[-1]} engines not recorded healthy")
        rss, hwm = rss_mb(os.getpid())
    finally:
        if worker is not None:
            await worker.wait_restarts()  # none when every probe passed; never close the pool under them
        await owner.release()
        await pool.close()
    steady_w, steady_c = median(walls[1:]), median(cpus[1:])
    first_cores = cpus[0] / walls[0]
    t.add("sweep 1 (writes 2,000 sampled health_check rows): wall", ms(walls[0]), "<= 2 s", walls[0] <= 2)
    t.add("sweep 1: orchestrator CPU (cores used)", f"{ms(cpus[0])} ({first_cores:.2f} cores)", "<= 1 core",
          first_cores <= 1)
    t.add(f"sweeps 2-{SWEEPS} (steady state): wall, median", ms(steady_w), "<= 2 s", steady_w <= 2)
    t.add(f"sweeps 2-{SWEEPS}: orchestrator CPU, median (cores)", f"{ms(steady_c)} ({steady_c / steady_w:.2f} cores)",
          "<= 1 core", steady_c / steady_w <= 1)
    t.add("Postgres CPU per sweep, median", ms(median(pg)))
    t.add("engines not recorded healthy after a sweep (max)", str(max(unhealthy)), "0", max(unhealthy) == 0)
    t.add("RSS of this in-process driver after the sweeps", f"{rss:.0f} MB (peak {hwm:.0f} MB)")



async def _serve_rss(workdir: Path, dsn: str, master: str, admin: str, platform_key: str,
                     engines_file: Path, pgdata: Path, t: Table) -> None:
    env = {"ORCH_DATABASE_URL": dsn, "ORCH_MASTER_KEY": master, "ORCH_ADMIN_KEY": admin,
           "ORCH_PORT_MIN": "31700", "ORCH_PORT_MAX": "31799"}
    async with httpx.AsyncClient(timeout=60) as c:
        plain = Orchestrator("sweep-plain", workdir, env={**env, "ORCH_WORKERS_ENABLED": "false"},
                             argv=(BAP_ENGINE, "serve"))
        try:
            await plain.start()
            seen = 0
            for offset in range(0, ENGINES, 1000):
                r = await c.get(f"{plain.base}/engines", params={"limit": 1000, "offset": offset},
                                headers={"X-Platform-Key": platform_key})
                r.raise_for_status()
                seen += len(r.json()["engines"])
            total = (await c.get(f"{plain.base}/status", headers={"X-Platform-Key": platform_key})).json()["total"]
            rss, hwm = rss_mb(plain.pid)
            t.add("RSS: bap-engine serve, 2,000 engines registered (workers off)", f"{rss:.0f} MB (peak {hwm:.0f} MB)",
                  "<= 200 MB", hwm <= 200)
            t.note(f"serve (workers off) listed {seen} engines through GET /engines, GET /status total {total}")
        finally:
            plain.stop()

        fixture = Orchestrator(
            "sweep-workers", workdir, argv=(PYTHON, str(BENCH / "fixtures" / "serve_fixture.py")),
            env={**env, "ORCH_HEALTH_CHECK_INTERVAL_S": str(SERVE_SWEEP_INTERVAL_S),
                 "BENCH_FIXTURE_ENGINES": str(engines_file)})
        try:
            await fixture.start()
            await asyncio.sleep(SERVE_SWEEP_INTERVAL_S * 2)  # startup sweep (with its audit rows) done
            c0, p0, w0 = cpu_seconds(fixture.pid), _pg_cpu(pgdata), time.monotonic()
            since = datetime.now(UTC)
            await asyncio.sleep(SERVE_WINDOW_S)
            c1, p1, w1 = cpu_seconds(fixture.pid), _pg_cpu(pgdata), time.monotonic()
            sweeps = (w1 - w0) / SERVE_SWEEP_INTERVAL_S
            rss, hwm = rss_mb(fixture.pid)
            r = await c.get(f"{fixture.base}/engines", params={"limit": 1, "status": "running"},
                            headers={"X-Platform-Key": platform_key})
            running = r.json()["total"]
            t.add("RSS: serve + workers sweeping 2,000 engines every 2 s", f"{rss:.0f} MB (peak {hwm:.0f} MB)",
                  "<= 200 MB", hwm <= 200)
            t.add("serve + workers: orchestrator CPU per sweep (process CPU / sweeps)", ms((c1 - c0) / sweeps),
                  "<= 2 s of one core", (c1 - c0) / sweeps <= 2)
            t.add("serve + workers: Postgres CPU per sweep", ms((p1 - p0) / sweeps))
            t.note(f"serve + workers: {running} engines still running after {sweeps:.0f} sweeps in "
                   f"{w1 - w0:.0f}s (since {since:%H:%M:%S}); engines = bench/fixtures/health_fleet.py ports")
        finally:
            fixture.stop()


async def main(workdir: Path) -> int:
    pin_self(ORCH_CPU)
    t = Table(f"Self-healing: health sweep over {ENGINES:,} engines (sweeper + Postgres on CPU 0, "
              f"fixture engines on CPU 1)")
    t.note("sweep: HealthWorker.run_once() timed in-process (time.perf_counter / time.process_time) with the "
           "real registry, probe and batched writes; backend = bench/fixtures/fixture_backend.py (list_managed "
           "reports the 2,000 fixture engines running); engines = one asyncio process answering /health on "
           "2,000 ports; rows inserted straight into the engines table")
    pgdata = workdir / "sweep-pg"
    master = Fernet.generate_key().decode()
    admin = "adm-" + secrets.token_urlsafe(24)
    server: object | None = None
    fixture: subprocess.Popen[bytes] | None = None
    rc = 0
    try:
        server, dsn = await asyncio.to_thread(_start_pg, pgdata)
        pinned = pin_pid_tree(_postmaster(pgdata), ORCH_CPU)
        log(f"sweep: Postgres pid {_postmaster(pgdata)} ({len(pinned)} processes) on CPU "
            f"{affinity_of(_postmaster(pgdata))}")
        from bap_engine.db import migrate

        await migrate.upgrade(dsn)
        ports_file = workdir / "fleet-ports.json"
        fixture = subprocess.Popen(
            ["taskset", "-c", str(LOAD_CPU), PYTHON, str(BENCH / "fixtures" / "health_fleet.py"),
             "--count", str(ENGINES), "--out", str(ports_file), "--max-seconds", "400"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(workdir / "fleet.log", "ab"))
        await _wait_file(ports_file, fixture, 60)
        ports = json.loads(ports_file.read_text())
        log(f"sweep: fixture pid {fixture.pid} answers /health on {len(ports)} ports")
        platform_key, engines = await _seed(dsn, master, admin, ports)
        engines_file = workdir / "fleet-engines.json"
        engines_file.write_text(json.dumps(engines))
        await _sweeps(dsn, master, admin, engines, pgdata, t)
        await _serve_rss(workdir, dsn, master, admin, platform_key, engines_file, pgdata, t)
    except Exception as err:
        t.note(f"ERROR: {type(err).__name__}: {err}")
        rc = 1
    finally:
        if fixture is not None and fixture.poll() is None:
            fixture.terminate()
            try:
                fixture.wait(10)
            except subprocess.TimeoutExpired:
                fixture.kill()
                fixture.wait()
        cleanup = getattr(server, "cleanup", None)
        if cleanup is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(cleanup)
        t.print()
    return rc


if __name__ == "__main__":
    main_entry(main)
