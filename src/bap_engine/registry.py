"""Registry: Postgres access for products and engines.

Pure data access: every function takes an asyncpg connection first, never commits
(the caller owns the transaction), never calls a backend and never writes audit.
Rows come back as frozen dataclasses; ids are strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime

import asyncpg

from bap_engine.states import EngineState

__all__ = [
    "ProductRow", "EngineRow", "insert_product", "get_product", "get_product_by_key_hash",
    "set_policy", "list_products", "lock_product", "count_engines", "admit_lookup", "AdmitLookup", "EngineBrief",
    "get_engine", "get_engine_by_id", "insert_engine", "allocate_port", "claim_op",
    "update_engine", "delete_engine", "list_engines", "count_by_status", "engines_in_states",
    "touch_activity", "count_by_product_status", "all_engines", "record_health_ok", "bump_health_failures",
    "due_restarts", "stale_ops", "update_claimed", "delete_claimed", "expire_op", "OWNER_GRACE_S",
    "POOL_USER_PREFIX", "claim_pool_engine", "pool_engines", "products_with_pool", "count_warm",
    "count_pool_by_product",
    "mark_product_deleted", "release_product_delete", "deletes_to_finish", "remove_deleted_product",
    "product_engines", "rotate_product_key",
]

# A warm-pool engine's user_id: no real user id can start with "_" (spec's user_id pattern).
POOL_USER_PREFIX = "_pool."

_PORT_LOCK = 7_415_003  # serialises port choice across processes


@dataclass(frozen=True, slots=True)
class ProductRow:
    id: str
    slug: str
    display_name: str
    policy: dict[str, object]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class EngineRow:
    id: str
    product_id: str
    user_id: str
    status: EngineState
    port: int | None
    url: str | None
    ref: str | None
    engine_version: str
    api_key_hash: str
    engine_key_enc: str
    sleep_kind: str | None
    created_at: datetime
    updated_at: datetime
    last_health_at: datetime | None
    last_active_at: datetime | None
    health_failures: int
    restart_attempts: int
    next_restart_at: datetime | None
    boot_ms: int | None
    op: str | None
    op_owner: int | None
    op_deadline: datetime | None
    pending_key_enc: str | None = None  # a rotation in flight (sealed)
    deployment: str = "default"
    pool: bool = False  # a warm-pool engine, not yet bound to a user
    idle_sleep: str = "auto"  # "never" exempts the engine from idle sleep
    busy: bool = False  # the last probe said the engine works
    state_since: datetime | None = None
    upgrade_to: str | None = None  # an upgrade in flight: the version it moves to


_PRODUCT_COLS = "id, slug, display_name, policy, created_at"
_ENGINE_COLS = ", ".join(f.name for f in fields(EngineRow))
_ENGINE_COLS_E = ", ".join(f"e.{f.name}" for f in fields(EngineRow))


def _product(r: asyncpg.Record | None) -> ProductRow | None:
    return None if r is None else ProductRow(r["id"], r["slug"], r["display_name"], r["policy"], r["created_at"])


def _engine(r: asyncpg.Record | dict[str, object] | None) -> EngineRow | None:
    if r is None:
        return None
    values = dict(r)
    values["status"] = EngineState(values["status"])
    return EngineRow(**values)


async def insert_product(
    conn: asyncpg.Connection, id: str, slug: str, display_name: str, key_hash: str, policy: dict[str, object]
) -> ProductRow | None:
    """Insert a product; None when the slug is taken."""
    r = await conn.fetchrow(
        f"INSERT INTO products (id, slug, display_name, api_key_hash, policy) VALUES ($1,$2,$3,$4,$5) "
        f"ON CONFLICT (slug) DO NOTHING RETURNING {_PRODUCT_COLS}",
        id, slug, display_name, key_hash, policy,
    )
    return _product(r)


async def get_product(conn: asyncpg.Connection, product_id: str) -> ProductRow | None:
    """The product, None when unknown or deleted (being deleted counts: its deletion has started)."""
    sql = f"SELECT {_PRODUCT_COLS} FROM products WHERE id = $1 AND deleted_at IS NULL"
    return _product(await conn.fetchrow(sql, product_id))


# A platform key authenticates as the product's current key, or as the key its last rotation replaced
# until that one's expiry (Postgres' clock: every replica agrees); never for a deleted product. Both
# hashes are indexed, so this stays one indexed lookup.
_KEY_MATCHES = ("(p.api_key_hash = $1 OR (p.previous_key_hash = $1 AND p.previous_key_expires_at > now())) "
                "AND p.deleted_at IS NULL")


async def get_product_by_key_hash(conn: asyncpg.Connection, key_hash: str) -> ProductRow | None:
    sql = f"SELECT {_PRODUCT_COLS} FROM products p WHERE {_KEY_MATCHES}"
    return _product(await conn.fetchrow(sql, key_hash))


async def set_policy(conn: asyncpg.Connection, product_id: str, policy: dict[str, object]) -> ProductRow | None:
    r = await conn.fetchrow(
        f"UPDATE products SET policy = $2 WHERE id = $1 AND deleted_at IS NULL RETURNING {_PRODUCT_COLS}",
        product_id, policy,
    )
    return _product(r)


async def list_products(conn: asyncpg.Connection) -> list[ProductRow]:
    """Every product but the deleted ones."""
    rows = await conn.fetch(f"SELECT {_PRODUCT_COLS} FROM products WHERE deleted_at IS NULL ORDER BY created_at, id")
    return [p for p in map(_product, rows) if p is not None]


async def rotate_product_key(conn: asyncpg.Connection, product_id: str, key_hash: str, overlap_s: int) -> bool:
    """The new key's hash becomes current; the replaced one stays valid for `overlap_s` seconds (0: not
    at all). A key an earlier rotation kept valid is dropped at once. False when unknown or deleted."""
    done = await conn.fetchval(
        "UPDATE products SET api_key_hash = $2, "
        "previous_key_hash = CASE WHEN $3::int > 0 THEN api_key_hash END, "
        "previous_key_expires_at = CASE WHEN $3::int > 0 THEN now() + make_interval(secs => $3::int) END "
        "WHERE id = $1 AND deleted_at IS NULL RETURNING 1",
        product_id, key_hash, overlap_s,
    )
    return done is not None


async def mark_product_deleted(
    conn: asyncpg.Connection, product_id: str, owner: int | None, ttl_s: float
) -> tuple[ProductRow, bool] | None:
    """Mark the product deleted (from now on it authenticates no key and is not found), the delete
    carried out by `owner` for at most `ttl_s` (owner None: left to the reconciler). A product already
    marked keeps its mark and is handed to `owner`. Returns (product, whether this call marked it);
    None when unknown. Two statements: call it in a transaction."""
    was = await conn.fetchrow("SELECT deleted_at FROM products WHERE id = $1 FOR UPDATE", product_id)
    if was is None:
        return None
    r = await conn.fetchrow(
        f"UPDATE products SET deleted_at = coalesce(deleted_at, now()), delete_owner = $2, "
        f"delete_deadline = now() + make_interval(secs => $3) WHERE id = $1 RETURNING {_PRODUCT_COLS}",
        product_id, owner, ttl_s,
    )
    product = _product(r)
    assert product is not None  # locked above
    return product, was["deleted_at"] is None


async def release_product_delete(conn: asyncpg.Connection, product_id: str, owner: int) -> None:
    """`owner` stops carrying the delete out: the reconciler finishes it on its next pass."""
    await conn.execute("UPDATE products SET delete_owner = NULL WHERE id = $1 AND delete_owner = $2 "
                       "AND deleted_at IS NOT NULL", product_id, owner)


async def deletes_to_finish(conn: asyncpg.Connection) -> list[str]:
    """Deleted products nobody is deleting: no owner, an owner whose process is gone, or a delete
    past its deadline."""
    rows = await conn.fetch(
        f"SELECT id::text AS id FROM products WHERE deleted_at IS NOT NULL AND (delete_owner IS NULL "
        f"OR delete_deadline < now() OR {_owner_gone('products.delete_owner')}) ORDER BY deleted_at, id",
    )
    return [r["id"] for r in rows]


async def remove_deleted_product(conn: asyncpg.Connection, product_id: str) -> int | None:
    """Delete a deleted product's row once it has no engine left: its webhook cascades and its
    rate-limit leases go too; its audit rows and state seconds stay. Returns the number of engines
    left (0: the row is gone), None when there was no such deleted product.

    Call it in a transaction: the product's row lock (the one provisions take, see lock_product) is
    held from the count to the delete, so no engine row is inserted in between."""
    if await conn.fetchval("SELECT 1 FROM products WHERE id = $1 AND deleted_at IS NOT NULL FOR UPDATE",
                           product_id) is None:
        return None
    left = await count_engines(conn, product_id)
    if left == 0:
        await conn.execute("DELETE FROM rate_leases WHERE product_id = $1", product_id)  # no foreign key either
        await conn.execute("DELETE FROM products WHERE id = $1", product_id)
    return left


async def product_engines(conn: asyncpg.Connection, product_id: str, deployment: str) -> list[EngineRow]:
    """Every engine of the product in this deployment, its warm pool included."""
    rows = await conn.fetch(f"SELECT {_ENGINE_COLS} FROM engines WHERE product_id = $1 AND deployment = $2 "
                            f"ORDER BY created_at, id", product_id, deployment)
    return [e for e in map(_engine, rows) if e is not None]


async def lock_product(conn: asyncpg.Connection, product_id: str) -> None:
    """Row-lock the product: serialises quota checks of one product."""
    await conn.execute("SELECT 1 FROM products WHERE id = $1 FOR UPDATE", product_id)


async def count_engines(conn: asyncpg.Connection, product_id: str) -> int:
    """Every engine of the product, its warm pool included."""
    return int(await conn.fetchval("SELECT count(*) FROM engines WHERE product_id = $1", product_id))


@dataclass(frozen=True, slots=True)
class EngineBrief:
    """The columns admit answers with when the engine runs."""

    id: str
    status: EngineState
    url: str | None
    engine_version: str
    engine_key_enc: str
    created_at: datetime
    last_health_at: datetime | None
    idle_sleep: str = "auto"


@dataclass(frozen=True, slots=True)
class AdmitLookup:
    product_id: str
    slug: str
    policy_text: str  # raw JSON: callers cache its parse
    engine: EngineBrief | None


async def admit_lookup(conn: asyncpg.Connection, key_hash: str, user_id: str) -> AdmitLookup | None:
    """Authenticate the product and find its user's engine in one round trip (the hot path:
    only the columns admit needs, ids cast server-side)."""
    r = await conn.fetchrow(
        "SELECT p.id::text AS p_id, p.slug, p.policy::text AS policy, e.id::text AS e_id, e.status, e.url, "
        "e.engine_version, e.engine_key_enc, e.created_at, e.last_health_at, e.idle_sleep FROM products p "
        f"LEFT JOIN engines e ON e.product_id = p.id AND e.user_id = $2 WHERE {_KEY_MATCHES}",
        key_hash, user_id,
    )
    if r is None:
        return None
    engine = None
    if r["e_id"] is not None:
        engine = EngineBrief(r["e_id"], EngineState(r["status"]), r["url"], r["engine_version"],
                             r["engine_key_enc"], r["created_at"], r["last_health_at"], r["idle_sleep"])
    return AdmitLookup(r["p_id"], r["slug"], r["policy"], engine)


async def get_engine(conn: asyncpg.Connection, product_id: str, user_id: str) -> EngineRow | None:
    sql = f"SELECT {_ENGINE_COLS} FROM engines WHERE product_id = $1 AND user_id = $2"
    return _engine(await conn.fetchrow(sql, product_id, user_id))


async def get_engine_by_id(conn: asyncpg.Connection, engine_id: str) -> EngineRow | None:
    return _engine(await conn.fetchrow(f"SELECT {_ENGINE_COLS} FROM engines WHERE id = $1", engine_id))


async def insert_engine(
    conn: asyncpg.Connection, *, id: str, product_id: str, user_id: str, port: int, url: str,
    engine_version: str, api_key_hash: str, engine_key_enc: str, op_owner: int, op_ttl_s: float,
    deployment: str = "default", pool: bool = False, op: str = "provision",
) -> EngineRow | None:
    """Insert a `provisioning` row holding `op`; None if the user has one, or if the product is deleted
    (a provision that authenticated just before the delete started: no engine is born after the mark)."""
    r = await conn.fetchrow(
        f"INSERT INTO engines (id, product_id, user_id, status, port, url, engine_version, api_key_hash, "
        f"engine_key_enc, op, op_owner, op_deadline, deployment, pool) SELECT $1,$2,$3,'provisioning',$4,$5,$6,"
        f"$7,$8,$13,$9, now() + make_interval(secs => $10), $11, $12 "
        f"WHERE EXISTS (SELECT 1 FROM products WHERE id = $2 AND deleted_at IS NULL) "
        f"ON CONFLICT (product_id, user_id) DO NOTHING RETURNING {_ENGINE_COLS}",
        id, product_id, user_id, port, url, engine_version, api_key_hash, engine_key_enc, op_owner, op_ttl_s,
        deployment, pool, op,
    )
    return _engine(r)


async def allocate_port(conn: asyncpg.Connection, low: int, high: int, avoid: Sequence[int] = ()) -> int | None:
    """Lowest port in [low, high] no engine holds (locked until the transaction ends)."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _PORT_LOCK)
    port = await conn.fetchval(
        "SELECT p FROM generate_series($1::int, $2::int) AS p WHERE p <> ALL($3::int[]) "
        "AND NOT EXISTS (SELECT 1 FROM engines WHERE port = p) ORDER BY p LIMIT 1",
        low, high, list(avoid),
    )
    return None if port is None else int(port)


# An op's owner is gone when its liveness lock (see lifecycle/owner.py) is not held - but right
# after a Postgres restart no lock is held until each live process has re-taken its own (every
# 2 s), so takeovers by liveness wait until the server has been up for OWNER_GRACE_S.
OWNER_GRACE_S = 6


def _owner_gone(column: str) -> str:
    """SQL: the owner id in `column` holds no liveness lock (and the grace above has passed)."""
    return ("(NOT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND classid = 7415004 "
            f"AND objid = {column}::oid AND objsubid = 2) "
            f"AND pg_postmaster_start_time() < now() - interval '{OWNER_GRACE_S} seconds')")


_OWNER_GONE = _owner_gone("engines.op_owner")


async def claim_op(
    conn: asyncpg.Connection, engine_id: str, op: str, owner: int, ttl_s: float
) -> EngineRow | None:
    """Mark an operation in progress on the engine unless another live one holds it.

    An op whose deadline passed, or whose owner process no longer holds its liveness
    lock, is taken over. Returns the row, or None when busy (or gone)."""
    r = await conn.fetchrow(
        f"UPDATE engines SET op = $2, op_owner = $3, op_deadline = now() + make_interval(secs => $4), "
        f"updated_at = now() WHERE id = $1 AND (op IS NULL OR op_deadline < now() OR {_OWNER_GONE}) "
        f"RETURNING {_ENGINE_COLS}",
        engine_id, op, owner, ttl_s,
    )
    return _engine(r)


async def update_claimed(conn: asyncpg.Connection, engine_id: str, owner: int, op: str, /,
                         **values: object) -> EngineRow | None:
    """update_engine, only while `owner` still holds `op` on the row (None once taken over).
    Positional-only, so `op=None` among the values releases it."""
    cols = list(values)
    sets = ", ".join(f"{c} = ${i + 4}" for i, c in enumerate(cols))
    r = await conn.fetchrow(
        f"UPDATE engines SET {sets}, updated_at = now() WHERE id = $1 AND op_owner = $2 AND op = $3 "
        f"RETURNING {_ENGINE_COLS}",
        engine_id, owner, op, *[str(v) if isinstance(v, EngineState) else v for v in values.values()],
    )
    return _engine(r)


async def delete_claimed(conn: asyncpg.Connection, engine_id: str, owner: int, op: str) -> bool:
    """Delete the row while `owner` still holds `op` on it. False once taken over (or gone)."""
    done = await conn.fetchval("DELETE FROM engines WHERE id = $1 AND op_owner = $2 AND op = $3 RETURNING 1",
                               engine_id, owner, op)
    return done is not None


async def expire_op(conn: asyncpg.Connection, engine_id: str, owner: int, op: str) -> None:
    """Hand an op that ended in an unknown state to the reconciler: its deadline is now past."""
    await conn.execute("UPDATE engines SET op_deadline = now() - interval '1 second' "
                       "WHERE id = $1 AND op_owner = $2 AND op = $3", engine_id, owner, op)


async def update_engine(conn: asyncpg.Connection, engine_id: str, **values: object) -> EngineRow | None:
    """Set columns (status, op=None to release, ...) and bump updated_at."""
    cols = list(values)
    sets = ", ".join(f"{c} = ${i + 2}" for i, c in enumerate(cols))
    r = await conn.fetchrow(
        f"UPDATE engines SET {sets}, updated_at = now() WHERE id = $1 RETURNING {_ENGINE_COLS}",
        engine_id, *[str(v) if isinstance(v, EngineState) else v for v in values.values()],
    )
    return _engine(r)


async def delete_engine(conn: asyncpg.Connection, engine_id: str) -> None:
    await conn.execute("DELETE FROM engines WHERE id = $1", engine_id)


async def list_engines(
    conn: asyncpg.Connection, product_id: str, status: str | None, limit: int, offset: int
) -> tuple[list[EngineRow], int]:
    """A product's users' engines (never its warm pool), oldest first, and their total."""
    rows = await conn.fetch(
        f"SELECT {_ENGINE_COLS}, count(*) OVER () AS total FROM engines WHERE product_id = $1 AND NOT pool "
        f"AND ($2::text IS NULL OR status = $2) ORDER BY created_at, id LIMIT $3 OFFSET $4",
        product_id, status, limit, offset,
    )
    if rows:
        total = int(rows[0]["total"])
    else:
        total = int(await conn.fetchval(
            "SELECT count(*) FROM engines WHERE product_id = $1 AND NOT pool AND ($2::text IS NULL OR status = $2)",
            product_id, status,
        ))
    engines = [_engine({k: v for k, v in r.items() if k != "total"}) for r in rows]
    return [e for e in engines if e is not None], total


async def count_by_status(conn: asyncpg.Connection, product_id: str) -> dict[str, int]:
    rows = await conn.fetch("SELECT status, count(*) AS n FROM engines WHERE product_id = $1 AND NOT pool "
                            "GROUP BY status", product_id)
    return {r["status"]: int(r["n"]) for r in rows}


async def count_by_product_status(conn: asyncpg.Connection) -> list[tuple[str, str, int]]:
    rows = await conn.fetch("SELECT product_id, status, count(*) AS n FROM engines WHERE NOT pool GROUP BY 1, 2")
    return [(r["product_id"], r["status"], int(r["n"])) for r in rows]


async def engines_in_states(
    conn: asyncpg.Connection, deployment: str, states: Sequence[EngineState]
) -> list[EngineRow]:
    rows = await conn.fetch(f"SELECT {_ENGINE_COLS} FROM engines WHERE deployment = $1 AND status = ANY($2::text[])",
                            deployment, [str(s) for s in states])
    return [e for e in map(_engine, rows) if e is not None]


async def all_engines(conn: asyncpg.Connection, deployment: str) -> list[EngineRow]:
    rows = await conn.fetch(f"SELECT {_ENGINE_COLS} FROM engines WHERE deployment = $1", deployment)
    return [e for e in map(_engine, rows) if e is not None]


async def touch_activity(conn: asyncpg.Connection, engine_ids: Sequence[str], times: Sequence[datetime]) -> None:
    """Batch-advance last_active_at (never moves it backwards)."""
    await conn.execute(
        "UPDATE engines SET last_active_at = v.t FROM unnest($1::uuid[], $2::timestamptz[]) AS v(id, t) "
        "WHERE engines.id = v.id AND (engines.last_active_at IS NULL OR engines.last_active_at < v.t)",
        list(engine_ids), list(times),
    )


async def record_health_ok(conn: asyncpg.Connection, engine_ids: Sequence[str]) -> None:
    """Batch: probes passed now."""
    if engine_ids:
        await conn.execute(
            "UPDATE engines SET last_health_at = now(), health_failures = 0 WHERE id = ANY($1::uuid[])",
            list(engine_ids),
        )


async def bump_health_failures(conn: asyncpg.Connection, engine_ids: Sequence[str]) -> dict[str, int]:
    """Batch: one more consecutive failure each; returns the new counts."""
    if not engine_ids:
        return {}
    rows = await conn.fetch(
        "UPDATE engines SET health_failures = health_failures + 1 WHERE id = ANY($1::uuid[]) "
        "AND status = 'running' RETURNING id, health_failures",
        list(engine_ids),
    )
    return {r["id"]: int(r["health_failures"]) for r in rows}


async def due_restarts(conn: asyncpg.Connection, deployment: str, max_attempts: int) -> list[EngineRow]:
    rows = await conn.fetch(
        f"SELECT {_ENGINE_COLS} FROM engines WHERE deployment = $1 AND status = 'failed' "
        f"AND next_restart_at IS NOT NULL AND next_restart_at <= now() AND restart_attempts < $2 AND op IS NULL",
        deployment, max_attempts,
    )
    return [e for e in map(_engine, rows) if e is not None]


async def stale_ops(conn: asyncpg.Connection, deployment: str) -> list[EngineRow]:
    """Rows whose op deadline passed or whose owner process is gone."""
    rows = await conn.fetch(
        f"SELECT {_ENGINE_COLS} FROM engines WHERE deployment = $1 AND op IS NOT NULL AND (op_deadline < now() "
        f"OR {_OWNER_GONE})",
        deployment,
    )
    return [e for e in map(_engine, rows) if e is not None]


async def count_warm(conn: asyncpg.Connection, product_id: str) -> int:
    """Pool engines ready to be claimed."""
    return int(await conn.fetchval("SELECT count(*) FROM engines WHERE product_id = $1 AND pool "
                                   "AND status = 'running' AND op IS NULL", product_id))


async def claim_pool_engine(
    conn: asyncpg.Connection, product_id: str, deployment: str, user_id: str, engine_version: str,
    pending_key_enc: str, owner: int, op: str, ttl_s: float,
) -> EngineRow | None:
    """Bind a ready pool engine to the user in one statement, holding `op` with the user's new key
    pending (so a crash before the key is pushed is finished by the reconciler). Concurrent claims
    skip each other's locked rows: no engine is ever bound twice. None when the pool is empty."""
    r = await conn.fetchrow(
        f"UPDATE engines SET user_id = $2, pool = false, pending_key_enc = $4, op = $5, op_owner = $6, "
        f"op_deadline = now() + make_interval(secs => $7), updated_at = now() "
        f"WHERE id = (SELECT id FROM engines WHERE product_id = $1 AND pool AND status = 'running' "
        f"AND op IS NULL AND engine_version = $3 AND deployment = $8 ORDER BY created_at, id LIMIT 1 "
        f"FOR UPDATE SKIP LOCKED) RETURNING {_ENGINE_COLS}",
        product_id, user_id, engine_version, pending_key_enc, op, owner, ttl_s, deployment,
    )
    return _engine(r)


async def pool_engines(conn: asyncpg.Connection, deployment: str) -> list[EngineRow]:
    rows = await conn.fetch(f"SELECT {_ENGINE_COLS} FROM engines WHERE deployment = $1 AND pool "
                            f"ORDER BY created_at, id", deployment)
    return [e for e in map(_engine, rows) if e is not None]


async def products_with_pool(conn: asyncpg.Connection) -> list[ProductRow]:
    """Products whose policy asks for a warm pool (never a deleted one: its pool is not refilled)."""
    rows = await conn.fetch(f"SELECT {_PRODUCT_COLS} FROM products WHERE deleted_at IS NULL "
                            f"AND jsonb_typeof(policy->'warm_pool') = 'number' AND (policy->>'warm_pool')::int > 0")
    return [p for p in map(_product, rows) if p is not None]


async def count_pool_by_product(conn: asyncpg.Connection) -> list[tuple[str, str, int]]:
    """(product id, status, n) of the warm-pool engines, for the operators' metrics."""
    rows = await conn.fetch("SELECT product_id, status, count(*) AS n FROM engines WHERE pool GROUP BY 1, 2")
    return [(r["product_id"], r["status"], int(r["n"])) for r in rows]
