"""Audit log: writes and queries of `audit_log`.

Takes the caller's connection (so a row commits with its state change), never commits,
never calls a backend. Metadata must never contain a key: callers pass ids and reasons.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import orjson

from bap_engine.states import AuditAction

__all__ = [
    "AuditRow", "Denial", "ActionTotal", "AuditTotals", "COUNTED_ACTIONS", "write", "write_many", "add_denials",
    "metrics", "recent", "totals", "NOT_EVENTS", "iso_z", "event_json", "page", "state_seconds",
]


@dataclass(frozen=True, slots=True)
class AuditRow:
    id: int
    timestamp: datetime
    product_id: str | None
    user_id: str | None
    engine_id: str | None
    action: str
    actor: str
    metadata: dict[str, object]
    duration_ms: int | None
    state: str | None = None  # the state the engine entered with this row ('gone': its row went)


@dataclass(frozen=True, slots=True)
class Denial:
    """`count` denials of one product for one reason within the minute `minute`."""

    product_id: str
    reason: str
    minute: datetime
    count: int
    actor: str


COUNTED_ACTIONS = ("provision", "provision_failed", "destroy", "health_failed", "auto_restart_start", "wake",
                   "pool_fill", "pool_claim")


@dataclass(frozen=True, slots=True)
class ActionTotal:
    """All-time count of one audit action for one product; `buckets[i]` counts rows with
    duration_ms <= bounds_ms[i] (cumulative), `duration_count`/`sum_ms` the rows with a duration."""

    product_id: str
    action: str
    count: int
    buckets: tuple[int, ...]
    duration_count: int
    sum_ms: int


@dataclass(frozen=True, slots=True)
class AuditTotals:
    actions: list[ActionTotal]
    denials: list[tuple[str, str, int]]  # (product id, reason, all-time count)


# Audit rows that are not lifecycle events: neither GET /events nor a webhook carries them (the
# NOTIFY trigger of migration 0004 names the same two).
NOT_EVENTS: tuple[str, ...] = ("health_check", "admit_denied")


def iso_z(ts: datetime | None) -> str | None:
    """ISO-8601 UTC with a Z suffix, milliseconds: every timestamp the API and the events show."""
    if ts is None:
        return None
    if ts.tzinfo is not None:  # naive values are already UTC (asyncpg returns aware UTC)
        ts = ts.astimezone(UTC).replace(tzinfo=None)
    return ts.isoformat(timespec="milliseconds") + "Z"


def event_json(id: int, timestamp: datetime, action: str, user_id: str | None, engine_id: str | None,
               actor: str, metadata: dict[str, object]) -> bytes:
    """An event's JSON, the same bytes as an SSE frame's `data` and as a webhook's signed body."""
    return orjson.dumps({"id": id, "timestamp": iso_z(timestamp), "action": action, "user_id": user_id,
                         "engine_id": engine_id, "actor": actor, "metadata": metadata})


_INSERT = (
    "INSERT INTO audit_log (product_id, user_id, engine_id, action, actor, metadata, duration_ms, state) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
)


async def write(
    conn: asyncpg.Connection, action: AuditAction, *, product_id: str | None = None,
    user_id: str | None = None, engine_id: str | None = None, actor: str = "system",
    metadata: dict[str, object] | None = None, duration_ms: int | None = None, state: str | None = None,
) -> None:
    await conn.execute(_INSERT, product_id, user_id, engine_id, str(action), actor, metadata or {}, duration_ms,
                       state)


async def write_many(conn: asyncpg.Connection, rows: Sequence[tuple[object, ...]]) -> None:
    """Rows as (product_id, user_id, engine_id, action, actor, metadata, duration_ms)."""
    if rows:
        await conn.executemany(_INSERT, [(r[0], r[1], r[2], str(r[3]), *r[4:7], None) for r in rows])


async def add_denials(conn: asyncpg.Connection, denials: Sequence[Denial]) -> None:
    """Coalesce denials: one row per product, reason and minute carrying a count."""
    if not denials:
        return
    await conn.executemany(
        "INSERT INTO audit_log (timestamp, product_id, action, actor, metadata) "
        "VALUES ($1, $2, 'admit_denied', $3, jsonb_build_object('reason', $4::text, 'count', $5::int)) "
        "ON CONFLICT (product_id, (metadata->>'reason'), timestamp) WHERE action = 'admit_denied' "
        "DO UPDATE SET metadata = jsonb_set(audit_log.metadata, '{count}', "
        "to_jsonb((audit_log.metadata->>'count')::int + (EXCLUDED.metadata->>'count')::int))",
        [(d.minute, d.product_id, d.actor, d.reason, d.count) for d in denials],
    )


async def metrics(conn: asyncpg.Connection, product_id: str) -> dict[str, object]:
    """The rolling-hour figures of GET /metrics, from the audit log."""
    r = await conn.fetchrow(
        "SELECT "
        "count(*) FILTER (WHERE action = 'provision' AND timestamp > now() - interval '1 hour') AS p1h, "
        "count(*) FILTER (WHERE action = 'health_failed' AND timestamp > now() - interval '1 hour') AS c1h, "
        "count(*) FILTER (WHERE action = 'auto_restart_start' AND timestamp > now() - interval '1 hour') AS r1h, "
        "avg(duration_ms) FILTER (WHERE action = 'provision' AND timestamp > now() - interval '1 hour') AS boot, "
        "count(*) FILTER (WHERE action = 'provision') AS tp, "
        "count(*) FILTER (WHERE action = 'destroy') AS td "
        "FROM audit_log WHERE product_id = $1 AND action IN "
        "('provision', 'health_failed', 'auto_restart_start', 'destroy')",
        product_id,
    )
    return {
        "provisions_1h": int(r["p1h"]),
        "crashes_1h": int(r["c1h"]),
        "restarts_1h": int(r["r1h"]),
        "avg_boot_ms": None if r["boot"] is None else round(float(r["boot"]), 1),
        "total_provisions": int(r["tp"]),
        "total_destroys": int(r["td"]),
    }


async def recent(
    conn: asyncpg.Connection, product_id: str | None = None, limit: int = 100,
    action: str | None = None, after_id: int = 0,
) -> list[AuditRow]:
    """Newest first (or, with after_id, the rows after it oldest first, for tailing)."""
    order = "ASC" if after_id else "DESC"
    rows = await conn.fetch(
        "SELECT id, timestamp, product_id, user_id, engine_id, action, actor, metadata, duration_ms, state "
        "FROM audit_log WHERE ($1::uuid IS NULL OR product_id = $1) AND ($2::text IS NULL OR action = $2) "
        f"AND id > $3 ORDER BY id {order} LIMIT $4",
        product_id, action, after_id, limit,
    )
    return [AuditRow(**dict(r)) for r in rows]


async def totals(conn: asyncpg.Connection, bounds_ms: Sequence[int]) -> AuditTotals:
    """Per-product totals of COUNTED_ACTIONS with cumulative duration buckets, and denials by reason."""
    cols = "".join(f", count(*) FILTER (WHERE duration_ms <= {int(b)}) AS b{i}" for i, b in enumerate(bounds_ms))
    rows = await conn.fetch(
        "SELECT product_id::text AS product_id, action, count(*) AS n, count(duration_ms) AS dn, "
        f"coalesce(sum(duration_ms), 0) AS sum_ms{cols} FROM audit_log "
        "WHERE action = ANY($1::text[]) AND product_id IS NOT NULL GROUP BY 1, 2",
        list(COUNTED_ACTIONS),
    )
    denied = await conn.fetch(
        "SELECT product_id::text AS product_id, metadata->>'reason' AS reason, "
        "sum(coalesce((metadata->>'count')::int, 1)) AS n FROM audit_log "
        "WHERE action = 'admit_denied' AND product_id IS NOT NULL GROUP BY 1, 2"
    )
    actions = [ActionTotal(r["product_id"], r["action"], int(r["n"]),
                           tuple(int(r[f"b{i}"]) for i in range(len(bounds_ms))), int(r["dn"]),
                           int(r["sum_ms"])) for r in rows]
    return AuditTotals(actions, [(r["product_id"], str(r["reason"]), int(r["n"])) for r in denied])


async def page(
    conn: asyncpg.Connection, product_id: str, limit: int, *, before_id: int | None = None,
    user_id: str | None = None, engine_id: str | None = None, action: str | None = None,
    since: datetime | None = None, until: datetime | None = None,
) -> list[AuditRow]:
    """A product's rows newest first, keyset on id: those with id < before_id (the last id of the
    previous page), in [since, until). Only the filters given are in the SQL, so the planner walks
    (product_id, user_id, id), (product_id, engine_id, id) or (product_id, id) backwards from the
    cursor and stops after `limit` rows; action and the times filter what that walk reads."""
    where: list[str] = ["product_id = $1"]
    args: list[object] = [product_id]
    for cond, arg in (("user_id = ${}", user_id), ("engine_id = ${}::uuid", engine_id), ("action = ${}", action),
                      ("timestamp >= ${}", since), ("timestamp < ${}", until), ("id < ${}", before_id)):
        if arg is not None:
            args.append(arg)
            where.append(cond.format(len(args)))
    args.append(limit)
    rows = await conn.fetch(
        "SELECT id, timestamp, product_id, user_id, engine_id, action, actor, metadata, duration_ms, state "
        f"FROM audit_log WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ${len(args)}",
        *args,
    )
    return [AuditRow(**dict(r)) for r in rows]


async def state_seconds(conn: asyncpg.Connection) -> list[tuple[str, str, float]]:
    """(product id, state, seconds) engines (never pool ones) spent in each state: the closed
    intervals of `state_seconds` (kept by a trigger on engines, see migration 0004) plus the open
    ones of live engines, read in one statement (one snapshot, one now())."""
    rows = await conn.fetch(
        "SELECT product_id::text AS product_id, state, sum(seconds)::float8 AS seconds FROM ("
        "SELECT product_id, state, seconds FROM state_seconds UNION ALL "
        "SELECT product_id, status, greatest(extract(epoch FROM now() - state_since), 0) FROM engines WHERE NOT pool"
        ") s GROUP BY 1, 2"
    )
    return [(r["product_id"], r["state"], float(r["seconds"])) for r in rows]
