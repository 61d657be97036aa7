"""State invariants, from a snapshot: the registry (engines rows, read with asyncpg) against the
backend (engine processes in /proc and the backend's process records), ports (rows and
listening sockets), quota, leadership (`bap_leader` of each replica) and the replicas'
liveness locks.

A finding is keyed; `Tracker` turns a finding into a violation only once it has persisted
for `persist_s` over at least two checks (ops in flight make short mismatches normal), or at
once for the findings that may never happen even for an instant, or at the final check.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
import httpx

from soak import procs
from soak.cluster import Cluster

__all__ = ["Snapshot", "Tracker", "take_snapshot", "findings"]

_ROWS = ("SELECT id::text AS id, product_id::text AS product_id, user_id, status, port, sleep_kind, op, "
         "op_deadline FROM engines WHERE deployment = $1")  # no timestamps: a health write is no change
_OWNER_LOCKS = ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 7415004 "
                "AND objsubid = 2 AND granted")


@dataclass
class Snapshot:
    at: float
    rows: dict[str, asyncpg.Record]  # engine id -> row, the same in both reads around the /proc scan
    all_rows: dict[str, asyncpg.Record]  # the second read, whole (one statement: one instant)
    unstable: set[str]  # ids whose row changed (or appeared/vanished) during the scan
    engines: list[procs.EngineProc]
    recorded: dict[str, tuple[int | None, int | None]]
    listeners: dict[int, set[int]]
    leaders: dict[str, float | None]  # replica -> bap_leader (None: not scraped)
    owner_locks: int


async def _leader_gauge(c: httpx.AsyncClient, cluster: Cluster) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for replica in cluster.replicas:
        out[replica.name] = None
        try:
            r = await c.get(replica.url + "/metrics/prometheus", timeout=5,
                            headers={"Authorization": f"Bearer {cluster.admin_key}"})
        except httpx.HTTPError:
            continue
        for line in r.text.splitlines() if r.status_code == 200 else []:
            if line.startswith("bap_leader{"):
                out[replica.name] = float(line.rsplit(" ", 1)[1])
    return out


async def take_snapshot(c: httpx.AsyncClient, cluster: Cluster) -> Snapshot | None:
    """None when the database does not answer (the outage)."""
    cfg = cluster.cfg
    try:
        conn = await asyncpg.connect(cluster.dsn, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return None
    try:
        before = {r["id"]: r for r in await conn.fetch(_ROWS, cluster.deployment)}
        engines = procs.scan_engines(cluster.deployment)
        recorded = procs.records(cluster.data_dir)
        held = procs.listeners(cfg.port_min, cfg.port_max)
        after = {r["id"]: r for r in await conn.fetch(_ROWS, cluster.deployment)}
        owner_locks = int(await conn.fetchval(_OWNER_LOCKS))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return None
    finally:
        await conn.close()
    unstable = {i for i in before.keys() | after.keys() if before.get(i) != after.get(i)}
    rows = {i: r for i, r in after.items() if i not in unstable}
    leaders = await _leader_gauge(c, cluster)
    return Snapshot(time.time(), rows, after, unstable, engines, recorded, held, leaders, owner_locks)


Finding = tuple[str, str, bool]  # (key, evidence, immediate)


def _row_text(row: asyncpg.Record) -> str:
    return (f"engine {row['id']} (user {row['user_id']}) status={row['status']} sleep_kind={row['sleep_kind']} "
            f"op={row['op']} port={row['port']}")


def _row_vs_process(row: asyncpg.Record, mine: list[procs.EngineProc], now: datetime) -> list[Finding]:
    eid, status, kind = row["id"], row["status"], row["sleep_kind"]
    if row["op"] is not None:
        if row["op_deadline"] is not None and row["op_deadline"] < now:
            return [(f"op-expired:{eid}", f"{_row_text(row)}: op past its deadline {row['op_deadline']}", False)]
        return []  # a transition in flight
    alive = [p for p in mine if p.state != "T"]
    paused = [p for p in mine if p.state == "T"]
    pids = ", ".join(f"pid {p.pid} state {p.state}" for p in mine) or "no process"
    want: str | None = None
    if status == "running" and (len(alive) != 1 or paused):
        want = "exactly one running engine process"
    elif status == "sleeping" and kind == "paused" and (len(paused) != 1 or alive):
        want = "exactly one paused (SIGSTOP) engine process"
    elif (status == "stopped" or (status == "sleeping" and kind == "stopped")) and mine:
        want = "no engine process"
    elif status in ("provisioning", "destroying"):
        want = f"no row left in {status} without an op"
    if want is None:
        return []
    return [(f"registry-backend:{eid}:{status}:{kind}", f"{_row_text(row)}: expected {want}, found {pids}", False)]


def _registry_vs_backend(snap: Snapshot) -> list[Finding]:
    out: list[Finding] = []
    by_id: dict[str, list[procs.EngineProc]] = {}
    for p in snap.engines:
        by_id.setdefault(p.engine_id, []).append(p)
    now = datetime.now(UTC)
    for eid, row in snap.rows.items():
        out += _row_vs_process(row, by_id.get(eid, []), now)
    for eid, mine in by_id.items():
        if len(mine) > 1:
            pids = ", ".join(str(p.pid) for p in mine)
            out.append((f"duplicate-process:{eid}", f"engine {eid} has {len(mine)} processes: pids {pids}", False))
        if eid not in snap.rows and eid not in snap.unstable:
            for p in mine:
                out.append((f"orphan:{eid}:{p.pid}", f"engine process pid {p.pid} (engine {eid}, port {p.port}, "
                            f"state {p.state}) has no engines row", False))
        for p in mine:
            if snap.recorded.get(eid, (None, None)) != (p.pid, p.starttime):
                out.append((f"untracked:{eid}:{p.pid}", f"engine process pid {p.pid} of {eid} is not the one in "
                            f"the backend's record {snap.recorded.get(eid)}", False))
    return out


def _ports(snap: Snapshot, cluster: Cluster) -> list[Finding]:
    out: list[Finding] = []
    cfg = cluster.cfg
    owners = Counter(r["port"] for r in snap.rows.values() if r["port"] is not None)
    for port, n in owners.items():
        if n > 1:
            out.append((f"db-port-twice:{port}", f"port {port} is on {n} engines rows", True))
        if not cfg.port_min <= port <= cfg.port_max:
            out.append((f"db-port-range:{port}", f"port {port} outside {cfg.port_min}-{cfg.port_max}", True))
    engine_of = {p.pid: p for p in snap.engines}
    row_of_port = {r["port"]: r for r in snap.rows.values() if r["port"] is not None}
    for port, pids in snap.listeners.items():
        if len(pids) > 1:
            out.append((f"port-twice:{port}", f"port {port} is listened on by pids {sorted(pids)}", True))
        for pid in pids:
            proc = engine_of.get(pid)
            row = row_of_port.get(port)
            if proc is not None and proc.engine_id in snap.rows and snap.rows[proc.engine_id]["port"] != port:
                out.append((f"port-mismatch:{proc.engine_id}:{port}", f"engine {proc.engine_id} (pid {pid}) "
                            f"listens on {port}, its row says {snap.rows[proc.engine_id]['port']}", False))
            elif row is not None and row["op"] is None and ((proc is not None and proc.engine_id != row["id"])
                                                            or (proc is None and row["status"] == "running")):
                who = f"engine {proc.engine_id}" if proc else "a process that is not one of our engines"
                out.append((f"port-stolen:{port}:{pid}", f"port {port} of {_row_text(row)} is held by pid {pid} "
                            f"({who})", False))
    return out


def _quota(snap: Snapshot, cluster: Cluster) -> list[Finding]:
    out: list[Finding] = []
    for product in cluster.products:
        if product.max_engines is None:
            continue
        mine = [_row_text(r) for r in snap.all_rows.values() if r["product_id"] == product.product_id]
        if len(mine) > product.max_engines:
            out.append((f"quota:{product.slug}", f"{product.slug} has {len(mine)} engines rows > max_engines="
                        f"{product.max_engines}: " + "; ".join(mine), True))
    return out


def _leadership(snap: Snapshot, cluster: Cluster) -> list[Finding]:
    out: list[Finding] = []
    gauges = [v for v in snap.leaders.values() if v is not None]
    if len(gauges) == len(cluster.replicas):
        leaders = sum(v == 1.0 for v in gauges)
        if leaders != 1:
            out.append((f"leaders:{leaders}", f"{leaders} replicas hold the workers' leader lock (bap_leader: "
                        f"{snap.leaders}); the health, idle and reconcile workers run only in the leader", False))
    if snap.owner_locks != len(cluster.replicas):
        out.append(("owner-locks", f"{snap.owner_locks} owner liveness locks (pg_locks class 7415004) are held "
                    f"for {len(cluster.replicas)} live replicas: ops of a replica without its lock look abandoned "
                    "and can be taken over by any other request while still running", False))
    return out


def findings(snap: Snapshot, cluster: Cluster) -> list[Finding]:
    return [*_registry_vs_backend(snap), *_ports(snap, cluster), *_quota(snap, cluster), *_leadership(snap, cluster)]


@dataclass
class Tracker:
    """Findings over time: key -> (first seen, checks seen in a row, last evidence)."""

    persist_s: float
    seen: dict[str, tuple[float, int, str]] = field(default_factory=dict)
    violations: dict[str, str] = field(default_factory=dict)
    first_noted: dict[str, float] = field(default_factory=dict)

    def update(self, found: list[Finding], at: float, final: bool = False) -> list[str]:
        """Record one check; returns the keys that just became violations."""
        fresh: list[str] = []
        now_seen: dict[str, tuple[float, int, str]] = {}
        for key, evidence, immediate in found:
            first, count, _ = self.seen.get(key, (at, 0, ""))
            now_seen[key] = (first, count + 1, evidence)
            lasting = count + 1 >= 2 and at - first >= self.persist_s
            if (immediate or lasting or final) and key not in self.violations:
                held = f" (for {at - first:.0f}s, {count + 1} checks)" if not immediate else ""
                self.violations[key] = evidence + held
                self.first_noted[key] = at
                fresh.append(key)
        self.seen = now_seen
        return fresh

    def reset(self) -> None:
        """Forget transient findings (after the database was unreachable)."""
        self.seen.clear()
