"""Usage: the seconds each user's engines spent running, sleeping and stopped inside a window, and
their provisions, wakes and restarts, read from the audit log's transitions (`audit_log.state`, the
state an engine entered with that row; NULL: the row is no transition).

An engine's state over [since, until) is given by its last transition before `since` and those
inside; each transition opens an interval that the engine's next transition (ordered by id) closes,
or `until` (now, when `until` is later). An interval is billed to the user_id of the row that opened
it: rows with user_id NULL (a warm-pool engine before it is claimed) bill no one, and only the states
running, sleeping and stopped are billed ('provisioning', 'failed', 'destroying' and 'gone' end an
interval and bill nothing). provisions counts `provision` and `pool_claim` rows (claiming a warm
engine is the user's provision), wakes `wake`, restarts `auto_restart_success`, inside the window.

Seconds are whole: each user's exact sum per state (microseconds, Postgres numeric) floored, and
totals are the sums of the users' figures, so that totals always equal the sum of the users.

Service layer: takes an asyncpg pool, speaks no HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

__all__ = ["Figures", "UserUsage", "Usage", "BILLED_STATES", "report"]

BILLED_STATES = ("running", "sleeping", "stopped")
_COUNTED = ("provision", "pool_claim", "wake", "auto_restart_success")


@dataclass(frozen=True, slots=True)
class Figures:
    running_s: int = 0
    sleeping_s: int = 0
    stopped_s: int = 0
    provisions: int = 0
    wakes: int = 0
    restarts: int = 0

    def __add__(self, other: Figures) -> Figures:
        return Figures(self.running_s + other.running_s, self.sleeping_s + other.sleeping_s,
                       self.stopped_s + other.stopped_s, self.provisions + other.provisions,
                       self.wakes + other.wakes, self.restarts + other.restarts)


@dataclass(frozen=True, slots=True)
class UserUsage:
    user_id: str
    figures: Figures


@dataclass(frozen=True, slots=True)
class Usage:
    since: datetime
    until: datetime
    users: list[UserUsage]  # every user with a non-zero figure, by user_id
    totals: Figures


# $1 product, $2 since, $3 until, $4 billed states[, $5 user id]. Per engine (every engine of the
# product with a transition, found by a loose index scan of audit_log_states (product_id, engine_id,
# id) WHERE state IS NOT NULL; with a user, the engines that user had a transition on), the marks are
# its last transition before the window and the ones after it (all inside: a later id is no earlier
# a time), read from that index by id with a LATERAL each; LEAD pairs every mark with its engine's
# next one before any filter.
_SECONDS = """
WITH RECURSIVE bounds AS (SELECT $2::timestamptz AS since, least($3::timestamptz, now()) AS stop),
{engines},
marks AS (  -- the last transition before the window, then every later one up to its end
    SELECT m.* FROM engines e CROSS JOIN bounds b
      LEFT JOIN LATERAL (
        SELECT a.id, a.engine_id, a.user_id, a.state, a.timestamp FROM audit_log a
         WHERE a.product_id = $1 AND a.engine_id = e.engine_id AND a.state IS NOT NULL AND a.timestamp < b.since
         ORDER BY a.id DESC LIMIT 1
      ) l ON true
     CROSS JOIN LATERAL (
        SELECT l.id, l.engine_id, l.user_id, l.state, l.timestamp WHERE l.id IS NOT NULL
        UNION ALL
        SELECT a.id, a.engine_id, a.user_id, a.state, a.timestamp FROM audit_log a
         WHERE a.product_id = $1 AND a.engine_id = e.engine_id AND a.state IS NOT NULL
           AND a.id > coalesce(l.id, 0) AND a.timestamp < b.stop
      ) m
),
spans AS (
    SELECT m.user_id, m.state, greatest(m.timestamp, b.since) AS lower,
           least(coalesce(lead(m.timestamp) OVER (PARTITION BY m.engine_id ORDER BY m.id), b.stop), b.stop) AS upper
      FROM marks m, bounds b
)
SELECT user_id, state, floor(sum(extract(epoch FROM upper) - extract(epoch FROM lower)))::bigint AS seconds
  FROM spans
 WHERE upper > lower AND user_id IS NOT NULL AND state = ANY($4::text[]) {user}
 GROUP BY 1, 2
"""
_ALL_ENGINES = """skip(engine_id) AS (
    (SELECT engine_id FROM audit_log WHERE product_id = $1 AND state IS NOT NULL ORDER BY engine_id LIMIT 1)
    UNION ALL
    SELECT (SELECT a.engine_id FROM audit_log a WHERE a.product_id = $1 AND a.state IS NOT NULL
             AND a.engine_id > skip.engine_id ORDER BY a.engine_id LIMIT 1)
      FROM skip WHERE skip.engine_id IS NOT NULL
),
engines AS (SELECT engine_id FROM skip WHERE engine_id IS NOT NULL)"""
_USER_ENGINES = """engines AS (
    SELECT DISTINCT engine_id FROM audit_log
     WHERE product_id = $1 AND user_id = $5 AND state IS NOT NULL AND engine_id IS NOT NULL
)"""
_SECONDS_ALL = _SECONDS.format(engines=_ALL_ENGINES, user="")
_SECONDS_USER = _SECONDS.format(engines=_USER_ENGINES, user="AND user_id = $5")

_COUNTS = """
SELECT user_id,
       count(*) FILTER (WHERE action IN ('provision', 'pool_claim')) AS provisions,
       count(*) FILTER (WHERE action = 'wake') AS wakes,
       count(*) FILTER (WHERE action = 'auto_restart_success') AS restarts
  FROM audit_log
 WHERE product_id = $1 AND user_id IS NOT NULL AND action = ANY($4::text[])
   AND timestamp >= $2 AND timestamp < least($3::timestamptz, now()) {user}
 GROUP BY 1
"""
_COUNTS_ALL = _COUNTS.format(user="")
_COUNTS_USER = _COUNTS.format(user="AND user_id = $5")


async def report(pool: asyncpg.Pool, product_id: str, since: datetime, until: datetime,
                 user_id: str | None = None) -> Usage:
    """The product's usage over [since, until) (both aware; since < until), for one user or all.
    Both queries read one snapshot with one now() (a read-only repeatable-read transaction)."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        if user_id is None:
            seconds = await conn.fetch(_SECONDS_ALL, product_id, since, until, list(BILLED_STATES))
            counts = await conn.fetch(_COUNTS_ALL, product_id, since, until, list(_COUNTED))
        else:
            seconds = await conn.fetch(_SECONDS_USER, product_id, since, until, list(BILLED_STATES), user_id)
            counts = await conn.fetch(_COUNTS_USER, product_id, since, until, list(_COUNTED), user_id)
    by_user: dict[str, dict[str, int]] = {}
    for r in seconds:
        by_user.setdefault(r["user_id"], {})[f"{r['state']}_s"] = int(r["seconds"])
    for r in counts:
        by_user.setdefault(r["user_id"], {}).update(
            provisions=int(r["provisions"]), wakes=int(r["wakes"]), restarts=int(r["restarts"]))
    users = [UserUsage(u, f) for u, values in sorted(by_user.items()) if (f := Figures(**values)) != Figures()]
    totals = sum((u.figures for u in users), Figures())
    return Usage(since, until, users, totals)
