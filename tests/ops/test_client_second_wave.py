"""The client's second wave against a real `bap-engine serve`: events() (SSE, reconnect, resume),
iter_audit()/audit_page(), usage(), set_idle_sleep(), the webhook admin calls.

Reconnects are forced by a transport that wraps the real one and cuts the /events response after a
number of events, in the middle of the next one: once as a dropped connection (ReadError), once as a
stream the server ended. The events then yielded are compared with the audit log itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from bap_engine_client._calls import SseParser

from bap_engine.client import (
    AsyncBapClient,
    BapClient,
    EngineNotFound,
    Event,
    InvalidPlatformKey,
    RetryPolicy,
    WebhookNotFound,
)
from tests.ops.conftest import OpsProduct, OpsServer

HIDDEN = {"health_check", "admit_denied"}


# --- a transport that cuts the event stream ------------------------------------------------------------
class _Cutter:
    """Splits the bytes of one /events response into frames; after `keep` event frames it sends half of
    the next one (`partial`; else nothing more), then drops the connection (`drop`) or ends the stream."""

    def __init__(self, keep: int | None, drop: bool, partial: bool) -> None:
        self.keep, self.drop, self.partial = keep, drop, partial
        self.buffer = b""
        self.frames = 0
        self.cut = False

    def feed(self, chunk: bytes) -> list[bytes]:
        out: list[bytes] = []
        self.buffer += chunk
        while b"\n\n" in self.buffer and not self.cut:
            frame, self.buffer = self.buffer.split(b"\n\n", 1)
            if self.keep is not None and frame.startswith(b"id:") and self.frames == self.keep:
                out.append(frame[: len(frame) // 2])
                self.cut = True
                break
            self.frames += frame.startswith(b"id:")
            out.append(frame + b"\n\n")
            if self.keep is not None and not self.partial and self.frames == self.keep:
                self.cut = True
        return out


class _Recorder:
    """What the cutting transports saw: the Last-Event-ID of each /events request, the streams closed."""

    def __init__(self, plan: list[tuple[int | None, bool]], partial: bool = True) -> None:
        self.plan = plan  # per /events connection: (events kept before the cut, drop), then pass-through
        self.partial = partial
        self.last_event_ids: list[str | None] = []
        self.opened = 0
        self.closed = 0

    def cutter(self, request: httpx.Request) -> _Cutter | None:
        if request.url.path != "/events":
            return None
        n = len(self.last_event_ids)
        self.last_event_ids.append(request.headers.get("Last-Event-ID"))
        self.opened += 1
        keep, drop = self.plan[n] if n < len(self.plan) else (None, False)
        return _Cutter(keep, drop, self.partial)


class _CutSync(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, cutter: _Cutter, rec: _Recorder) -> None:
        self.inner, self.cutter, self.rec = inner, cutter, rec

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            yield from self.cutter.feed(chunk)
            if self.cutter.cut:
                if self.cutter.drop:
                    raise httpx.ReadError("connection cut by the test")
                return

    def close(self) -> None:
        self.rec.closed += 1
        self.inner.close()


class _CutAsync(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, cutter: _Cutter, rec: _Recorder) -> None:
        self.inner, self.cutter, self.rec = inner, cutter, rec

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner:
            for piece in self.cutter.feed(chunk):
                yield piece
            if self.cutter.cut:
                if self.cutter.drop:
                    raise httpx.ReadError("connection cut by the test")
                return

    async def aclose(self) -> None:
        self.rec.closed += 1
        await self.inner.aclose()


class CutTransport(httpx.HTTPTransport):
    def __init__(self, rec: _Recorder) -> None:
        super().__init__()
        self.rec = rec

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        cutter = self.rec.cutter(request)
        if cutter is None or response.status_code != 200:
            return response
        assert isinstance(response.stream, httpx.SyncByteStream)
        return httpx.Response(response.status_code, headers=response.headers, extensions=response.extensions,
                              stream=_CutSync(response.stream, cutter, self.rec))


class AsyncCutTransport(httpx.AsyncHTTPTransport):
    def __init__(self, rec: _Recorder) -> None:
        super().__init__()
        self.rec = rec

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        cutter = self.rec.cutter(request)
        if cutter is None or response.status_code != 200:
            return response
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(response.status_code, headers=response.headers, extensions=response.extensions,
                              stream=_CutAsync(response.stream, cutter, self.rec))


def _newest_id(bap: BapClient) -> int:
    page = bap.audit_page(limit=1)
    return page.events[0].id if page.events else 0


def _truth(bap: BapClient, after: int) -> list[int]:
    """The ids of the product's events after `after`, oldest first, from the audit log."""
    return sorted(r.id for r in bap.iter_audit(page_size=1000) if r.id > after and r.action not in HIDDEN)


# --- events ----------------------------------------------------------------------------------------------
def test_events_resume_after_a_drop_and_an_end_without_loss_or_duplicates(ops_server: OpsServer, bap: BapClient,
                                                                           product: OpsProduct) -> None:
    start = _newest_id(bap)
    bap.provision("ev-a")
    bap.stop("ev-a")
    bap.start("ev-a")
    truth = _truth(bap, start)
    assert len(truth) >= 3

    # connection 1: one event, then dropped mid-event; connection 2: one more, then ended by the "server"
    rec = _Recorder([(1, True), (1, False)])
    seen: list[Event] = []
    with BapClient(ops_server.url, platform_key=product.platform_key, transport=CutTransport(rec)) as b:
        stream = b.events(after_id=start, reconnect_delay=0.01)
        for event in stream:
            seen.append(event)
            if event.id == truth[-1]:
                break
        stream.close()
        assert rec.closed == rec.opened == 3  # every response closed, the last one when the caller stopped

    assert [e.id for e in seen] == truth  # each event once, in order, none lost across the cuts
    ev_a = [e.action for e in seen if e.user_id == "ev-a"]
    assert ev_a == ["provision", "stop", "start"], ev_a
    assert rec.last_event_ids == [str(start), str(seen[0].id), str(seen[1].id)]
    provision = next(e for e in seen if e.action == "provision")
    assert provision.engine_id and provision.actor and isinstance(provision.timestamp, datetime)
    assert provision.timestamp.tzinfo is not None
    bap.destroy("ev-a")


async def test_async_events_live_in_order_across_a_reconnect(ops_server: OpsServer, product: OpsProduct) -> None:
    rec = _Recorder([(1, False)])  # the first connection ends after one event: a reconnect mid-way
    seen: list[Event] = []
    async with AsyncBapClient(ops_server.url, platform_key=product.platform_key,
                              transport=AsyncCutTransport(rec)) as bap:

        async def consume() -> None:
            async with contextlib.aclosing(bap.events(reconnect_delay=0.01)) as stream:  # from now on: live
                async for event in stream:
                    seen.append(event)
                    if event.user_id == "ev-live" and event.action == "destroy":
                        return

        task = asyncio.create_task(consume())
        for _ in range(200):  # until the stream is open (its start point was read before)
            if rec.opened:
                break
            await asyncio.sleep(0.02)
        assert rec.opened == 1
        await bap.provision("ev-live")
        await bap.stop("ev-live")
        await bap.start("ev-live")
        await bap.destroy("ev-live")
        await asyncio.wait_for(task, 30)

    mine = [e.action for e in seen if e.user_id == "ev-live"]
    assert mine == ["provision", "stop", "start", "destroy"], mine
    ids = [e.id for e in seen]
    assert ids == sorted(set(ids))  # increasing, no duplicate
    assert rec.opened >= 2 and rec.last_event_ids[1] == str(seen[0].id)
    assert rec.closed == rec.opened


def test_events_bad_key_raises_at_once(ops_server: OpsServer) -> None:
    rec = _Recorder([])
    with BapClient(ops_server.url, platform_key="pk-sept-wrong", transport=CutTransport(rec)) as bad:
        with pytest.raises(InvalidPlatformKey):
            next(bad.events())  # reads the newest audit id first: 401
        with pytest.raises(InvalidPlatformKey):
            next(bad.events(after_id=0))  # the stream itself answers 401: not retried
        with pytest.raises(InvalidPlatformKey):
            next(bad.events(reconnect=False))
    assert rec.opened == 2  # one request each, never a retry


def test_events_without_reconnect_end_with_the_stream(ops_server: OpsServer, bap: BapClient,
                                                      product: OpsProduct) -> None:
    start = _newest_id(bap)
    bap.provision("ev-once")
    rec = _Recorder([(1, False)], partial=False)
    with BapClient(ops_server.url, platform_key=product.platform_key, transport=CutTransport(rec)) as b:
        got = list(b.events(after_id=start, reconnect=False))  # the stream "ends" after one event
    assert len(got) == 1 and got[0].action == "provision" and rec.opened == 1
    rec = _Recorder([(0, True)], partial=False)  # dropped after ": connected"
    with BapClient(ops_server.url, platform_key=product.platform_key, transport=CutTransport(rec)) as b:
        with pytest.raises(Exception) as info:
            list(b.events(after_id=start, reconnect=False))
    assert getattr(info.value, "code", None) == "TRANSPORT_ERROR"
    bap.destroy("ev-once")


# --- SSE parsing and reconnect rules, on a stub transport -----------------------------------------------------
def _frames(*events: dict[str, object]) -> bytes:
    return b"".join(b"id: %d\nevent: %s\ndata: %s\n\n" % (e["id"], str(e["action"]).encode(),
                                                          json.dumps(e).encode()) for e in events)


def _ev(i: int, action: str = "stop") -> dict[str, object]:
    return {"id": i, "timestamp": "2025-03-14T09:26:53.000001Z", "action": action, "user_id": "u", "engine_id": None,
            "actor": "ops", "metadata": {"n": i, "text": "a\u2028b"}}


def test_sse_parser_rules() -> None:
    raw = ("\ufeff: connected\r\nretry: 1500\r\n\r\n"
           'id: 7\nevent: stop\ndata: {"id": 7,\ndata:  "action": "stop"}\n\n'
           ": keep-alive\n\n"
           "data\n\n"  # a field without a colon: data ""
           "id: 8\rdata:x\r\r"  # CR line ends
           "event: only-type\n\n"  # no data: not dispatched
           "retry: soon\nid: a\0b\ndata: y\n\n").encode()
    for size in (1, 2, 3, 7, len(raw)):
        parser = SseParser()
        got = [m for i in range(0, len(raw), size) for m in parser.feed(raw[i:i + size])]
        assert [(m.id, m.event, m.data) for m in got] == [
            ("7", "stop", '{"id": 7,\n "action": "stop"}'), ("7", "message", ""), ("8", "message", "x"),
            ("8", "message", "y")], size
        assert json.loads(got[0].data) == {"id": 7, "action": "stop"}
        assert parser.retry_ms == 1500 and parser.comments == 2


def test_stub_reconnect_resumes_and_retries_a_503() -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/audit":
            return httpx.Response(200, json={"events": [], "next_cursor": None})
        seen.append(request.headers.get("Last-Event-ID"))
        if len(seen) == 1:  # two events and half of a third, then the stream ends
            return httpx.Response(200, content=b": connected\nretry: 10\n\n" + _frames(_ev(1), _ev(2))
                                  + _frames(_ev(3))[:30], headers={"content-type": "text/event-stream"})
        if len(seen) == 2:
            return httpx.Response(503, json={"error": {"code": "SERVICE_UNAVAILABLE", "message": "restarting"}})
        return httpx.Response(200, content=_frames(_ev(2), _ev(3), _ev(4, "destroy")),
                              headers={"content-type": "text/event-stream"})

    with BapClient("http://stub", platform_key="pk", transport=httpx.MockTransport(handler),
                   retry=RetryPolicy(backoff_max_s=0.05)) as bap:
        got = []
        for event in bap.events():
            got.append(event)
            if event.action == "destroy":
                break
    assert [e.id for e in got] == [1, 2, 3, 4]  # 2 sent again by the (stub) server is not yielded twice
    assert seen == ["0", "2", "2"]
    assert got[0].metadata == {"n": 1, "text": "a\u2028b"} and got[0].timestamp == datetime(
        2025, 3, 14, 9, 26, 53, 1, tzinfo=UTC)


# --- audit, usage, idle sleep, webhooks ---------------------------------------------------------------------
def test_iter_audit_visits_every_page_once(bap: BapClient, product: OpsProduct) -> None:
    bap.provision("au-a")
    bap.stop("au-a")
    bap.start("au-a")
    bap.stop("au-a")
    everything = bap.audit_page(limit=1000)
    assert everything.next_cursor is None
    ids = [r.id for r in everything.events]
    assert len(ids) >= 5 and ids == sorted(ids, reverse=True)

    first = bap.audit_page(limit=2)
    assert len(first.events) == 2 and first.next_cursor
    second = bap.audit_page(limit=2, cursor=first.next_cursor)
    assert [r.id for r in first.events + second.events] == ids[:4]

    paged = [r.id for r in bap.iter_audit(page_size=2)]
    assert paged == ids  # > 2 pages, every row once, newest first
    assert all(r.product_id is None and r.actor for r in everything.events)
    stops = list(bap.iter_audit(user_id="au-a", action="stop", page_size=1))
    assert [r.action for r in stops] == ["stop", "stop"]
    assert list(bap.iter_audit(until=datetime(2000, 1, 1, tzinfo=UTC))) == []
    recent = list(bap.iter_audit(since=datetime.now(UTC) - timedelta(minutes=10), engine_id=stops[0].engine_id))
    assert {r.user_id for r in recent} == {"au-a"} and len(recent) >= 4
    with pytest.raises(ValueError):
        bap.audit_page(since=datetime(2025, 1, 1))  # naive: ambiguous
    bap.destroy("au-a")


def test_usage_returns_the_user(bap: BapClient) -> None:
    bap.provision("us-a")
    bap.stop("us-a")
    report = bap.usage()
    assert report.since and report.until and report.until - report.since == timedelta(hours=24)
    users = {u.user_id: u for u in report.users}
    assert users["us-a"].provisions == 1 and users["us-a"].running_s >= 0
    assert report.totals.provisions == sum(u.provisions for u in report.users)
    soon = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    one = bap.usage(since=datetime.now(UTC) - timedelta(hours=1), until=soon, user_id="us-a")
    assert [u.user_id for u in one.users] == ["us-a"]
    none = bap.usage(user_id="nobody")
    assert none.users == () and none.totals.provisions == 0
    bap.destroy("us-a")


def test_set_idle_sleep_round_trip(bap: BapClient) -> None:
    made = bap.provision("is-a")
    assert made.api_key
    never = bap.set_idle_sleep("is-a", "never")
    assert never.idle_sleep == "never" and never.user_id == "is-a" and never.status == "running"
    assert bap.get("is-a").idle_sleep == "never"
    assert [e.idle_sleep for e in bap.iter_engines()] == ["never"]
    assert bap.set_idle_sleep("is-a", "auto").idle_sleep == "auto"
    assert bap.get("is-a").idle_sleep == "auto"
    with pytest.raises(EngineNotFound):
        bap.set_idle_sleep("nobody", "never")
    assert bap.status().warm == 0
    bap.destroy("is-a")


def test_webhook_set_show_delete(admin: BapClient, product: OpsProduct, ops_server: OpsServer) -> None:
    made = admin.set_webhook(product.product_id, "http://127.0.0.1:9/hooks/bap")
    url, secret = made
    ops_server.secrets.append(secret)
    assert url == "http://127.0.0.1:9/hooks/bap" and secret.startswith("whsec_") and secret not in repr(made)
    hook = admin.get_webhook(product.product_id)
    assert hook.url == url and hook.pending >= 0 and hook.last_status is None and hook.last_delivery_at is None
    again = admin.set_webhook(product.product_id, "https://example.org/other")
    ops_server.secrets.append(again.secret)
    assert again.secret != secret and admin.get_webhook(product.product_id).url == "https://example.org/other"
    assert admin.delete_webhook(product.product_id) is None
    with pytest.raises(WebhookNotFound) as info:
        admin.get_webhook(product.product_id)
    assert info.value.status == 404
    with pytest.raises(WebhookNotFound):
        admin.delete_webhook(product.product_id)
