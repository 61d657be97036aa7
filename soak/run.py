"""The soak's timeline: Postgres, two replicas, three products; then clients churning for
SOAK_SECONDS while a checker runs every few seconds, engines are SIGKILLed at random and
Postgres is restarted once in the middle; then a quiet period for the workers to converge, a
final strict check, the printed summary, and the teardown of everything it started (engines
through the API then by pid, replicas, Postgres, the temporary directory). Exit 0 when no
invariant was violated, 1 otherwise, 130 when interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx

from soak import procs, report
from soak.checks import Snapshot, Tracker, findings, take_snapshot
from soak.churn import Churn
from soak.cluster import Cluster, free_port
from soak.config import MAX_WALL_S, SoakConfig
from soak.ledger import Ledger
from soak.pg import Postgres
from soak.report import log

__all__ = ["main"]

_TEARDOWN_S = 75.0  # reserved out of MAX_WALL_S for the teardown


@dataclass
class Run:
    cfg: SoakConfig
    cluster: Cluster
    pg: Postgres
    churn: Churn
    tracker: Tracker
    ledger: Ledger
    client: httpx.AsyncClient
    started: float = field(default_factory=time.monotonic)  # monotonic, churn start
    t0: float = field(default_factory=time.time)  # wall clock, churn start
    churn_s: float = 0.0
    checks: int = 0
    db_down_checks: int = 0
    last: Snapshot | None = None
    kills: list[str] = field(default_factory=list)
    killed_at: dict[str, float] = field(default_factory=dict)
    leader_log: list[str] = field(default_factory=list)
    quota_peak: dict[str, int] = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def fleet(self) -> str:
        if self.last is None:
            return "?"
        states = Counter(str(r["status"]) for r in self.last.all_rows.values())
        return f"{len(self.last.all_rows)} ({', '.join(f'{k} {v}' for k, v in sorted(states.items()))})"

    def violations(self) -> int:
        return len(self.tracker.violations) + sum(self.ledger.counts.values())


async def check(run: Run, final: bool = False) -> bool:
    """One pass of every check; False when the database did not answer."""
    answers = run.churn.answers
    run.ledger.take(answers)
    snap = await take_snapshot(run.client, run.cluster)
    run.checks += 1
    if snap is None:
        run.db_down_checks += 1
        run.tracker.reset()  # mismatches frozen by the outage start counting again once it is over
        return False
    run.last = snap
    for product in run.cluster.products:
        n = sum(r["product_id"] == product.product_id for r in snap.all_rows.values())
        run.quota_peak[product.slug] = max(run.quota_peak.get(product.slug, 0), n)
    found = findings(snap, run.cluster)
    found += [(f"replica:{r.name}", f"replica {r.name} (pid {r.proc.pid if r.proc else '?'}) exited: "
               + " | ".join(r.log_lines(limit=5)), True) for r in run.cluster.replicas if not r.alive()]
    _note_leaders(run, snap)
    for key in run.tracker.update(found, snap.at, final):
        log(f"VIOLATION {key}: {run.tracker.violations[key]}")
    try:
        conn = await asyncpg.connect(run.cluster.dsn, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    try:
        await run.ledger.check_audit(conn, time.time(), final)
    finally:
        await conn.close()
    run.ledger.check_rate(answers, since=0.0 if final else time.time() - 130)
    return True


def _note_leaders(run: Run, snap: Snapshot) -> None:
    text = f"leaders {snap.leaders}, owner locks {snap.owner_locks}"
    if not run.leader_log or run.leader_log[-1].split("] ", 1)[1] != text:
        run.leader_log.append(f"[t+{run.elapsed():.0f}s] {text}")


async def checker(run: Run, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await check(run)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), run.cfg.check_every_s)


async def killer(run: Run, until: float) -> None:
    """SIGKILL a random engine process of ours now and then (not during the outage, not the same
    engine twice within 30 s)."""
    rng = random.Random(run.cfg.seed + 7)
    mean = run.cfg.kill_every_s
    while True:
        await asyncio.sleep(min(max(rng.expovariate(1 / mean), 2.0), 3 * mean))
        if time.monotonic() >= until:
            return
        outage = run.ledger.outage
        if outage is not None and (outage[1] is None or time.time() - outage[1] < 10):
            continue
        now = time.monotonic()
        found = procs.scan_engines(run.cluster.deployment)
        pool = [p for p in found if now - run.killed_at.get(p.engine_id, -1e9) > 30]
        if not pool:
            continue
        victim = rng.choice(pool)
        if procs.kill9(victim):
            run.killed_at[victim.engine_id] = now
            run.kills.append(f"t+{run.elapsed():.0f}s pid {victim.pid} engine {victim.engine_id} "
                             f"(state {victim.state})")


async def restart_postgres(run: Run, at: float) -> None:
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    log(f"Postgres: fast stop (down for {run.cfg.pg_down_s:.0f}s)")
    down = time.time()
    run.ledger.outage = (down, None)
    await asyncio.to_thread(run.pg.stop, "fast")
    await asyncio.sleep(run.cfg.pg_down_s)
    await asyncio.to_thread(run.pg.start)
    run.ledger.outage = (down, time.time())
    log(f"Postgres: started again (pid {run.pg.pid()}) after {time.time() - down:.1f}s")


async def progress(run: Run, stop: asyncio.Event) -> None:
    since, last = 0, time.monotonic()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), run.cfg.report_every_s)
        now = time.monotonic()
        if now - last < 1:
            break
        report.progress(run.churn.answers, since, run.elapsed(), now - last, run.fleet(), run.violations())
        since, last = len(run.churn.answers), now


async def churn_phase(run: Run) -> float:
    """Clients, checker, killer, the Postgres restart and progress lines; returns the churn seconds."""
    cfg = run.cfg
    stop = asyncio.Event()
    began = time.monotonic()
    run.started, run.t0 = began, time.time()
    until = began + cfg.churn_s
    side = [asyncio.create_task(checker(run, stop)), asyncio.create_task(progress(run, stop)),
            asyncio.create_task(killer(run, until)),
            asyncio.create_task(restart_postgres(run, began + cfg.churn_s / 2))]
    try:
        await run.churn.run(cfg.clients, cfg.churn_s)
        await side[3]
    finally:
        stop.set()
        side[2].cancel()
        await asyncio.gather(*side, return_exceptions=True)
    return time.monotonic() - began


async def quiet_phase(run: Run) -> float:
    """No clients, no chaos: check every 2 s until nothing is found (or SOAK_QUIET_S), then once strictly."""
    began = time.monotonic()
    while time.monotonic() - began < run.cfg.quiet_s:
        await asyncio.sleep(2)
        if await check(run) and run.last is not None and not findings(run.last, run.cluster) \
                and not run.ledger.pending:
            break
    await check(run, final=True)
    return time.monotonic() - began


def _found(run: Run) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for key, evidence in run.tracker.violations.items():
        found.setdefault(report.category(key), []).append(f"[t+{run.tracker.first_noted[key] - run.t0:.0f}s] "
                                                          f"{evidence}")
    for kind, kept in run.ledger.violations.items():
        extra = run.ledger.counts[kind] - len(kept)
        lines = [f"{kind}: {e}" for e in kept] + ([f"{kind}: ... {extra} more"] if extra > 0 else [])
        found.setdefault(report.category(kind), []).extend(lines)
    return found


def _chaos(run: Run) -> list[str]:
    answers = run.churn.answers
    lines = [f"engine SIGKILLs: {len(run.kills)}" + "".join(f"\n   {k}" for k in run.kills[:40])]
    down, up = run.ledger.outage or (0.0, None)
    if up is not None:
        in_outage = sum(a.status == 503 and a.code == "SERVICE_UNAVAILABLE" for a in answers)
        busy = [sum(a.code == "ENGINE_BUSY" and (a.t0 < down) == before for a in answers) for before in (True, False)]
        secs = [down - run.t0, run.t0 + run.churn_s - up]
        lines.append(f"Postgres restart: stopped at t+{down - run.t0:.0f}s, accepting again at t+{up - run.t0:.0f}s "
                     f"({up - down:.1f}s); 503 SERVICE_UNAVAILABLE answers: {in_outage}")
        lines.append(f"409 ENGINE_BUSY: {busy[0]} before the restart ({busy[0] / max(secs[0], 1):.2f}/s), "
                     f"{busy[1]} after ({busy[1] / max(secs[1], 1):.2f}/s)")
    lines.append("leadership seen by the checks:" + "".join(f"\n   {e}" for e in run.leader_log[-12:]))
    return lines


async def audit_counts(run: Run, conn: asyncpg.Connection) -> list[str]:
    """Audit rows of our products by action, before and after the Postgres restart (workers at work)."""
    outage = run.ledger.outage
    split = outage[1] if outage is not None and outage[1] is not None else time.time()
    rows = await conn.fetch(
        "SELECT action, count(*) FILTER (WHERE timestamp < to_timestamp($2)) AS before, "
        "count(*) FILTER (WHERE timestamp >= to_timestamp($2)) AS after FROM audit_log "
        "WHERE product_id = ANY($1::uuid[]) AND timestamp >= to_timestamp($3) GROUP BY action ORDER BY action",
        [p.product_id for p in run.cluster.products], split, run.t0)
    cells = [f"{r['action']} {r['before']}/{r['after']}" for r in rows]
    return ["audit rows during the run, before/after the Postgres restart:"] + [
        "   " + ", ".join(cells[i:i + 6]) for i in range(0, len(cells), 6)]


def summary(run: Run, quiet_s: float, peaks: dict[str, int], actions: list[str]) -> int:
    cfg, answers = run.cfg, run.churn.answers
    found = _found(run)
    print(f"\n== bap-engine soak: seed {cfg.seed}, {run.churn_s:.0f}s churn + {quiet_s:.0f}s quiet, {cfg.clients} "
          f"clients, 2 replicas, {len(run.cluster.products)} products ==")
    print(report.ops_table(answers, run.churn_s))
    print("\n" + report.codes_table(answers))
    logs = {r.name: r.log for r in run.cluster.replicas}
    print("\n" + "\n".join(_chaos(run) + actions + report.server_logs(logs)))
    rate = ", ".join(f"{p.slug} {run.ledger.rate_max.get(p.slug, 0)}/{p.rpm}" for p in run.cluster.products if p.rpm)
    quota = ", ".join(f"{p.slug} snapshots {run.quota_peak.get(p.slug, 0)}, audit replay {peaks.get(p.slug, 0)} "
                      f"/ {p.max_engines}" for p in run.cluster.products if p.max_engines is not None)
    notes = {
        "registry = backend (rows vs processes, no orphans)": f"{run.db_down_checks} of the checks saw the DB down",
        "quota never exceeded (snapshots + audit replay)": f"peak {quota}",
        "shared rate limit (rolling 60 s, both replicas)": f"max 200-admits in 60 s: {rate}",
        "audit: a row per 2xx answer, coherent per engine": f"{run.ledger.matched} answers matched to their row",
    }
    print("\n" + report.checks_table(run.checks, found, notes))
    bad = sum(len(v) for v in found.values())
    print(f"\nRESULT: {'FAIL' if bad else 'PASS'} ({bad} violation(s); {len(answers)} answers, "
          f"{len(answers) / max(run.churn_s, 1e-9):.1f} ops/s)", flush=True)
    return 1 if bad else 0


async def _soak(cfg: SoakConfig, workdir: Path, pg: Postgres, cluster: Cluster) -> int:
    log(f"workdir {workdir}; seed {cfg.seed}; churn {cfg.churn_s:.0f}s" + (" (SOAK_SECONDS clamped to fit "
        f"the {MAX_WALL_S:.0f}s wall bound)" if cfg.clamped else ""))
    await asyncio.to_thread(pg.init)
    await asyncio.to_thread(pg.start)
    log(f"Postgres {pg.bin_dir.parent.name} from {pg.bin_dir} on 127.0.0.1:{pg.port} (pid {pg.pid()}, "
        f"user {pg.user or 'self'})")
    await cluster.start()
    log("replicas " + ", ".join(f"{r.name} pid {r.proc.pid if r.proc else '?'} {r.url}" for r in cluster.replicas)
        + f"; deployment {cluster.deployment}; engine ports {cfg.port_min}-{cfg.port_max}")
    async with httpx.AsyncClient(timeout=10) as c:
        await cluster.register_products(c)
        run = Run(cfg, cluster, pg, Churn(cluster.replicas, cluster.products, cfg.seed), Tracker(cfg.persist_s),
                  Ledger(cluster, cfg.persist_s), c)
        log("products " + ", ".join(f"{p.slug} {p.policy} ({len(p.users)} users)" for p in cluster.products))
        run.churn_s = await churn_phase(run)
        log(f"churn over ({len(run.churn.answers)} answers); quiet period (at most {cfg.quiet_s:.0f}s)")
        quiet_s = await quiet_phase(run)
        conn = await asyncpg.connect(cluster.dsn, timeout=5)
        try:
            peaks = await run.ledger.check_history(conn)
            actions = await audit_counts(run, conn)
        finally:
            await conn.close()
        await shut_down(run)
        return summary(run, quiet_s, peaks, actions)


async def shut_down(run: Run) -> None:
    """Destroy every engine through the API, then SIGTERM the replicas: each must exit cleanly (0, or
    -15: uvicorn re-raises SIGTERM after a graceful shutdown) without an uncaught exception in its
    log (a background task that died surfaces there at shutdown)."""
    destroyed, failures = await run.cluster.destroy_all(run.client)
    log(f"destroyed {destroyed} engines through the API" + (f"; failed: {failures[:3]}" if failures else ""))
    for line in failures:
        run.ledger.flag("replica: destroy at the end failed", line)
    codes = await asyncio.to_thread(run.cluster.stop_replicas)
    for replica in run.cluster.replicas:
        uncaught = replica.uncaught()
        if codes.get(replica.name) not in (0, -signal.SIGTERM) or uncaught:
            run.ledger.flag("replica shutdown", f"replica {replica.name} exited {codes.get(replica.name)} after "
                            f"SIGTERM; uncaught in its log: {' | '.join(uncaught) or 'nothing'}")


async def teardown(cluster: Cluster, pg: Postgres, workdir: Path, keep: bool) -> None:
    if cluster.replicas and any(r.alive() for r in cluster.replicas) and pg.pid() is not None:
        async with httpx.AsyncClient() as c:
            with contextlib.suppress(Exception):
                destroyed, failures = await asyncio.wait_for(cluster.destroy_all(c), 70)
                log(f"teardown: destroyed {destroyed} engines through the API"
                    + (f"; failed: {failures[:3]}" if failures else ""))
    await asyncio.to_thread(cluster.stop_replicas)
    left = await asyncio.to_thread(cluster.reap_engines)
    if left:
        log(f"teardown: ended {left} engine process(es) by pid")
    await asyncio.to_thread(pg.shutdown)
    if keep:
        log(f"teardown: kept {workdir} (SOAK_KEEP=1)")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


async def _main(cfg: SoakConfig) -> int:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    workdir = Path(tempfile.mkdtemp(prefix="bap-soak-"))
    pg = Postgres(workdir, free_port())
    cluster = Cluster(cfg, workdir, pg.dsn)
    code = 1
    try:
        async with asyncio.timeout(MAX_WALL_S - _TEARDOWN_S):
            code = await _soak(cfg, workdir, pg, cluster)
    except TimeoutError:
        log(f"FAIL: the run hit its {MAX_WALL_S - _TEARDOWN_S:.0f}s bound before finishing")
    except asyncio.CancelledError:
        log("interrupted: cleaning up")
        code = 130
    except Exception as err:  # a setup failure: say what, then clean up
        log(f"FAIL: {type(err).__name__}: {err}")
        if pg.pid() is None:
            log("Postgres log tail:\n" + pg.log_tail())
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):  # the teardown is bounded: let it finish
            loop.add_signal_handler(sig, log, "signal ignored: tearing down")
        await teardown(cluster, pg, workdir, cfg.keep)
    return code


def main() -> None:
    sys.exit(asyncio.run(_main(SoakConfig.from_env())))
