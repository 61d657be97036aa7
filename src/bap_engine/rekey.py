"""Master-key rotation: re-seal every value sealed with the master key under the new one.

What is sealed (see the migrations): `engines.engine_key_enc`, `engines.pending_key_enc` (a key
rotation or a warm-pool claim in flight) and `webhooks.secret_enc`. `rekey` reads each table in
batches (keyset by id, in id order) with a `KeySealer` that holds the new key and the previous one,
and writes each batch back in one conditional UPDATE (one short transaction):

- a value that opens with the new key alone is already current and left as it is, so a run that
  was interrupted is simply run again;
- a value that opens only with the previous key is re-sealed under the new one; the row is written
  only if it still holds exactly the values that were read (`... WHERE id = $1 AND engine_key_enc =
  $old ...`), so a concurrent provision, rotate-key or webhook PUT is never overwritten;
- an engine row with an op in flight (`op IS NOT NULL`) is not written either: the op's holder may
  still commit a value it copied from the row (a pending key becomes the engine key), and that copy
  would undo the re-sealing;
- a row found changed or busy is re-read and retried after the pass over its table, with a growing
  delay, for at most `retry_s`; what still changes after that is left for the next run;
- a value that opens with neither key is reported by table and id (never the value) and left as it
  is.

The API keeps answering meanwhile: its replicas open values under either key (ORCH_MASTER_KEY and
ORCH_MASTER_KEY_PREVIOUS) and seal new ones under the new key. No key, token or plaintext is ever
logged, returned or put in an error message here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import asyncpg

from bap_engine.keys import KeySealer

__all__ = ["Table", "TABLES", "TableReport", "RekeyReport", "RekeyError", "rekey", "missing_columns",
           "BATCH_SIZE", "RETRY_S"]

BATCH_SIZE = 500
RETRY_S = 30.0
_RETRY_DELAYS_S = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)  # then 4 s each, within the retry budget


class RekeyError(Exception):
    """The rotation cannot run here (the schema lacks a sealed column); the message names no value."""


@dataclass(frozen=True, slots=True)
class Table:
    """A table holding sealed values: its key column, its sealed columns (nullable ones may be NULL),
    and the condition under which a row may be written at all."""

    name: str
    id_column: str
    columns: tuple[str, ...]
    writable: str = "true"


TABLES = (
    Table("engines", "id", ("engine_key_enc", "pending_key_enc"), writable="t.op IS NULL"),
    Table("webhooks", "product_id", ("secret_enc",)),
)


@dataclass(slots=True)
class TableReport:
    """What a run did to one table (cumulative: `on_batch` sees it grow)."""

    table: str
    read: int = 0  # rows read by the pass (retries not counted again)
    reencrypted: int = 0  # rows written with their values re-sealed under the new key
    current: int = 0  # rows whose every value already opened with the new key alone
    changed: int = 0  # rows found changed (or busy with an op) at least once: re-read and retried
    left: list[str] = field(default_factory=list)  # ids still changing after the retries: the next run
    unreadable: list[str] = field(default_factory=list)  # ids with a value neither key opens
    batches: int = 0

    def as_dict(self) -> dict[str, object]:
        return {"read": self.read, "reencrypted": self.reencrypted, "current": self.current,
                "changed": self.changed, "left": list(self.left), "unreadable": list(self.unreadable)}


@dataclass(slots=True)
class RekeyReport:
    tables: list[TableReport]

    @property
    def reencrypted(self) -> int:
        return sum(t.reencrypted for t in self.tables)

    @property
    def current(self) -> int:
        return sum(t.current for t in self.tables)

    @property
    def changed(self) -> int:
        return sum(t.changed for t in self.tables)

    @property
    def left(self) -> list[tuple[str, str]]:
        return [(t.table, i) for t in self.tables for i in t.left]

    @property
    def unreadable(self) -> list[tuple[str, str]]:
        return [(t.table, i) for t in self.tables for i in t.unreadable]

    @property
    def complete(self) -> bool:
        """Every value now opens with the new key alone (as far as this run could see)."""
        return not self.left and not self.unreadable

    def as_dict(self) -> dict[str, object]:
        return {"complete": self.complete, "reencrypted": self.reencrypted, "current": self.current,
                "changed": self.changed,
                "left": [{"table": t, "id": i} for t, i in self.left],
                "unreadable": [{"table": t, "id": i} for t, i in self.unreadable],
                "tables": {t.table: t.as_dict() for t in self.tables}}


OnBatch = Callable[[TableReport], None]
BeforeWrite = Callable[[str, list[str]], Awaitable[None]]  # (table, ids about to be written): a test seam


@dataclass(frozen=True, slots=True)
class _Write:
    id: str
    old: tuple[str | None, ...]
    new: tuple[str | None, ...]


async def missing_columns(pool: asyncpg.Pool, tables: Sequence[Table] = TABLES) -> list[str]:
    """`table.column` of every sealed column this database lacks (not migrated: run `bap-engine migrate`)."""
    wanted = [(t.name, c) for t in tables for c in (t.id_column, *t.columns)]
    rows = await pool.fetch(
        "SELECT table_name::text AS t, column_name::text AS c FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = ANY($1::text[])", [t.name for t in tables])
    present = {(r["t"], r["c"]) for r in rows}
    return [f"{t}.{c}" for t, c in wanted if (t, c) not in present]


async def rekey(
    pool: asyncpg.Pool, sealer: KeySealer, *, batch_size: int = BATCH_SIZE, pause_s: float = 0.0,
    retry_s: float = RETRY_S, on_batch: OnBatch | None = None, before_write: BeforeWrite | None = None,
    tables: Sequence[Table] = TABLES,
) -> RekeyReport:
    """Re-seal every sealed value under the sealer's current key (see the module docstring).

    `pause_s` is waited between batches (to spread the load); `on_batch` is called after each batch
    with the table's running report. Raises RekeyError when the schema lacks a sealed column, and
    whatever asyncpg raises when the database fails (a re-run resumes)."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    missing = await missing_columns(pool, tables)
    if missing:
        raise RekeyError(f"the database has no {', '.join(missing)}: run `bap-engine migrate` first")
    report = RekeyReport([])
    for table in tables:
        progress = TableReport(table.name)
        report.tables.append(progress)
        await _pass(pool, sealer, table, progress, batch_size, pause_s, on_batch, before_write)
    for progress, table in zip(report.tables, tables, strict=True):
        await _retry(pool, sealer, table, progress, retry_s, before_write)
        if on_batch is not None and progress.changed:
            on_batch(progress)
    return report


def _select(table: Table) -> str:
    cols = ", ".join(f"t.{c}" for c in table.columns)
    return (f"SELECT t.{table.id_column}::text AS id, {cols}, NOT ({table.writable}) AS busy "
            f"FROM {table.name} t")


def _update(table: Table) -> str:
    n = len(table.columns)
    olds = [f"${i + 2}::text[]" for i in range(n)]
    news = [f"${i + 2 + n}::text[]" for i in range(n)]
    names = ", ".join([f"o{i}" for i in range(n)] + [f"n{i}" for i in range(n)])
    sets = ", ".join(f"{c} = v.n{i}" for i, c in enumerate(table.columns))
    same = " AND ".join(f"t.{c} IS NOT DISTINCT FROM v.o{i}" for i, c in enumerate(table.columns))
    return (f"UPDATE {table.name} t SET {sets} FROM unnest($1::text[], {', '.join(olds + news)}) "
            f"AS v(id, {names}) WHERE t.{table.id_column} = v.id::uuid AND {same} AND {table.writable} "
            f"RETURNING t.{table.id_column}::text AS id")


def _plan(sealer: KeySealer, table: Table, row: asyncpg.Record) -> _Write | str:
    """The write a row needs, or its verdict: "current", "unreadable", "busy"."""
    old = tuple(row[c] for c in table.columns)
    new: list[str | None] = []
    for value in old:
        if value is None:
            new.append(None)
            continue
        try:
            sealed = sealer.reseal(value)
        except ValueError:
            return "unreadable"
        new.append(value if sealed is None else sealed)
    if tuple(new) == old:
        return "current"
    if row["busy"]:
        return "busy"
    return _Write(row["id"], old, tuple(new))


async def _write(pool: asyncpg.Pool, table: Table, writes: list[_Write]) -> set[str]:
    """One conditional UPDATE of the batch; the ids it wrote."""
    if not writes:
        return set()
    n = len(table.columns)
    args: list[list[str | None]] = [[w.id for w in writes]]
    args += [[w.old[i] for w in writes] for i in range(n)]
    args += [[w.new[i] for w in writes] for i in range(n)]
    rows = await pool.fetch(_update(table), *args)
    return {r["id"] for r in rows}


async def _apply(pool: asyncpg.Pool, sealer: KeySealer, table: Table, rows: list[asyncpg.Record],
                 progress: TableReport, before_write: BeforeWrite | None) -> list[str]:
    """Plan and write a batch; count what is settled; the ids to retry (changed or busy)."""
    writes: list[_Write] = []
    again: list[str] = []
    for row in rows:
        verdict = _plan(sealer, table, row)
        if isinstance(verdict, _Write):
            writes.append(verdict)
        elif verdict == "current":
            progress.current += 1
        elif verdict == "unreadable":
            progress.unreadable.append(row["id"])
        else:
            again.append(row["id"])
    if writes and before_write is not None:
        await before_write(table.name, [w.id for w in writes])
    done = await _write(pool, table, writes)
    progress.reencrypted += len(done)
    again += [w.id for w in writes if w.id not in done]
    return again


async def _pass(pool: asyncpg.Pool, sealer: KeySealer, table: Table, progress: TableReport, batch_size: int,
                pause_s: float, on_batch: OnBatch | None, before_write: BeforeWrite | None) -> None:
    select = _select(table)
    after: str | None = None
    retry: list[str] = []
    while True:
        if after is None:
            rows = await pool.fetch(f"{select} ORDER BY t.{table.id_column} LIMIT $1", batch_size)
        else:
            rows = await pool.fetch(f"{select} WHERE t.{table.id_column} > $1::text::uuid "
                                    f"ORDER BY t.{table.id_column} LIMIT $2", after, batch_size)
        if not rows:
            break
        progress.read += len(rows)
        progress.batches += 1
        again = await _apply(pool, sealer, table, list(rows), progress, before_write)
        progress.changed += len(again)
        retry += again
        progress.left = list(retry)  # until retried: what a kill now would leave
        if on_batch is not None:
            on_batch(progress)
        after = rows[-1]["id"]
        if len(rows) < batch_size:
            break
        if pause_s > 0:
            await asyncio.sleep(pause_s)


async def _retry(pool: asyncpg.Pool, sealer: KeySealer, table: Table, progress: TableReport, retry_s: float,
                 before_write: BeforeWrite | None) -> None:
    """Re-read the rows found changed or busy and try them again, until settled or out of time."""
    ids = list(progress.left)
    deadline = time.monotonic() + retry_s
    attempt = 0
    while ids:
        delay = _RETRY_DELAYS_S[min(attempt, len(_RETRY_DELAYS_S) - 1)]
        if time.monotonic() + delay > deadline:
            break
        await asyncio.sleep(delay)
        attempt += 1
        rows = await pool.fetch(f"{_select(table)} WHERE t.{table.id_column} = ANY($1::text[]::uuid[]) "
                                f"ORDER BY t.{table.id_column}", ids)  # a row gone meanwhile is settled
        ids = await _apply(pool, sealer, table, list(rows), progress, before_write)
        progress.left = list(ids)
    progress.left = ids
