"""GET /events: the product's lifecycle events as Server-Sent Events, against a live server.

httpx's ASGI transport does not stream, so each test runs the real app under uvicorn in this process
(on a free 127.0.0.1 port, its lifespan included: the real hub, its listener and the real Postgres)
and reads the stream over HTTP; the hub itself is reached through the app's services (the listener's
backend pid, safe_id, the subscribers). Audit rows are written either through the API (lifecycle
actions on real engines) or straight into `audit_log` with SQL, which is what the hub reads; the
out-of-order commits hold two transactions open on their own connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from bap_engine.api.models import iso
from bap_engine.app import create_app
from bap_engine.config import Settings
from bap_engine.db.pool import create_pool
from bap_engine.events import HIDDEN_ACTIONS, EventHub
from bap_engine.supervisor import Supervisor
from tests.conftest import ADMIN_KEY, assert_envelope, insert_engine_row, pk, register_product, wait_until
from tests.e2e.conftest import free_port

DATA_KEYS = {"id", "timestamp", "action", "user_id", "engine_id", "actor", "metadata"}
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


# ---------------------------------------------------------------------------------------------
# a live server in this process, and an SSE reader
# ---------------------------------------------------------------------------------------------
class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # pytest keeps its own signal handlers
        yield


@dataclass
class Live:
    app: FastAPI
    url: str

    @property
    def hub(self) -> EventHub:
        hub = self.app.state.services.events
        assert isinstance(hub, EventHub)
        return hub

    @property
    def pool(self) -> asyncpg.Pool:
        pool = self.app.state.services.lifecycle.pool
        assert isinstance(pool, asyncpg.Pool)
        return pool

    @property
    def supervisor(self) -> Supervisor:
        supervisor = self.app.state.services.supervisor
        assert isinstance(supervisor, Supervisor)
        return supervisor

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=30)


@contextlib.asynccontextmanager
async def live_app(settings: Settings) -> AsyncIterator[Live]:
    app = create_app(settings)
    port = free_port()
    server = _Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_config=None,
                                    access_log=False, timeout_graceful_shutdown=2))
    task = asyncio.create_task(server.serve())
    try:
        await wait_until(lambda: server.started or task.done(), 60)
        assert server.started, "the server did not start"
        yield Live(app, f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


@dataclass
class Msg:
    lines: list[str]
    at: float
    fields: dict[str, str] = field(default_factory=dict)
    comments: list[str] = field(default_factory=list)

    @property
    def is_event(self) -> bool:
        return "data" in self.fields

    @property
    def id(self) -> int:
        return int(self.fields["id"])

    @property
    def event(self) -> str:
        return self.fields["event"]

    @property
    def data(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.fields["data"])
        return doc


class SSE:
    """One GET /events, read in the background into a queue of messages (blocks between blank lines)."""

    def __init__(self, live: Live, key: str, *, after_id: object = None, last_event_id: object = None) -> None:
        self._client = httpx.AsyncClient(base_url=live.url, timeout=httpx.Timeout(30, read=None))
        self._headers = pk(key) | ({"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {})
        self._params = {"after_id": str(after_id)} if after_id is not None else {}
        self._queue: asyncio.Queue[Msg | None] = asyncio.Queue()
        self._stack = contextlib.AsyncExitStack()
        self.ended = False

    async def __aenter__(self) -> SSE:
        await self._stack.enter_async_context(self._client)
        self.response = await self._stack.enter_async_context(
            self._client.stream("GET", "/events", headers=self._headers, params=self._params))
        assert self.response.status_code == 200, await self.response.aread()
        self._task = asyncio.create_task(self._pump())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
            await self._task
        await self._stack.aclose()

    async def _pump(self) -> None:
        block: list[str] = []
        try:
            async for line in self.response.aiter_lines():
                if line:
                    block.append(line)
                    continue
                msg = Msg(block, time.monotonic())
                for item in block:
                    if item.startswith(":"):
                        msg.comments.append(item[1:].strip())
                    else:
                        name, _, value = item.partition(":")
                        msg.fields[name] = value[1:] if value.startswith(" ") else value
                self._queue.put_nowait(msg)
                block = []
        finally:
            self._queue.put_nowait(None)

    async def next(self, timeout: float = 5) -> Msg | None:
        """The next message (event or comment block); None once the stream ended."""
        async with asyncio.timeout(timeout):
            msg = await self._queue.get()
        if msg is None:
            self.ended = True
        return msg

    async def event(self, timeout: float = 5) -> Msg:
        deadline = time.monotonic() + timeout
        while True:
            msg = await self.next(max(0.0, deadline - time.monotonic()))
            assert msg is not None, "the stream ended"
            if msg.is_event:
                return msg

    async def until(self, last_id: int, timeout: float = 10) -> list[Msg]:
        """Every event up to and including the one with `last_id` (fails if one past it comes)."""
        out: list[Msg] = []
        deadline = time.monotonic() + timeout
        while not out or out[-1].id < last_id:
            out.append(await self.event(max(0.0, deadline - time.monotonic())))
        assert out[-1].id == last_id, [m.id for m in out]
        return out

    async def no_event(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await self.next(left)
            except TimeoutError:
                return
            assert msg is None or not msg.is_event, f"unexpected event {msg.lines}"
            if msg is None:
                return

    async def connected(self) -> None:
        msg = await self.next()
        assert msg is not None and msg.comments == ["connected"] and msg.fields == {"retry": "2000"}, msg


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
async def insert_rows(conn: asyncpg.Connection | asyncpg.Pool, product_id: str, actions: list[str],
                      user_id: str = "u1") -> list[int]:
    """Audit rows in one statement (one transaction), ids in order."""
    rows = await conn.fetch(
        "INSERT INTO audit_log (product_id, user_id, action, actor, metadata) "
        "SELECT $1::uuid, $2, a, 'test', jsonb_build_object('n', n, 'reason', 'r' || n) "
        "FROM unnest($3::text[]) WITH ORDINALITY AS t(a, n) ORDER BY n RETURNING id",
        product_id, user_id, actions)
    return sorted(int(r["id"]) for r in rows)


async def insert_one(conn: asyncpg.Connection | asyncpg.Pool, product_id: str, action: str = "test_marker") -> int:
    return int(await conn.fetchval(
        "INSERT INTO audit_log (product_id, user_id, action, actor) VALUES ($1, 'u1', $2, 'test') RETURNING id",
        product_id, action))


async def visible_ids(pool: asyncpg.Pool, product_id: str, after_id: int = 0) -> list[int]:
    rows = await pool.fetch("SELECT id FROM audit_log WHERE product_id = $1 AND id > $2 "
                            "AND action <> ALL($3::text[]) ORDER BY id", product_id, after_id, list(HIDDEN_ACTIONS))
    return [int(r["id"]) for r in rows]


async def caught_up(live: Live) -> None:
    """The hub has fanned out every row committed so far (a stream opened now starts after them)."""
    top = int(await live.pool.fetchval("SELECT coalesce(max(id), 0) FROM audit_log"))
    assert await live.hub.wait_past(top - 1, 5), (live.hub.safe_id, top)


async def new_product(live: Live) -> tuple[str, str]:
    async with live.client() as c:
        return await register_product(c)


def keepalive_settings(settings: Settings, seconds: float = 15) -> Settings:
    return settings.model_copy(update={"events_keepalive_s": seconds})


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
async def test_lifecycle_events_arrive_in_order_with_the_sse_framing(settings: Settings) -> None:
    async with live_app(settings) as live:
        product_id, key = await new_product(live)
        await caught_up(live)
        start = live.hub.safe_id
        async with SSE(live, key) as sse, live.client() as c:
            assert sse.response.headers["content-type"].startswith("text/event-stream")
            assert sse.response.headers["cache-control"] == "no-cache"
            assert sse.response.headers["x-accel-buffering"] == "no"
            await sse.connected()
            r = await c.post("/engines/provision", json={"user_id": "alice"}, headers=pk(key))
            assert r.status_code == 200, r.text
            engine_id = r.json()["engine_id"]
            # rows that are not events, for this product: never streamed
            await live.pool.execute(
                "INSERT INTO audit_log (product_id, user_id, engine_id, action, actor) "
                "VALUES ($1, 'alice', $2, 'health_check', 'system')", product_id, engine_id)
            await live.pool.execute(
                "INSERT INTO audit_log (product_id, action, actor, metadata) "
                "VALUES ($1, 'admit_denied', 'system', '{\"reason\": \"quota\", \"count\": 1}')", product_id)
            for method, path in (("POST", "/engines/alice/stop"), ("POST", "/engines/alice/start"),
                                 ("DELETE", "/engines/alice")):
                r = await c.request(method, path, headers=pk(key))
                assert r.status_code == 200, (path, r.text)
            await insert_one(live.pool, product_id, "health_check")
            marker = await insert_one(live.pool, product_id)
            got = await sse.until(marker)
        rows = await live.pool.fetch(
            "SELECT id, timestamp, action, user_id, engine_id, actor, metadata FROM audit_log "
            "WHERE product_id = $1 AND id > $2 AND action <> ALL($3::text[]) ORDER BY id",
            product_id, start, list(HIDDEN_ACTIONS))
    assert [m.id for m in got] == [r["id"] for r in rows]
    actions = [m.event for m in got]
    assert {"provision", "stop", "start", "destroy"} <= set(actions), actions
    assert actions.index("provision") < actions.index("stop") < actions.index("start") < actions.index("destroy")
    assert not set(actions) & set(HIDDEN_ACTIONS)
    for msg, row in zip(got, rows, strict=True):
        assert msg.lines == [f"id: {row['id']}", f"event: {row['action']}", msg.lines[2]], msg.lines
        assert msg.lines[2].startswith("data: {")
        assert set(msg.data) == DATA_KEYS
        assert msg.data == {"id": row["id"], "timestamp": iso(row["timestamp"]), "action": row["action"],
                            "user_id": row["user_id"], "engine_id": row["engine_id"], "actor": row["actor"],
                            "metadata": json.loads(row["metadata"]) if isinstance(row["metadata"], str)
                            else row["metadata"]}
        assert ISO_Z.match(msg.data["timestamp"]), msg.data
    assert any(m.data["engine_id"] == engine_id and m.data["user_id"] == "alice" for m in got)


@pytest.mark.parametrize("how", ["header", "query", "both"])
async def test_resume_yields_exactly_the_rows_after_the_id(settings: Settings, how: str) -> None:
    async with live_app(settings) as live:
        product_id, key = await new_product(live)
        first = await insert_rows(live.pool, product_id, ["test_bulk"] * 1200)  # history: 3 pages
        resume_at = first[99]
        stop = asyncio.Event()

        async def writer() -> list[int]:  # live rows keep coming during the history read
            ids: list[int] = []
            while not stop.is_set() or len(ids) < 20:
                ids.append(await insert_one(live.pool, product_id))
                await asyncio.sleep(0.005)
            return ids

        task = asyncio.create_task(writer())
        streams = {"header": lambda: SSE(live, key, last_event_id=resume_at),
                   "query": lambda: SSE(live, key, after_id=resume_at),
                   "both": lambda: SSE(live, key, last_event_id=resume_at, after_id=first[5])}  # the header wins
        async with streams[how]() as sse:
            await sse.connected()
            early = await sse.until(first[-1])
            stop.set()
            written = await task
            got = early + await sse.until(written[-1])
        expected = await visible_ids(live.pool, product_id, resume_at)
        assert [m.id for m in got] == expected
        assert expected[: len(first) - 100] == first[100:] and expected[-len(written):] == written


async def test_a_consumer_that_reconnects_misses_nothing_and_sees_nothing_twice(settings: Settings) -> None:
    async with live_app(settings) as live:
        product_id, key = await new_product(live)
        await insert_rows(live.pool, product_id, ["test_bulk"] * 300)
        stop = asyncio.Event()

        async def writer() -> list[int]:
            ids: list[int] = []
            while not stop.is_set():
                ids.append(await insert_one(live.pool, product_id))
                await asyncio.sleep(0.003)
            return ids

        task = asyncio.create_task(writer())
        seen: list[int] = []
        last: int | None = None
        for _ in range(4):  # read a while, drop the connection, resume from the last id seen
            async with SSE(live, key, after_id=0, last_event_id=last) as sse:
                await sse.connected()
                for _ in range(120):
                    seen.append((await sse.event()).id)
            last = seen[-1]
        stop.set()
        written = await task
        assert last is not None
        async with SSE(live, key, last_event_id=last) as sse:
            seen += [m.id for m in await sse.until(written[-1])] if written[-1] > last else []
        assert seen == await visible_ids(live.pool, product_id)
        assert len(seen) == len(set(seen))


async def test_a_consumer_away_while_50_changes_happen_resumes_with_all_50(settings: Settings) -> None:
    """Disconnected, 50 real changes through the API (PATCH idle_sleep flips: one settings_update row
    each), reconnected with Last-Event-ID: exactly those 50, in order."""
    async with live_app(settings) as live:
        product_id, key = await new_product(live)
        await insert_engine_row(live.pool, settings, product_id, "away")
        async with live.client() as c:
            assert (await c.patch("/engines/away", json={"idle_sleep": "never"}, headers=pk(key))).status_code == 200
            seen_before = await visible_ids(live.pool, product_id)  # the registration and the first flip
            async with SSE(live, key, after_id=0) as sse:
                await sse.connected()
                last = (await sse.until(seen_before[-1]))[-1].id  # seen, then the consumer goes away
            for i in range(50):
                r = await c.patch("/engines/away", json={"idle_sleep": "auto" if i % 2 == 0 else "never"},
                                  headers=pk(key))
                assert r.status_code == 200
        written = await visible_ids(live.pool, product_id, last)
        assert len(written) == 50
        async with SSE(live, key, last_event_id=last) as sse:
            got = await sse.until(written[-1])
            await sse.no_event(0.3)  # nothing more, nothing twice
        assert [m.id for m in got] == written
        assert {m.event for m in got} == {"settings_update"}


async def test_another_products_events_never_appear(settings: Settings) -> None:
    async with live_app(settings) as live:
        a_id, a_key = await new_product(live)
        b_id, b_key = await new_product(live)
        async with SSE(live, a_key, after_id=0) as sa, SSE(live, b_key, after_id=0) as sb:
            for _ in range(5):
                await insert_rows(live.pool, a_id, ["test_a"] * 3)
                await insert_rows(live.pool, b_id, ["test_b"])
            a_last, b_last = await insert_one(live.pool, a_id), await insert_one(live.pool, b_id)
            got_a, got_b = await sa.until(a_last), await sb.until(b_last)
        assert [m.id for m in got_a] == await visible_ids(live.pool, a_id)
        assert [m.id for m in got_b] == await visible_ids(live.pool, b_id)
        assert {m.event for m in got_b} == {"test_b", "test_marker", "policy_register"}


async def test_out_of_order_commits_arrive_in_id_order_and_a_rollback_does_not_stall(
    settings: Settings, pg_dsn: str
) -> None:
    async with live_app(settings) as live:
        product_id, key = await new_product(live)
        await caught_up(live)
        c1, c2 = await asyncpg.connect(pg_dsn), await asyncpg.connect(pg_dsn)
        try:
            async with SSE(live, key) as sse:
                await sse.connected()
                # id 1 then id 2; 2 commits first: the hub must hold it until 1 is decided
                t1, t2 = c1.transaction(), c2.transaction()
                await t1.start()
                first = await insert_one(c1, product_id, "test_first")
                await t2.start()
                second = await insert_one(c2, product_id, "test_second")
                assert second > first
                await t2.commit()
                await sse.no_event(0.4)
                assert live.hub.safe_id < first
                await t1.commit()
                got = [await sse.event(2), await sse.event(2)]
                assert [(m.id, m.event) for m in got] == [(first, "test_first"), (second, "test_second")]

                # a rolled-back insert is a permanent gap: released as soon as its transaction is over
                t1, t2 = c1.transaction(), c2.transaction()
                await t1.start()
                await insert_one(c1, product_id, "test_rolled_back")
                await t2.start()
                after = await insert_one(c2, product_id, "test_after_rollback")
                await t2.commit()
                await sse.no_event(0.2)
                rolled_back_at = time.monotonic()
                await t1.rollback()
                msg = await sse.event(5)
                assert (msg.id, msg.event) == (after, "test_after_rollback")
                assert msg.at - rolled_back_at < 1.0, msg.at - rolled_back_at

                # a sequence value taken without a row (as an ON CONFLICT insert does) stalls nothing
                await live.pool.fetchval("SELECT nextval(pg_get_serial_sequence('audit_log', 'id'))")
                written_at = time.monotonic()
                marker = await insert_one(live.pool, product_id)
                msg = await sse.event(5)
                assert msg.id == marker and msg.at - written_at < 1.0
        finally:
            await c1.close()
            await c2.close()


async def test_two_replicas_see_each_others_events(settings: Settings) -> None:
    async with live_app(settings) as a, live_app(settings) as b:
        product_id, key = await new_product(a)
        await caught_up(a)
        async with SSE(a, key) as sse, b.client() as c:
            await sse.connected()
            r = await c.put(f"/products/{product_id}/policy", json={"policy": {"max_engines": 3}},
                            headers={"X-Admin-Key": ADMIN_KEY})
            assert r.status_code == 200, r.text
            done = time.monotonic()
            msg = await sse.event(2)
            assert msg.event == "policy_update" and msg.data["metadata"]["policy"] == {"max_engines": 3}, msg.data
            assert msg.at - done < 1.0
            marker = await insert_one(b.pool, product_id)  # the hub of B has it too
            assert await b.hub.wait_past(marker - 1, 2) and await a.hub.wait_past(marker - 1, 2)


async def test_keep_alive_comments_on_a_quiet_stream(settings: Settings) -> None:
    async with live_app(keepalive_settings(settings, 0.3)) as live:
        _, key = await new_product(live)
        async with SSE(live, key) as sse:
            await sse.connected()
            opened = time.monotonic()
            comments = [m for m in [await sse.next(2), await sse.next(2), await sse.next(2)] if m is not None]
        assert len(comments) == 3 and all(m.lines == [": keep-alive"] for m in comments), comments
        gaps = [m.at - t for m, t in zip(comments, [opened] + [m.at for m in comments[:-1]], strict=True)]
        assert all(0.15 < g < 1.0 for g in gaps), gaps


async def test_the_listener_comes_back_after_its_session_is_terminated(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    async with live_app(settings) as live:
        product_id, key = await new_product(live)
        await caught_up(live)
        pid = live.hub.listener_pid
        assert pid is not None
        assert await live.pool.fetchval("SELECT query FROM pg_stat_activity WHERE pid = $1", pid) == \
            'LISTEN "bap_events"'
        async with SSE(live, key) as sse:
            await sse.connected()
            with caplog.at_level(logging.INFO, logger="bap_engine.events"):
                assert await live.pool.fetchval("SELECT pg_terminate_backend($1)", pid)
                meanwhile = await insert_rows(live.pool, product_id, ["test_meanwhile"] * 3)
                got = await sse.until(meanwhile[-1], timeout=5)
                assert [m.id for m in got] == meanwhile
                await wait_until(lambda: live.hub.listener_pid not in (None, pid), 5)
            later = await insert_one(live.pool, product_id)
            assert (await sse.event(3)).id == later
        lost = [r for r in caplog.records if r.name == "bap_engine.events" and r.levelno == logging.WARNING]
        assert len(lost) == 1 and lost[0].exc_info is None, [r.getMessage() for r in lost]
        status = live.supervisor.status()["events-listener"]
        assert status.restarts == 0 and "events-listener" not in live.supervisor.failing()
        assert any(t.get_name() == "events-listener" and not t.done() for t in asyncio.all_tasks())


async def test_a_closed_connection_releases_its_subscription_and_head_ends(settings: Settings) -> None:
    async with live_app(settings) as live:
        _, key = await new_product(live)
        async with SSE(live, key) as sse:
            await sse.connected()
            assert live.hub.subscribers == 1
        await wait_until(lambda: live.hub.subscribers == 0, 3)
        async with live.client() as c:
            r = await asyncio.wait_for(c.head("/events", headers=pk(key)), 5)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        await wait_until(lambda: live.hub.subscribers == 0, 3)
        async with SSE(live, key) as sse:  # the hub closing (at shutdown) ends the stream
            await sse.connected()
            await live.hub.aclose()
            assert await sse.next(3) is None


async def test_a_consumer_too_far_behind_is_ended_and_resumes_without_loss(settings: Settings) -> None:
    async with live_app(settings) as live:
        product_id, key = await new_product(live)
        await caught_up(live)
        live.hub._queue_max = 20  # the bound of the queues of later subscribers (10,000 otherwise)
        async with SSE(live, key) as sse:
            await sse.connected()
            ids = await insert_rows(live.pool, product_id, ["test_burst"] * 100)  # one fan-out of 100
            got: list[int] = []
            while (msg := await sse.next()) is not None:
                got += [msg.id] if msg.is_event else []
        assert got == ids[:20]  # what was queued, then the end of the stream
        await wait_until(lambda: live.hub.subscribers == 0, 3)
        async with SSE(live, key, last_event_id=got[-1]) as sse:
            rest = [m.id for m in await sse.until(ids[-1])]
        assert rest == ids[20:]


async def test_bad_resume_ids_and_keys_are_refused_in_the_envelope(client: httpx.AsyncClient) -> None:
    _, key = await register_product(client)
    for params, headers in (({"after_id": "abc"}, {}), ({"after_id": "-1"}, {}), ({"after_id": "1.5"}, {}),
                            ({"after_id": str(2**63)}, {}), ({}, {"Last-Event-ID": "x"}),
                            ({}, {"Last-Event-ID": "-3"}), ({}, {"Last-Event-ID": ""}),
                            ({"after_id": "5", "other": "1"}, {})):
        r = await client.get("/events", params=params, headers=pk(key) | headers)
        assert_envelope(r, 400, "VALIDATION_ERROR")
    for headers in ({}, pk("pk-sept-" + "x" * 43), {"X-Admin-Key": ADMIN_KEY}, pk(ADMIN_KEY)):
        r = await client.get("/events", params={"after_id": "1"}, headers=headers)
        assert_envelope(r, 401, "INVALID_PLATFORM_KEY")


# ---------------------------------------------------------------------------------------------
# the hub on its own (its bounds made small)
# ---------------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def running_hub(pg_dsn: str, **kwargs: Any) -> AsyncIterator[tuple[EventHub, asyncpg.Pool]]:
    pool = await create_pool(pg_dsn, max_size=4)
    supervisor = Supervisor()
    hub = EventHub(pool, pg_dsn, **kwargs)
    try:
        await hub.start()
        supervisor.start("events-listener", hub.run)
        yield hub, pool
    finally:
        await supervisor.aclose()
        await hub.aclose()
        await pool.close()
        assert supervisor.status()["events-listener"].restarts == 0


async def test_wait_past_wakes_on_the_advance_and_times_out(pg_dsn: str) -> None:
    async with running_hub(pg_dsn) as (hub, pool):
        product_id = str(await pool.fetchval("SELECT gen_random_uuid()"))
        now = hub.safe_id
        started = time.monotonic()
        assert await hub.wait_past(now, 0.2) is False
        assert 0.2 <= time.monotonic() - started < 1.0
        waiter = asyncio.create_task(hub.wait_past(now, 5))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        row = await insert_one(pool, product_id)
        assert await asyncio.wait_for(waiter, 3) is True
        assert hub.safe_id >= row
        assert await hub.wait_past(row - 1, 0) is True


async def test_a_slow_consumer_is_closed_not_buffered_without_bound(pg_dsn: str) -> None:
    async with running_hub(pg_dsn, queue_max=5) as (hub, pool):
        product_id = str(await pool.fetchval("SELECT gen_random_uuid()"))
        sub = hub.subscribe(product_id)
        ids = await insert_rows(pool, product_id, ["test_flood"] * 8)
        assert await hub.wait_past(ids[-1] - 1, 3)
        assert sub.overflowed and sub.closed and hub.subscribers == 0
        batch = await sub.next_batch(1)
        assert batch is not None and [e.id for e in batch] == ids[:5]  # what was queued, then the end
        assert await sub.next_batch(1) is None


async def test_a_gap_is_held_at_most_its_bound(pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    async with running_hub(pg_dsn, gap_max_s=0.5) as (hub, pool):
        product_id = str(await pool.fetchval("SELECT gen_random_uuid()"))
        sub = hub.subscribe(product_id)
        holder = await asyncpg.connect(pg_dsn)
        try:
            tx = holder.transaction()
            await tx.start()
            held = await insert_one(holder, product_id, "test_held")
            with caplog.at_level(logging.WARNING, logger="bap_engine.events"):
                started = time.monotonic()
                after = await insert_one(pool, product_id)
                assert not await hub.wait_past(after - 1, 0.3)  # held while the transaction is open
                assert await hub.wait_past(after - 1, 3)  # then released by the bound
                assert 0.4 < time.monotonic() - started < 2.0
            assert any("outlived its bound" in r.getMessage() for r in caplog.records)
            batch = await sub.next_batch(1)
            assert batch is not None and [e.id for e in batch] == [after]
            assert hub.safe_id >= after > held
            await tx.rollback()
        finally:
            await holder.close()
