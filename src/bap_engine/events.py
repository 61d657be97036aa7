"""Lifecycle events: one hub per process turns audit rows into the live stream of `GET /events`.

Every audit row but `health_check` and `admit_denied` is an event. A trigger on `audit_log` runs
`pg_notify('bap_events', '')` for each one, delivered at commit. The hub (one per replica) owns one
dedicated connection that LISTENs on that channel; a notification only wakes it up. Its supervised
loop (`events-listener`) then reads every row past its cursor with a pooled connection, in id order,
and pushes each new event into the bounded queue of every subscriber of that event's product. It
reads every ~1 s anyway, so a lost notification, or the time the listener was down (Postgres
restarted, its session terminated: it reconnects with backoff, logging once), never loses an event:
the read is cursor-based, and the catch-up read after a reconnect finds everything. Only the hub
queries for live events, never a consumer.

The cursor, `safe_id`: every audit row with an id <= safe_id is committed (or will never exist) and
was fanned out. Ids come from a sequence, and transactions commit out of order: id 10 can become
visible after id 11. So the hub never moves past an id that may still commit:

- Each read (`id > safe_id ORDER BY id`, every action, since hidden rows fill the sequence too) also
  returns the statement's own snapshot (`pg_current_snapshot()`). Walking the ids from safe_id + 1,
  at the first missing id g (a gap) it stops: rows below g are delivered, safe_id becomes g - 1, and
  the gap is held with that snapshot and `upto`, the last id the read saw.
- While the gap is held the hub reads again every ~50 ms. When every transaction in progress in the
  gap's snapshot has finished (`pg_xact_status` of each of `pg_snapshot_xip`), it reads once more, so a row
  committed in between is now visible. The ids <= upto still missing are then dead (rolled back,
  or an `ON CONFLICT` insert that used a sequence value without a row) and the hub moves past them.
  This is done twice, the second time with the snapshot of that re-read: a transaction takes its
  sequence value a moment before it has a transaction id, so the first snapshot may not list it yet;
  50 ms later it does. A rollback is thus released in ~100 ms; concurrent writers cost latency only
  while a gap is open.
- A gap is held at most `gap_max_s` (5 s) in any case (a long transaction holding an id): then it is
  released with a warning, and a row that commits later with an id below safe_id is not streamed.
- At start, safe_id is the largest id, once every transaction in progress then has ended (twice
  again, at most gap_max_s), so nothing below it may still commit.

Subscribers: `subscribe(product_id)` registers a bounded queue and notes `start_id` (safe_id at that
moment: the consumer's live events are those past it). A consumer resuming after an id reads the
history `after_id < id <= start_id` from the database in pages (`history`), then its queued live
events. A subscriber whose queue overflows is closed: its stream ends once it has read what is queued
(at once if still reading its history), and its client resumes with Last-Event-ID: memory stays
bounded. The webhook worker waits on `wait_past`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from bap_engine.audit import NOT_EVENTS, event_json

__all__ = ["EventHub", "Event", "Subscription", "CHANNEL", "HIDDEN_ACTIONS", "QUEUE_MAX"]

log = logging.getLogger("bap_engine.events")

CHANNEL = "bap_events"
HIDDEN_ACTIONS = NOT_EVENTS  # audit rows that are not events
QUEUE_MAX = 10_000  # events queued for one subscriber before it is closed
_PAGE = 1000  # rows per hub read
_HISTORY_PAGE = 500  # rows per history read of one consumer
_PING_S = 15.0  # the listener's connection is checked this often (a half-open socket notifies nothing)
_CONNECT_TIMEOUT_S = 5.0
_DB_DOWN = (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.OperatorInterventionError,
            asyncpg.TooManyConnectionsError, asyncpg.InterfaceError, asyncpg.InternalClientError)

_COLUMNS = "id, timestamp, product_id, user_id, engine_id, action, actor, metadata"
# One statement, so one snapshot: the rows and the snapshot they were read with (a row even when none).
_READ = (
    f"SELECT s.snap, a.* FROM (SELECT pg_current_snapshot()::text AS snap) s LEFT JOIN LATERAL "
    f"(SELECT {_COLUMNS} FROM audit_log WHERE id > $1 ORDER BY id LIMIT $2) a ON true ORDER BY a.id"
)
_FINISHED = ("SELECT coalesce(bool_and(pg_xact_status(x) IS DISTINCT FROM 'in progress'), true) "
             "FROM pg_snapshot_xip($1::text::pg_snapshot) AS x")  # a set-returning function
_HISTORY = (
    f"SELECT {_COLUMNS} FROM audit_log WHERE product_id = $1 AND id > $2 AND id <= $3 "
    "AND action <> ALL($4::text[]) ORDER BY id LIMIT $5"
)


@dataclass(slots=True, eq=False)
class Event:
    """One audit row as an event; `frame` is its SSE encoding, made once by the API for all consumers."""

    id: int
    timestamp: datetime
    product_id: str | None
    user_id: str | None
    engine_id: str | None
    action: str
    actor: str
    metadata: dict[str, object]
    frame: bytes | None = None

    def json(self) -> bytes:
        """The event's JSON: an SSE frame's `data`, the same bytes a webhook signs."""
        return event_json(self.id, self.timestamp, self.action, self.user_id, self.engine_id, self.actor,
                          self.metadata)


def _event(r: asyncpg.Record) -> Event:
    return Event(r["id"], r["timestamp"], r["product_id"], r["user_id"], r["engine_id"], r["action"], r["actor"],
                 r["metadata"])


class Subscription:
    """One consumer's bounded queue of live events of one product."""

    def __init__(self, hub: EventHub, product_id: str, start_id: int, limit: int) -> None:
        self.product_id = product_id
        self.start_id = start_id  # the hub's safe_id when it registered: live events are past it
        self.closed = False
        self.overflowed = False
        self._hub = hub
        self._limit = limit
        self._queue: deque[Event] = deque()
        self._ready = asyncio.Event()

    def push(self, event: Event) -> None:
        if self.closed:
            return
        if len(self._queue) >= self._limit:
            self.overflowed = True
            log.warning("event consumer too slow; closing its stream", extra={"product_id": self.product_id,
                                                                               "queued": len(self._queue)})
            self.close(drain=True)
            return
        self._queue.append(event)
        self._ready.set()

    async def next_batch(self, timeout: float) -> list[Event] | None:
        """The queued events, oldest first, as soon as there is one; [] after `timeout` with none;
        None once closed (after what was queued, if it was closed for overflowing)."""
        if not self._queue and not self.closed:
            try:
                async with asyncio.timeout(timeout):
                    await self._ready.wait()
            except TimeoutError:
                return []
        if self._queue:
            batch = list(self._queue)
            self._queue.clear()
            self._ready.clear()
            return batch
        return None

    def close(self, *, drain: bool = False) -> None:
        """Unregister; `next_batch` then answers None (after the queued events if `drain`)."""
        if not drain:
            self._queue.clear()
        self.closed = True
        self._ready.set()
        self._hub._unsubscribe(self)


@dataclass(slots=True)
class _Gap:
    first: int  # the first missing id
    upto: int  # the last id the read that found it saw: the missing ids it covers are <= upto
    snap: str  # the snapshot of that read (then of the re-read, for the second round)
    since: float  # monotonic time it was found
    rounds: int = 0  # rounds completed (every transaction of `snap` had finished)


class EventHub:
    """See the module docstring. `start()` once, then `run()` as the supervised task `events-listener`."""

    def __init__(self, pool: asyncpg.Pool, dsn: str, *, poll_s: float = 1.0, gap_check_s: float = 0.05,
                 gap_max_s: float = 5.0, queue_max: int = QUEUE_MAX) -> None:
        self._pool = pool
        self._dsn = dsn
        self._poll_s = poll_s
        self._gap_check_s = gap_check_s
        self._gap_max_s = gap_max_s
        self._queue_max = queue_max
        self._safe_id = 0
        self._dead_upto = 0  # a missing id <= this is dead (its gap was released)
        self._gap: _Gap | None = None
        self._subs: dict[str, set[Subscription]] = {}
        self._wake = asyncio.Event()  # a notification came, or the listener was lost
        self._advanced = asyncio.Event()  # replaced after each advance of safe_id, the old one set
        self._closed = False
        self._listener: asyncpg.Connection | None = None
        self._listener_warned = False
        self._listen_failures = 0
        self._next_connect = 0.0
        self._next_ping = 0.0
        self._read_warned = False
        self._read_failures = 0

    # ---- the interface of consumers (the SSE route, the webhook worker) -----------------
    @property
    def safe_id(self) -> int:
        """Every audit row with an id <= safe_id is committed (or never will be) and was fanned out."""
        return self._safe_id

    @property
    def listener_pid(self) -> int | None:
        """The Postgres backend pid of the listening connection (None while it is down)."""
        conn = self._listener
        return None if conn is None or conn.is_closed() else int(conn.get_server_pid())

    @property
    def subscribers(self) -> int:
        return sum(len(s) for s in self._subs.values())

    async def wait_past(self, after_id: int, timeout: float) -> bool:
        """True as soon as safe_id > after_id; False after `timeout` (or once the hub is closed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._safe_id <= after_id:
            remaining = deadline - loop.time()
            if remaining <= 0 or self._closed:
                return False
            advanced = self._advanced
            try:
                async with asyncio.timeout(remaining):
                    await advanced.wait()
            except TimeoutError:
                return self._safe_id > after_id
        return True

    def subscribe(self, product_id: str) -> Subscription:
        """Register a consumer of the product's live events (those past its `start_id`)."""
        sub = Subscription(self, product_id, self._safe_id, self._queue_max)
        if self._closed:
            sub.closed = True
        else:
            self._subs.setdefault(product_id, set()).add(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.product_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.product_id]

    async def history(self, sub: Subscription, after_id: int) -> AsyncIterator[list[Event]]:
        """The product's events after `after_id` up to the subscriber's start_id, oldest first, in pages;
        it stops early once the subscription is closed. The database failing ends it with a warning and
        closes the subscription (the client resumes)."""
        last = after_id
        while last < sub.start_id and not sub.closed:
            try:
                async with self._pool.acquire(timeout=_CONNECT_TIMEOUT_S) as conn:
                    rows = await conn.fetch(_HISTORY, sub.product_id, last, sub.start_id, list(HIDDEN_ACTIONS),
                                            _HISTORY_PAGE, timeout=30)
            except _DB_DOWN as err:
                log.warning("event history read failed; ending the stream",
                            extra={"product_id": sub.product_id, "error": type(err).__name__})
                sub.close()
                return
            if not rows:
                return
            yield [_event(r) for r in rows]
            last = rows[-1]["id"]
            if len(rows) < _HISTORY_PAGE:
                return

    async def aclose(self) -> None:
        """End every subscriber's stream; wait_past answers False from now on."""
        self._closed = True
        for subs in list(self._subs.values()):
            for sub in list(subs):
                sub.close()
        self._subs.clear()
        self._advanced.set()

    # ---- the hub's own loop ----------------------------------------------------------------
    async def start(self) -> None:
        """The initial safe_id: the largest id, once the transactions in progress then have ended."""
        async with self._pool.acquire(timeout=_CONNECT_TIMEOUT_S) as conn:
            row = await conn.fetchrow("SELECT coalesce(max(id), 0) AS m, pg_current_snapshot()::text AS snap "
                                      "FROM audit_log")
            top, snap = int(row["m"]), str(row["snap"])
            deadline = time.monotonic() + self._gap_max_s
            for _ in range(2):
                while not await conn.fetchval(_FINISHED, snap):
                    if time.monotonic() >= deadline:
                        log.warning("events: transactions still in progress at start; not waiting longer",
                                    extra={"safe_id": top})
                        break
                    await asyncio.sleep(self._gap_check_s)
                snap = str(await conn.fetchval("SELECT pg_current_snapshot()::text"))
        self._safe_id = max(self._safe_id, top)

    async def run(self) -> None:
        """Supervised (`events-listener`): keep the listener up, read past the cursor on each
        notification, every poll_s anyway, and every gap_check_s while a gap is held. Ends only when
        cancelled; a database outage is retried here (logged once), a bug fails to the supervisor."""
        try:
            while True:
                await self._keep_listening()
                self._wake.clear()  # before the read: a notification during it means read again
                try:
                    more = await self._read()
                except _DB_DOWN as err:
                    self._read_failures += 1
                    if not self._read_warned:
                        self._read_warned = True
                        log.warning("events: reading the audit log failed; retrying",
                                    extra={"error": type(err).__name__})
                    await self._sleep(min(0.25 * 2 ** min(self._read_failures, 5), 5.0))
                    continue
                if self._read_warned:
                    self._read_warned = False
                    log.info("events: reading the audit log again", extra={"safe_id": self._safe_id})
                self._read_failures = 0
                if not more:
                    await self._sleep(self._gap_check_s if self._gap is not None else self._poll_s)
        finally:
            self._drop_listener()

    async def _sleep(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def _read(self) -> bool:
        """One read and its fan-out; True when a full page came back without a gap (read on)."""
        gap = self._gap
        round_done = False
        async with self._pool.acquire(timeout=_CONNECT_TIMEOUT_S) as conn:
            if gap is not None:
                if time.monotonic() - gap.since >= self._gap_max_s:
                    log.warning("events: an id gap outlived its bound; moving past it",
                                extra={"first_id": gap.first, "upto": gap.upto, "held_s": self._gap_max_s})
                    self._release(gap)
                elif await conn.fetchval(_FINISHED, gap.snap, timeout=10):
                    if gap.rounds >= 1:
                        self._release(gap)
                    else:
                        round_done = True
            rows = await conn.fetch(_READ, self._safe_id, _PAGE, timeout=30)
        snap = str(rows[0]["snap"])
        data = [r for r in rows if r["id"] is not None]
        expected = self._safe_id + 1
        fresh: list[Event] = []
        stop: int | None = None
        for r in data:
            rid = int(r["id"])
            if rid > expected and rid - 1 > self._dead_upto:  # a missing id that may still commit
                stop = expected = max(expected, self._dead_upto + 1)  # the ids before it are dead
                break
            if r["action"] not in HIDDEN_ACTIONS:
                fresh.append(_event(r))
            expected = rid + 1
        else:
            if len(data) < _PAGE:  # the missing ids at the end that are known dead
                expected = max(expected, self._dead_upto + 1)
        if stop is None:
            self._gap = None
        elif self._gap is not None and stop <= self._gap.upto:  # the same gap (or what is left of it)
            self._gap.first = stop
            if round_done:
                self._gap.snap = snap
                self._gap.rounds += 1
        else:
            self._gap = _Gap(stop, int(data[-1]["id"]), snap, time.monotonic())
        # fan-out and advance without an await between: a subscriber registering sees either both or none
        self._fan_out(fresh)
        if expected - 1 > self._safe_id:
            self._safe_id = expected - 1
            advanced, self._advanced = self._advanced, asyncio.Event()
            advanced.set()
        return stop is None and len(data) >= _PAGE

    def _release(self, gap: _Gap) -> None:
        self._dead_upto = max(self._dead_upto, gap.upto)
        self._gap = None

    def _fan_out(self, events: list[Event]) -> None:
        for event in events:
            subs = self._subs.get(event.product_id or "")
            if subs:
                for sub in list(subs):
                    sub.push(event)

    # ---- the listening connection ----------------------------------------------------------
    def _notified(self, conn: object, pid: int, channel: str, payload: object) -> None:
        self._wake.set()

    def _lost(self, conn: object) -> None:
        self._wake.set()  # reconnect (and catch up) now, not at the next poll

    async def _keep_listening(self) -> None:
        conn = self._listener
        now = time.monotonic()
        if conn is not None and not conn.is_closed():
            if now < self._next_ping:
                return
            self._next_ping = now + _PING_S
            try:
                # a no-op that keeps pg_stat_activity showing the session as the listener it is
                await conn.execute(f'LISTEN "{CHANNEL}"', timeout=_CONNECT_TIMEOUT_S)
                return
            except _DB_DOWN:
                pass
        if conn is not None:
            self._drop_listener()
            if not self._listener_warned:
                self._listener_warned = True
                log.warning("events: the listening connection was lost; reconnecting")
        if now < self._next_connect:
            return
        conn = None
        try:
            conn = await asyncpg.connect(self._dsn, timeout=_CONNECT_TIMEOUT_S)
            await conn.add_listener(CHANNEL, self._notified)
        except _DB_DOWN as err:
            if conn is not None:
                conn.terminate()
            self._listen_failures += 1
            self._next_connect = time.monotonic() + min(0.25 * 2 ** min(self._listen_failures, 5), 5.0)
            if not self._listener_warned:
                self._listener_warned = True
                log.warning("events: cannot listen for notifications; retrying (reads go on every poll)",
                            extra={"error": type(err).__name__})
            return
        conn.add_termination_listener(self._lost)
        self._listener = conn
        self._next_ping = time.monotonic() + _PING_S
        self._listen_failures = 0
        if self._listener_warned:
            self._listener_warned = False
            log.info("events: listening again", extra={"pid": conn.get_server_pid()})

    def _drop_listener(self) -> None:
        conn, self._listener = self._listener, None
        if conn is not None:
            conn.remove_termination_listener(self._lost)
            if not conn.is_closed():
                conn.terminate()  # nothing to flush: no await while this task may be cancelled
