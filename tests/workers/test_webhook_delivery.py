"""Webhook delivery against real receivers on 127.0.0.1 (a small HTTP/1.1 server started per test, which
records every request and can answer any status, hang, or be down), real Postgres, the real EventHub.

The worker runs as the leader runs it: `run_loop` under a Supervisor, ended like a term (its stop event
set, then `Supervisor.stop`). Timings are short (backoff base, timeout and give-up are constructor
parameters); each test takes a few seconds at most.

- events arrive signed, once each, in id order, within the latency target of their commit;
- a receiver answering 500 then 200 gets the event again within 10 s, and later events wait for it;
- a hanging or dead receiver of one product delays no other product;
- GET's pending counts down to 0; last_status follows the attempts;
- an event failing past give_up_after_s is given up with a warning (product and event ids), the cursor
  moves on;
- a new term (a leader restart) resumes from cursor_id, resending only what was not acknowledged;
- a new PUT signs with the new secret from the same place; DELETE stops deliveries;
- end to end: an engine provisioned through the API reaches the receiver (the app's own hub and worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from bap_engine_client import verify_signature

from bap_engine.db.pool import create_pool
from bap_engine.events import EventHub
from bap_engine.fleet import Fleet
from bap_engine.keys import KeySealer
from bap_engine.supervisor import Supervisor
from bap_engine.webhooks import Webhooks
from bap_engine.workers.base import run_loop
from bap_engine.workers.webhooks import WebhookWorker
from tests.conftest import ADMIN_KEY, pk, register_product, unique_slug, wait_until
from tests.log_scan import record_secrets
from tests.workers.conftest import AppFactory

# ---------------------------------------------------------------------------------------------
# the receiver
# ---------------------------------------------------------------------------------------------
HANG = "hang"
Answer = int | str  # an HTTP status, or HANG (no answer until the receiver stops)


@dataclass
class Received:
    headers: dict[str, str]  # lower-cased names
    body: bytes
    at: float  # time.monotonic() when the whole request was read
    answer: Answer

    @property
    def event_id(self) -> int:
        return int(json.loads(self.body)["id"])

    def verifies(self, secret: str, **kw: Any) -> bool:
        return verify_signature(secret, self.headers["x-bap-timestamp"], self.headers["x-bap-signature"], self.body,
                                **kw)


@dataclass
class Receiver:
    """An HTTP/1.1 server on 127.0.0.1 (keep-alive) that records each request. `answer(event_id)`
    decides the reply (default 200); `down()` stops listening and drops its connections (the port
    then refuses), `up()` listens again on the same port."""

    answer: Callable[[int], Answer] = lambda _event_id: 200
    requests: list[Received] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/bap"

    async def up(self) -> None:
        self._release = asyncio.Event()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()
            self._server = None

    def ids(self, *, acknowledged: bool = False) -> list[int]:
        return [r.event_id for r in self.requests
                if not acknowledged or (isinstance(r.answer, int) and 200 <= r.answer < 300)]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                received = Received(headers, body, time.monotonic(), 200)
                received.answer = self.answer(received.event_id)
                self.requests.append(received)
                if received.answer == HANG:
                    await self._release.wait()
                    return
                writer.write(f"HTTP/1.1 {received.answer} X\r\nContent-Length: 2\r\n\r\nok".encode())
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()


@contextlib.asynccontextmanager
async def receiver(answer: Callable[[int], Answer] | None = None) -> AsyncIterator[Receiver]:
    r = Receiver() if answer is None else Receiver(answer=answer)
    await r.up()
    try:
        yield r
    finally:
        await r.down()


async def dead_url() -> str:
    """A 127.0.0.1 URL nothing listens on (connection refused)."""
    r = Receiver()
    await r.up()
    await r.down()
    return r.url


# ---------------------------------------------------------------------------------------------
# the worker as the leader runs it
# ---------------------------------------------------------------------------------------------
@dataclass
class Harness:
    pool: asyncpg.Pool
    hub: EventHub
    supervisor: Supervisor
    webhooks: Webhooks
    fleet: Fleet
    worker_kw: dict[str, Any]
    worker: WebhookWorker | None = None
    _stop: asyncio.Event | None = None
    terms: int = 0

    def start_term(self, **kw: Any) -> WebhookWorker:
        """Build a worker and loop it under the supervisor, as Election does for each term."""
        assert self.worker is None
        self.worker = worker = WebhookWorker(self.webhooks, self.hub, self.supervisor, **{**self.worker_kw, **kw})
        self._stop = stop = asyncio.Event()
        self.terms += 1
        self.supervisor.start("worker-webhooks", lambda: run_loop(worker, stop))
        return worker

    async def end_term(self) -> WebhookWorker:
        """As Election._end_term: set the term's stop event, then stop the supervised loop."""
        worker, stop = self.worker, self._stop
        assert worker is not None and stop is not None
        stop.set()
        await self.supervisor.stop("worker-webhooks")
        await wait_until(lambda: worker.closed, 5)
        self.worker = self._stop = None
        return worker

    async def product(self) -> str:
        product, _ = await self.fleet.register_product(unique_slug("wh"), "Webhook test", {})
        return product.id

    async def hook(self, product_id: str, url: str) -> str:
        created = await self.webhooks.put(product_id, url)
        record_secrets(created.secret)
        return created.secret

    async def emit(self, product_id: str, n: int = 1, action: str = "stop") -> list[int]:
        """`n` audit rows of the product committed in one transaction (a hidden health_check between
        each); returns the deliverable ids."""
        async with self.pool.acquire() as conn, conn.transaction():
            ids = []
            for i in range(n):
                ids.append(int(await conn.fetchval(
                    "INSERT INTO audit_log (product_id, user_id, action, actor, metadata) "
                    "VALUES ($1, 'alice', $2, 'system', $3) RETURNING id", product_id, action, {"n": i})))
                await conn.execute("INSERT INTO audit_log (product_id, action) VALUES ($1, 'health_check')",
                                   product_id)
        return ids


@pytest.fixture
async def harness(pg_dsn: str, master_key: str) -> AsyncIterator[Harness]:
    pool = await create_pool(pg_dsn, max_size=10)
    supervisor = Supervisor(backoff_base_s=0.05)
    hub = EventHub(pool, pg_dsn, poll_s=0.5)
    await hub.start()
    supervisor.start("events-listener", hub.run)
    deployment = f"t-{uuid.uuid4().hex[:12]}"  # this test's leader delivers this test's webhooks only
    h = Harness(pool, hub, supervisor, Webhooks(pool, KeySealer(master_key), deployment), Fleet(pool, ADMIN_KEY),
                {"backoff_base_s": 0.1, "timeout_s": 2.0})
    try:
        yield h
    finally:
        if h.worker is not None:
            await h.end_term()
        await supervisor.stop("events-listener", grace_s=0)
        await hub.aclose()
        assert supervisor.status().get("webhook-delivery") is None or \
            supervisor.status()["webhook-delivery"].restarts == 0, supervisor.status()["webhook-delivery"]
        await supervisor.aclose()
        await pool.close()


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
async def test_events_arrive_signed_in_order_within_the_latency_target(harness: Harness) -> None:
    async with receiver() as rx:
        product = await harness.product()
        secret = await harness.hook(product, rx.url)
        harness.start_term()
        ids = await harness.emit(product, 5, "provision")
        await wait_until(lambda: len(rx.requests) >= 5, 5)
        assert rx.ids() == ids  # in id order, each once, no health_check

        first = rx.requests[0]
        assert first.headers["content-type"] == "application/json"
        assert first.headers["x-bap-event-id"] == str(ids[0])
        assert first.headers["x-bap-signature"].startswith("v1=")
        doc = json.loads(first.body)
        assert set(doc) == {"id", "timestamp", "action", "user_id", "engine_id", "actor", "metadata"}
        assert (doc["action"], doc["user_id"], doc["engine_id"], doc["actor"], doc["metadata"]) == \
            ("provision", "alice", None, "system", {"n": 0})
        assert doc["timestamp"].endswith("Z") and "T" in doc["timestamp"]
        assert abs(int(first.headers["x-bap-timestamp"]) - time.time()) < 60
        assert secret not in first.body.decode() and secret not in str(first.headers)

        # the signature verifies, and fails with a wrong secret, a changed body, an old timestamp
        for r in rx.requests:
            assert r.verifies(secret)
        assert not first.verifies(secret + "x")
        assert not verify_signature(secret, first.headers["x-bap-timestamp"], first.headers["x-bap-signature"],
                                    first.body.replace(b'"n":0', b'"n":1'))
        assert not first.verifies(secret, now=time.time() + 301)
        assert first.verifies(secret, now=time.time() + 60)
        verify = guide_verify()  # the guide's standard-library snippet agrees
        stamp, signature = first.headers["x-bap-timestamp"], first.headers["x-bap-signature"]
        assert verify(secret, stamp, signature, first.body)
        assert not verify(secret + "x", stamp, signature, first.body)
        assert not verify(secret, stamp, signature, first.body + b" ")
        assert not verify(secret, str(int(stamp) - 301), signature, first.body)

        # latency: each event reaches the receiver within 250 ms of its commit
        delays = []
        for _ in range(20):
            committed = time.monotonic()
            (eid,) = await harness.emit(product)
            await wait_until(lambda eid=eid: rx.ids()[-1:] == [eid], 5, interval=0.001)  # type: ignore[misc]
            delays.append(rx.requests[-1].at - committed)
        delays.sort()
        assert delays[-1] < 0.25, delays  # p99 of 20 is their max
        await wait_until(lambda: _is(status(harness, product), (0, 200)), 5)


def guide_verify() -> Callable[..., bool]:
    """The standard-library `verify` of docs/guides/webhooks.md, as the guide prints it."""
    guide = (Path(__file__).resolve().parents[2] / "docs" / "guides" / "webhooks.md").read_text(encoding="utf-8")
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", guide, re.S) if "def verify(" in b]
    namespace: dict[str, Any] = {}
    exec(compile(block, "docs/guides/webhooks.md", "exec"), namespace)
    verify: Callable[..., bool] = namespace["verify"]
    return verify


async def status(harness: Harness, product_id: str) -> tuple[int, int | None]:
    s = await harness.webhooks.status(product_id)
    return s.pending, s.last_status


async def _is(value: Awaitable[object], expected: object) -> bool:
    return await value == expected


async def test_a_500_is_retried_within_10_s_and_later_events_wait_for_it(harness: Harness) -> None:
    answers = iter([500])
    async with receiver(lambda _eid: next(answers, 200)) as rx:
        product = await harness.product()
        secret = await harness.hook(product, rx.url)
        harness.start_term(backoff_base_s=1.0)  # the production schedule: 1, 2, 4 ... s
        ids = await harness.emit(product, 3)
        await wait_until(lambda: len(rx.requests) >= 1, 5)
        await wait_until(lambda: _is(status(harness, product), (3, 500)), 5)
        await wait_until(lambda: len(rx.requests) >= 4, 10)
        first, again = rx.requests[0], rx.requests[1]
        assert [r.event_id for r in rx.requests] == [ids[0], ids[0], ids[1], ids[2]]  # the head first, again
        assert first.answer == 500 and again.answer == 200
        assert 0.9 <= again.at - first.at < 10
        assert first.headers["x-bap-event-id"] == again.headers["x-bap-event-id"]  # the receiver dedupes by it
        assert all(r.verifies(secret) for r in rx.requests)
        await wait_until(lambda: _is(status(harness, product), (0, 200)), 5)


async def test_a_receiver_answering_500_twice_gets_every_event_once_acknowledged(harness: Harness) -> None:
    answers = iter([500, 500])
    async with receiver(lambda _eid: next(answers, 200)) as rx:
        product = await harness.product()
        secret = await harness.hook(product, rx.url)
        harness.start_term(backoff_base_s=0.2)
        ids = await harness.emit(product, 4)
        await wait_until(lambda: rx.ids(acknowledged=True) == ids, 10)
        assert [r.answer for r in rx.requests[:3]] == [500, 500, 200]
        assert [r.event_id for r in rx.requests] == [ids[0], ids[0], *ids]  # the head twice more, then in order
        assert all(r.verifies(secret) for r in rx.requests)
        await wait_until(lambda: _is(status(harness, product), (0, 200)), 5)


async def test_a_hanging_or_dead_receiver_delays_no_other_product(harness: Harness) -> None:
    async with receiver(lambda _eid: HANG) as hanging, receiver() as healthy:
        slow, dead, fine = await harness.product(), await harness.product(), await harness.product()
        await harness.hook(slow, hanging.url)
        await harness.hook(dead, await dead_url())
        await harness.hook(fine, healthy.url)
        harness.start_term(timeout_s=1.5)
        await harness.emit(slow, 2)
        await harness.emit(dead, 2)
        await wait_until(lambda: len(hanging.requests) == 1, 5)  # the slow product's head is in flight
        delays = []
        for _ in range(5):
            committed = time.monotonic()
            (eid,) = await harness.emit(fine)
            await wait_until(lambda eid=eid: healthy.ids()[-1:] == [eid], 5, interval=0.001)  # type: ignore[misc]
            delays.append(healthy.requests[-1].at - committed)
            await asyncio.sleep(0.1)
        assert max(delays) < 0.25, delays
        assert len(hanging.requests) == 1  # its next event waits for its head
        # the hanging attempt times out (no status), the refused one too; both are retried later
        await wait_until(lambda: _last(harness, slow, "last_error"), 5)
        assert await status(harness, slow) == (2, None)
        assert await status(harness, dead) == (2, None)
        assert "no answer within 1.5 s" in str(await _last(harness, slow, "last_error"))
        assert await _last(harness, dead, "last_error") == "ConnectError"
        await wait_until(lambda: len(hanging.requests) >= 2, 5)  # retried after its backoff
        assert hanging.ids() == [hanging.requests[0].event_id] * len(hanging.requests)


async def _last(harness: Harness, product_id: str, column: str) -> object:
    return await harness.pool.fetchval(f"SELECT {column} FROM webhooks WHERE product_id = $1", product_id)


async def test_pending_counts_down_to_zero(harness: Harness) -> None:
    failing = True
    async with receiver(lambda _eid: 503 if failing else 200) as rx:
        product = await harness.product()
        await harness.hook(product, rx.url)
        assert await status(harness, product) == (0, None)
        harness.start_term(backoff_base_s=0.2, backoff_max_s=0.4)
        ids = await harness.emit(product, 6)
        await wait_until(lambda: len(rx.requests) >= 2, 5)
        assert await status(harness, product) == (6, 503)  # nothing acknowledged: the head keeps failing
        assert set(rx.ids()) == {ids[0]}
        failing = False
        seen: list[int] = []

        async def drained() -> bool:
            pending, _ = await status(harness, product)
            if not seen or seen[-1] != pending:
                seen.append(pending)
            return pending == 0

        await wait_until(drained, 5, interval=0.001)
        assert seen[0] == 6 and seen == sorted(seen, reverse=True), seen
        assert rx.ids(acknowledged=True) == ids
        s = await harness.webhooks.status(product)
        assert (s.last_status, s.pending) == (200, 0) and s.last_delivery_at is not None


async def test_an_event_failing_past_the_deadline_is_given_up(harness: Harness,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    doomed: list[int] = []
    async with receiver(lambda eid: 500 if eid in doomed else 200) as rx:
        product = await harness.product()
        secret = await harness.hook(product, rx.url)
        ids = await harness.emit(product, 2)
        doomed.append(ids[0])
        with caplog.at_level(logging.WARNING, logger="bap_engine.webhooks"):
            worker = harness.start_term(backoff_base_s=0.1, give_up_after_s=0.6)
            await wait_until(lambda: rx.ids(acknowledged=True) == [ids[1]], 5)
        assert rx.ids().count(ids[0]) >= 3  # retried until the deadline, then given up
        assert rx.ids()[-1] == ids[1]
        given_up = [r for r in caplog.records if r.getMessage() == "webhook event given up"]
        assert len(given_up) == 1 and given_up[0].levelno == logging.WARNING
        assert (given_up[0].product_id, given_up[0].event_id) == (product, ids[0])  # type: ignore[attr-defined]
        assert secret not in str(given_up[0].__dict__) and rx.url not in str(given_up[0].__dict__)
        assert worker.given_up == 1
        await wait_until(lambda: _is(status(harness, product), (0, 200)), 5)


async def test_a_new_term_resumes_from_the_cursor(harness: Harness) -> None:
    hang_on: list[int] = []
    async with receiver(lambda eid: HANG if eid in hang_on else 200) as rx:
        product = await harness.product()
        secret = await harness.hook(product, rx.url)
        harness.start_term()
        (e1,) = await harness.emit(product)
        await wait_until(lambda: rx.ids() == [e1], 5)
        e2, e3 = await harness.emit(product, 2)
        hang_on.append(e2)
        await wait_until(lambda: rx.ids() == [e1, e2], 5)  # e2 in flight when the term ends
        first = await harness.end_term()
        assert first.closed and not first.lanes
        e4, = await harness.emit(product)
        await asyncio.sleep(0.3)
        assert rx.ids() == [e1, e2]  # no leader, no delivery
        assert await status(harness, product) == (3, 200)
        hang_on.clear()
        await rx.down()  # the hung connection goes with it
        await rx.up()
        harness.start_term()  # the next leader
        await wait_until(lambda: rx.ids()[2:] == [e2, e3, e4], 5)
        assert rx.ids(acknowledged=True) == [e1, e2, e3, e4]  # e1 was not sent again
        assert all(r.verifies(secret) for r in rx.requests)
        await wait_until(lambda: _is(status(harness, product), (0, 200)), 5)


async def test_a_new_put_signs_with_the_new_secret_from_the_same_place_and_delete_stops(harness: Harness) -> None:
    async with receiver() as rx, receiver() as rx2:
        product = await harness.product()
        old = await harness.hook(product, rx.url)
        harness.start_term()
        (e1,) = await harness.emit(product)
        await wait_until(lambda: rx.ids() == [e1], 5)
        harness.worker_kw["backoff_base_s"] = 0.1
        new = await harness.hook(product, rx2.url)
        assert new != old
        (e2,) = await harness.emit(product)
        await wait_until(lambda: rx2.ids() == [e2], 5)  # nothing skipped, nothing sent again
        assert rx2.requests[0].verifies(new) and not rx2.requests[0].verifies(old)
        await harness.webhooks.delete(product)
        await harness.emit(product, 2)
        await asyncio.sleep(0.4)
        assert rx.ids() == [e1] and rx2.ids() == [e2]


async def test_a_provisioned_engine_reaches_the_receiver_end_to_end(make_app: AppFactory) -> None:
    """The app's own hub and leader worker: an engine provisioned through the API is POSTed."""
    async with receiver() as rx, make_app(workers_enabled=True) as (app, client):
        product_id, key = await register_product(client)
        r = await client.put(f"/products/{product_id}/webhook", json={"url": rx.url},
                             headers={"X-Admin-Key": ADMIN_KEY})
        assert r.status_code == 200, r.text
        secret = r.json()["secret"]
        record_secrets(secret)
        await wait_until(lambda: app.state.services.leadership.workers.get("webhooks") is not None, 10)
        r = await client.post("/engines/provision", json={"user_id": "hooked"}, headers=pk(key))
        assert r.status_code == 200, r.text
        engine_id = r.json()["engine_id"]
        await wait_until(lambda: any(json.loads(q.body)["action"] == "provision" for q in rx.requests), 5)
        event = next(json.loads(q.body) for q in rx.requests if json.loads(q.body)["action"] == "provision")
        assert (event["user_id"], event["engine_id"]) == ("hooked", engine_id)
        assert all(q.verifies(secret) for q in rx.requests)
        assert rx.ids() == sorted(rx.ids())
        r = await client.delete("/engines/hooked", headers=pk(key))
        assert r.status_code == 200, r.text
        await wait_until(lambda: any(json.loads(q.body)["action"] == "destroy" for q in rx.requests), 5)

        async def drained() -> bool:
            got = await client.get(f"/products/{product_id}/webhook", headers={"X-Admin-Key": ADMIN_KEY})
            return bool(got.json()["pending"] == 0)

        await wait_until(drained, 5)
        got = (await client.get(f"/products/{product_id}/webhook", headers={"X-Admin-Key": ADMIN_KEY})).json()
        assert got["last_status"] == 200 and got["last_delivery_at"].endswith("Z") and "secret" not in got
