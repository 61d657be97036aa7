"""Invariants over the clients' answers: the status codes that may come back (and when: 503
SERVICE_UNAVAILABLE only around the Postgres outage, never a 500), an audit row for every 2xx
lifecycle answer (engine_id, action, time), a provision row for every engine an admit handed
out, no lifecycle row for an engine after its removal, the shared rate limit in every rolling
60 s window, and the quota replayed from the audit log (every moment, not only the snapshots).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass, field

import asyncpg

from soak.churn import Answer
from soak.cluster import Cluster, Product

__all__ = ["Ledger", "AUDIT_OF", "OUTAGE_GRACE_S"]

AUDIT_OF = {"provision": ("provision",), "start": ("start", "wake"), "stop": ("stop",),
            "rotate-key": ("rotate_key",), "destroy": ("destroy",)}
_ACTIONS = ["provision", "start", "wake", "stop", "rotate_key", "destroy", "reconcile"]
OUTAGE_GRACE_S = 20.0  # after Postgres is back, stale pool connections may still answer 503
_SLACK_S = 1.0  # audit timestamp (transaction start, same machine clock) vs the request's [t0, t1]
_ALLOWED = {  # status -> codes that are a legitimate answer under this churn
    404: {"ENGINE_NOT_FOUND"},
    409: {"ENGINE_ALREADY_EXISTS", "ENGINE_NOT_RUNNING", "ENGINE_ALREADY_RUNNING", "ENGINE_BUSY"},
    429: {"QUOTA_EXCEEDED", "RATE_LIMITED"},
    502: {"BACKEND_ERROR"},  # an engine killed under an op
    504: {"BOOT_TIMEOUT"},
}
_KEPT = 8  # evidence lines kept per kind of violation
_REMOVAL = ("destroy", "provision_failed")
_AFTER_REMOVAL_FORBIDDEN = ("provision", "start", "stop", "wake", "sleep", "rotate_key", "health_failed",
                            "auto_restart_start", "auto_restart_success", "auto_restart_failed")


@dataclass
class Ledger:
    cluster: Cluster
    persist_s: float
    outage: tuple[float, float | None] | None = None  # wall clock: Postgres stopped .. started again
    done: int = 0  # answers already looked at
    pending: list[tuple[Answer, int]] = field(default_factory=list)  # (answer, checks it stayed unmatched)
    admitted: dict[str, Answer] = field(default_factory=dict)  # engine id -> first admit that returned it
    unused: dict[tuple[str, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    provisioned: set[str] = field(default_factory=set)
    seen_ids: set[int] = field(default_factory=set)
    fetched_to: float = 0.0
    violations: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    rate_max: dict[str, int] = field(default_factory=dict)
    matched: int = 0

    def flag(self, kind: str, evidence: str) -> None:
        self.counts[kind] += 1
        if len(self.violations[kind]) < _KEPT:
            self.violations[kind].append(evidence)

    def _product(self, slug: str) -> Product:
        return next(p for p in self.cluster.products if p.slug == slug)

    def _in_outage(self, a: Answer) -> bool:
        if self.outage is None:
            return False
        down, up = self.outage
        return a.t1 >= down - _SLACK_S and (up is None or a.t0 <= up + OUTAGE_GRACE_S)

    def _status_rule(self, a: Answer) -> None:
        what = f"{a.op} {a.product}/{a.user} on {a.replica} at {a.t0:.3f}: HTTP {a.status} {a.code} {a.detail}"
        if a.ok:
            if a.op in AUDIT_OF and not a.engine_id:
                self.flag("2xx without engine_id", what)
            return
        product = self._product(a.product)
        if a.status == 0:
            self.flag("no answer (transport error)", what)
        elif a.status == 500:
            self.flag("500 INTERNAL_ERROR", what)
        elif a.status == 503 and a.code == "SERVICE_UNAVAILABLE":
            if not self._in_outage(a):
                self.flag(f"503 outside the Postgres outage (+{OUTAGE_GRACE_S:.0f}s)", what)
        elif a.code not in _ALLOWED.get(a.status, set()):
            self.flag("unexpected status/code", what)
        elif a.code == "QUOTA_EXCEEDED" and product.max_engines is None:
            self.flag("QUOTA_EXCEEDED without max_engines", what)
        elif a.code == "RATE_LIMITED" and product.rpm is None:
            self.flag("RATE_LIMITED without rate_limit_rpm", what)

    def take(self, answers: list[Answer]) -> None:
        """Look at the answers that arrived since the last call."""
        new, self.done = answers[self.done:], len(answers)
        for a in new:
            self._status_rule(a)
            if a.ok and a.op in AUDIT_OF and a.engine_id:
                self.pending.append((a, 0))
            if a.ok and a.admitted and a.engine_id and a.engine_id not in self.admitted:
                self.admitted[a.engine_id] = a

    async def _fetch_audit(self, conn: asyncpg.Connection, now: float) -> None:
        """Rows of the lifecycle actions since a while before the last fetch (ids can commit out of order)."""
        rows = await conn.fetch(
            "SELECT id, extract(epoch FROM timestamp)::float8 AS ts, engine_id::text AS engine_id, action "
            "FROM audit_log WHERE action = ANY($1) AND timestamp >= to_timestamp($2) ORDER BY id",
            _ACTIONS, self.fetched_to - 120)
        self.fetched_to = now
        for r in rows:
            if r["id"] in self.seen_ids or r["engine_id"] is None:
                continue
            self.seen_ids.add(r["id"])
            if r["action"] in ("provision", "reconcile"):
                self.provisioned.add(r["engine_id"])
            bucket = self.unused[(r["engine_id"], r["action"])]
            bucket.insert(bisect_left(bucket, r["ts"]), r["ts"])

    def _match(self, a: Answer) -> bool:
        assert a.engine_id is not None
        best: tuple[float, str] | None = None
        for action in AUDIT_OF[a.op]:
            bucket = self.unused.get((a.engine_id, action), [])
            i = bisect_left(bucket, a.t0 - _SLACK_S)
            if i < len(bucket) and bucket[i] <= a.t1 + _SLACK_S and (best is None or bucket[i] < best[0]):
                best = (bucket[i], action)
        if best is None:
            return False
        self.unused[(a.engine_id, best[1])].remove(best[0])
        self.matched += 1
        return True

    async def check_audit(self, conn: asyncpg.Connection, now: float, final: bool = False) -> None:
        await self._fetch_audit(conn, now)
        still: list[tuple[Answer, int]] = []
        for a, tries in sorted(self.pending, key=lambda p: p[0].t1):
            if self._match(a):
                continue
            if final or (tries + 1 >= 2 and now - a.t1 >= self.persist_s):
                self.flag("2xx without its audit row", f"{a.op} {a.product}/{a.user} engine {a.engine_id} on "
                          f"{a.replica}, sent {a.t0:.3f}, answered {a.t1:.3f}: no {'/'.join(AUDIT_OF[a.op])} row "
                          f"in [{a.t0 - _SLACK_S:.3f}, {a.t1 + _SLACK_S:.3f}]")
            else:
                still.append((a, tries + 1))
        self.pending = still
        for engine_id, a in list(self.admitted.items()):
            if engine_id in self.provisioned:
                del self.admitted[engine_id]
            elif final or now - a.t1 >= self.persist_s:
                self.flag("admitted engine never provisioned", f"admit {a.product}/{a.user} on {a.replica} at "
                          f"{a.t1:.3f} returned engine {engine_id}, which has no provision (or reconcile) row")
                del self.admitted[engine_id]

    def check_rate(self, answers: list[Answer], since: float = 0.0) -> None:
        """Admits answered 200 (admitted or not) per product: more than rate_limit_rpm whose whole
        [sent, answered] spans fit in one 60 s window is a violation, wherever the server counted them."""
        for product in self.cluster.products:
            if product.rpm is None:
                continue
            mine = sorted((a for a in answers if a.product == product.slug and a.op.startswith("admit")
                           and a.status == 200), key=lambda a: a.t0)
            starts = [a.t0 for a in mine]
            for i in range(bisect_left(starts, since - 60), len(mine)):
                anchor = mine[i].t0
                j, inside = i, 0
                while j < len(mine) and mine[j].t0 < anchor + 60:
                    inside += mine[j].t1 < anchor + 60
                    j += 1
                self.rate_max[product.slug] = max(self.rate_max.get(product.slug, 0), inside)
                if inside > product.rpm:
                    self.flag("rate limit exceeded", f"{product.slug}: {inside} admits answered 200 within "
                              f"[{anchor:.3f}, {anchor + 60:.3f}) > rate_limit_rpm={product.rpm}")
                    break

    async def check_history(self, conn: asyncpg.Connection) -> dict[str, int]:
        """The whole audit log of our products, per engine in time order: no lifecycle row after the
        engine was removed (destroy / provision_failed), and the quota replayed (engines provisioned
        and not yet removed exist at once: a lower bound of the rows). Returns the replayed peaks."""
        rows = await conn.fetch(
            "SELECT extract(epoch FROM timestamp)::float8 AS ts, product_id::text AS product_id, "
            "engine_id::text AS engine_id, action, actor FROM audit_log WHERE product_id = ANY($1::uuid[]) "
            "AND engine_id IS NOT NULL ORDER BY timestamp, id", [p.product_id for p in self.cluster.products])
        removed: dict[str, tuple[float, str]] = {}
        live: dict[str, set[str]] = defaultdict(set)
        peaks: dict[str, int] = {p.slug: 0 for p in self.cluster.products if p.max_engines is not None}
        for r in rows:
            eid, action = r["engine_id"], r["action"]
            if action in _REMOVAL:
                removed.setdefault(eid, (r["ts"], action))
                live[r["product_id"]].discard(eid)
                continue
            if eid in removed and action in _AFTER_REMOVAL_FORBIDDEN:
                at, how = removed[eid]
                self.flag("lifecycle row after the engine was removed", f"engine {eid}: '{action}' (actor "
                          f"{r['actor']}) at {r['ts']:.3f}, after its '{how}' at {at:.3f}")
                continue
            if action == "provision":
                live[r["product_id"]].add(eid)
                self._peak(r["product_id"], len(live[r["product_id"]]), r["ts"], peaks)
        return peaks

    def _peak(self, product_id: str, n: int, ts: float, peaks: dict[str, int]) -> None:
        product = next(p for p in self.cluster.products if p.product_id == product_id)
        if product.max_engines is None or n <= peaks[product.slug]:
            return
        peaks[product.slug] = n
        if n > product.max_engines:
            self.flag("quota exceeded (audit replay)", f"{product.slug}: {n} engines provisioned and not "
                      f"removed at {ts:.3f} > max_engines={product.max_engines}")
