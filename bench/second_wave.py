"""Second wave (issue text): warm-pool admit, lifecycle-event latency to an SSE consumer and to a
webhook receiver, and 200 concurrent SSE consumers on one replica with their CPU per event.

Run pinned to CPU 1. It starts `bap-engine serve` (embedded Postgres, CPU 0), then:

  1. no pool: admit {auto_provision} of a new user (boots an engine), interleaved with bare
     reference-engine starts (start -> first healthy /health), the floor the pool saves;
  2. events: one raw SSE consumer of GET /events and a webhook receiver on 127.0.0.1 (an asyncio
     HTTP/1.1 server in this process answering 200), then PATCH /engines/{u} {idle_sleep}
     alternating "never"/"auto" (one `settings_update` audit row per call, no engine touched);
     latency = receive time here - the event's `timestamp` (both this machine's wall clock);
  3. fan-out: the same triggers with 1, then 200 consumers connected; serve's CPU during a
     fixed window around each run, and every consumer's receipts;
  4. warm pool: a product with policy {"warm_pool": 10}; each round waits (untimed) until
     GET /status says warm >= 1, then times one admit {auto_provision} of a new user.

Everything it creates is destroyed (the pool by setting its policy to {} and waiting for warm 0),
then serve is stopped. Engine ports 31700-31779, bare engines 31780-31799.

    python bench/second_wave.py WORKDIR
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import orjson

from common import (
    HOST,
    BareEngine,
    Orchestrator,
    PortPicker,
    Table,
    cpu_seconds,
    end_bare,
    log,
    main_entry,
    median,
    ms,
    pct,
    spawn_bare,
    tree_cpu_seconds,
    wait_healthy,
)

PORT_MIN, PORT_MAX = 31700, 31779  # the orchestrator's engines (shared with sweep's serve, which boots none)
BARE_PORTS = (31780, 31799)
BOOT_TIMEOUT_S = 60
PLAIN_ROUNDS = 15  # admits without a pool, each followed by one bare start
POOL_SIZE = 10
POOL_ROUNDS = 30  # wait warm >= 1, then one timed admit
POOL_FULL_ROUNDS = 15  # wait until the pool is full again (no refill boot in flight), then one timed admit
EVENTS = 100
EVENT_SPACING_S = 0.020
FANOUT = 200
FANOUT_EVENTS = 50
FANOUT_SPACING_S = 0.050
FANOUT_WINDOW_S = FANOUT_EVENTS * FANOUT_SPACING_S + 1.5  # the same CPU window for the 1- and 200-consumer runs
DELIVERY_WAIT_S = 10
ACTION = "settings_update"
MARK = b"event: " + ACTION.encode() + b"\n"

SSE_TARGET_S = 0.050
WEBHOOK_TARGET_S = 0.250
POOL_TARGET_S = 0.030


def wall_of(iso: str) -> float:
    """An API timestamp (ISO-8601, milliseconds, Z) as a Unix time."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def sched_cpu_s(pid: int) -> float | None:
    """CPU time of a process's live threads from /proc/<pid>/task/*/schedstat (nanoseconds, so a
    2-second window is not at the mercy of 10 ms clock ticks); None when not readable."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return total / 1e9 if total else None


@dataclass
class CpuMark:
    serve_ns: float | None
    serve_ticks: float
    pg: float

    @classmethod
    def take(cls, o: Orchestrator) -> CpuMark:
        return cls(sched_cpu_s(o.pid), cpu_seconds(o.pid), tree_cpu_seconds(o.postmaster()))

    def since(self, before: CpuMark) -> tuple[float, float, float]:
        """(serve, serve by clock ticks, Postgres) CPU seconds between two marks."""
        serve_ticks = self.serve_ticks - before.serve_ticks
        if self.serve_ns is not None and before.serve_ns is not None:
            serve = self.serve_ns - before.serve_ns
        else:
            serve = serve_ticks
        return serve, serve_ticks, self.pg - before.pg


# ---- a raw SSE consumer ------------------------------------------------------------------------
class SSEConsumer(asyncio.Protocol):
    """One GET /events over a plain socket. data_received only stamps and keeps each chunk (so 200
    of these cost the driver little and a late consumer's stamp does not include parsing the
    others'); `frames()` decodes them afterwards (HTTP/1.1 chunked, then SSE)."""

    def __init__(self, port: int, key: str) -> None:
        loop = asyncio.get_running_loop()
        self.request = (f"GET /events HTTP/1.1\r\nHost: {HOST}:{port}\r\nX-Platform-Key: {key}\r\n"
                        "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n").encode()
        self.chunks: list[tuple[float, bytes]] = []
        self.marks = 0  # a cheap live count of our events (the decode afterwards is the truth)
        self.connected: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's is no asyncio.Transport subclass)
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.chunks.append((time.time(), data))
        self.marks += data.count(MARK)
        if not self.connected.done() and b": connected" in b"".join(c for _, c in self.chunks[-3:]):
            self.connected.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.connected.done():
            self.connected.set_exception(ConnectionError(f"/events closed before ': connected' ({exc})"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def frames(self) -> tuple[str, list[tuple[dict[str, object], float]]]:
        """(status line, [(event data, time the chunk that completed it arrived)])."""
        raw, body = bytearray(), bytearray()
        head: str | None = None
        chunked = False
        out: list[tuple[dict[str, object], float]] = []
        for t, data in self.chunks:
            raw += data
            if head is None:
                i = raw.find(b"\r\n\r\n")
                if i < 0:
                    continue
                head = bytes(raw[:i]).decode("latin-1")
                del raw[:i + 4]
                chunked = "transfer-encoding: chunked" in head.lower()
            if chunked:
                while (j := raw.find(b"\r\n")) >= 0:
                    size = int(bytes(raw[:j]).split(b";")[0], 16)
                    if len(raw) < j + 2 + size + 2:
                        break
                    body += raw[j + 2:j + 2 + size]
                    del raw[:j + 2 + size + 2]
                    if size == 0:
                        break
            else:
                body += raw
                raw.clear()
            while (k := body.find(b"\n\n")) >= 0:
                frame = bytes(body[:k])
                del body[:k + 2]
                data_lines = [ln[5:].lstrip(b" ") for ln in frame.split(b"\n") if ln.startswith(b"data:")]
                if data_lines:
                    out.append((orjson.loads(b"\n".join(data_lines)), t))
        return (head or "").split("\r\n", 1)[0], out


async def open_consumers(o: Orchestrator, key: str, n: int, timeout: float = 30) -> list[SSEConsumer]:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(50)

    async def one() -> SSEConsumer:
        async with gate:
            _, proto = await loop.create_connection(lambda: SSEConsumer(o.port, key), HOST, o.port)
            await asyncio.wait_for(proto.connected, timeout)
            return proto

    return list(await asyncio.gather(*(one() for _ in range(n))))


def receipts(consumer: SSEConsumer, user: str) -> dict[int, float]:
    """Event id -> latency (receive - timestamp) of this consumer's `settings_update` events of one user."""
    status, frames = consumer.frames()
    if " 200" not in status:
        raise RuntimeError(f"GET /events answered {status!r}")
    got: dict[int, float] = {}
    for doc, t in frames:
        if doc.get("action") == ACTION and doc.get("user_id") == user:
            got.setdefault(int(str(doc["id"])), t - wall_of(str(doc["timestamp"])))
    return got


# ---- a webhook receiver ------------------------------------------------------------------------
@dataclass
class Receiver:
    """A minimal HTTP/1.1 server on 127.0.0.1 (keep-alive, Content-Length or chunked bodies) that
    answers 200 and records, per event id, when the whole body had arrived."""

    secret: str = ""
    got: dict[int, tuple[float, dict[str, object]]] = field(default_factory=dict)
    duplicates: int = 0
    bad_signatures: int = 0
    requests: int = 0
    server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._conn, HOST, 0)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    body = b""
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                        body += (await reader.readexactly(size + 2))[:size]
                        if size == 0:
                            await reader.readuntil(b"\r\n")  # (no trailers are sent)
                            break
                else:
                    body = await reader.readexactly(int(headers.get("content-length", "0")))
                now = time.time()
                self.requests += 1
                self._record(headers, body, now)
                close = headers.get("connection", "").lower() == "close" or lines[0].endswith("HTTP/1.0")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n"
                             + (b"Connection: close\r\n" if close else b"") + b"\r\n")
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    def _record(self, headers: dict[str, str], body: bytes, now: float) -> None:
        stamp = headers.get("x-bap-timestamp", "")
        want = "v1=" + hmac.new(self.secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, headers.get("x-bap-signature", "")):
            self.bad_signatures += 1
        with contextlib.suppress(ValueError):
            doc = orjson.loads(body)
            event_id = int(headers.get("x-bap-event-id") or doc["id"])
            if event_id in self.got:
                self.duplicates += 1
            else:
                self.got[event_id] = (now, doc)

    def latencies(self, user: str) -> dict[int, float]:
        return {i: t - wall_of(str(doc["timestamp"])) for i, (t, doc) in self.got.items()
                if doc.get("action") == ACTION and doc.get("user_id") == user}


# ---- API helpers ---------------------------------------------------------------------------------
async def register(c: httpx.AsyncClient, o: Orchestrator, slug: str,
                   policy: dict[str, object] | None = None) -> tuple[str, str]:
    """(platform key, product id): Orchestrator.register, keeping the product id for admin routes."""
    body: dict[str, object] = {"slug": slug, "display_name": slug}
    if policy is not None:
        body["policy"] = policy
    r = await c.post(o.base + "/products/register", json=body, headers={"X-Admin-Key": o.admin_key})
    r.raise_for_status()
    doc = r.json()
    key = str(doc["platform_api_key"])
    o.users.setdefault(key, set())
    return key, str(doc["product_id"])


async def admit_new(c: httpx.AsyncClient, o: Orchestrator, key: str, user: str) -> tuple[float, dict[str, object]]:
    """One client-timed admit {auto_provision} of a user with no engine yet."""
    o.track(key, user)
    t0 = time.perf_counter()
    r = await c.post(f"{o.base}/engines/{user}/admit", json={"auto_provision": True},
                     headers={"X-Platform-Key": key}, timeout=BOOT_TIMEOUT_S + 30)
    dt = time.perf_counter() - t0
    doc: dict[str, object] = r.json()
    if r.status_code != 200 or doc.get("admitted") is not True:
        raise RuntimeError(f"admit {user}: HTTP {r.status_code} {str(doc)[:200]}")
    return dt, doc


async def destroy(c: httpx.AsyncClient, o: Orchestrator, key: str, user: str) -> None:
    r = await c.delete(f"{o.base}/engines/{user}", headers={"X-Platform-Key": key}, timeout=90)
    if r.status_code not in (200, 404):
        raise RuntimeError(f"DELETE /engines/{user}: HTTP {r.status_code} {r.text[:200]}")
    o.users.get(key, set()).discard(user)


async def warm(c: httpx.AsyncClient, o: Orchestrator, key: str) -> int:
    r = await c.get(f"{o.base}/status", headers={"X-Platform-Key": key})
    r.raise_for_status()
    return int(r.json()["warm"])


async def wait_warm(c: httpx.AsyncClient, o: Orchestrator, key: str, ok: Callable[[int], bool],
                    timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok(await warm(c, o, key)):
            return True
        await asyncio.sleep(0.02)
    return False


async def set_policy(c: httpx.AsyncClient, o: Orchestrator, product_id: str, policy: dict[str, object]) -> None:
    r = await c.put(f"{o.base}/products/{product_id}/policy", json={"policy": policy},
                    headers={"X-Admin-Key": o.admin_key})
    if r.status_code != 200:
        raise RuntimeError(f"PUT policy: HTTP {r.status_code} {r.text[:200]}")


async def trigger(c: httpx.AsyncClient, o: Orchestrator, key: str, user: str, n: int, spacing: float) -> list[float]:
    """n PATCH /engines/{user} {idle_sleep}, each flipping the value (so each writes one
    `settings_update` row), one every `spacing` s; returns their round trips."""
    r = await c.get(f"{o.base}/engines/{user}", headers={"X-Platform-Key": key})
    r.raise_for_status()
    value = str(r.json()["idle_sleep"])
    rtts: list[float] = []
    start = time.perf_counter()
    for i in range(n):
        value = "never" if value == "auto" else "auto"
        t0 = time.perf_counter()
        r = await c.patch(f"{o.base}/engines/{user}", json={"idle_sleep": value}, headers={"X-Platform-Key": key})
        rtts.append(time.perf_counter() - t0)
        if r.status_code != 200 or r.json().get("idle_sleep") != value:
            raise RuntimeError(f"PATCH /engines/{user}: HTTP {r.status_code} {r.text[:200]}")
        await asyncio.sleep(max(0.0, start + (i + 1) * spacing - time.perf_counter()))
    return rtts


async def wait_for(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def p50_p99(values: list[float]) -> str:
    return f"{ms(median(values))} / {ms(pct(values, 99))}"


# ---- sections -------------------------------------------------------------------------------------
async def plain_section(c: httpx.AsyncClient, o: Orchestrator, workdir: Path, t: Table) -> float:
    """Admit {auto_provision} of new users in a product without a pool, interleaved with bare starts.
    Returns the bare p50."""
    key, _ = await register(c, o, "bench-nopool")
    ports = PortPicker(*BARE_PORTS)
    plain: list[float] = []
    bare: list[float] = []
    engines: list[BareEngine] = []
    try:
        for i in range(-1, PLAIN_ROUNDS):  # round -1: an untimed warm-up of both paths
            user = f"nopool-{i + 1}"
            dt, _ = await admit_new(c, o, key, user)
            await destroy(c, o, key, user)
            e = spawn_bare(workdir / "bare", f"bare-{i + 1}", ports.take())
            engines.append(e)
            if not await wait_healthy(e.url, BOOT_TIMEOUT_S):
                raise RuntimeError(f"bare engine {i + 1} not healthy within {BOOT_TIMEOUT_S}s")
            boot = time.perf_counter() - e.started
            end_bare([e])
            if i >= 0:
                plain.append(dt)
                bare.append(boot)
    finally:
        end_bare(engines)
    log(f"no pool: admit p50 {ms(median(plain))}, bare boot p50 {ms(median(bare))}")
    t.add(f"admit of a new user, no pool (boots one): p50 / p99 ({len(plain)})", p50_p99(plain), "the normal path")
    t.add(f"bare refengine start -> healthy: p50 / p99 ({len(bare)})", p50_p99(bare),
          "what the pool saves (~170 ms)")
    return median(bare)


async def events_section(c: httpx.AsyncClient, o: Orchestrator, key: str, product_id: str, rx: Receiver,
                         consumer: SSEConsumer, t: Table) -> None:
    """EVENTS triggers, each received by one SSE consumer and by the webhook receiver."""
    user = "events-user"
    r = await c.put(f"{o.base}/products/{product_id}/webhook", json={"url": f"http://{HOST}:{rx.port}/hook"},
                    headers={"X-Admin-Key": o.admin_key})
    if r.status_code != 200:
        raise RuntimeError(f"PUT webhook: HTTP {r.status_code} {r.text[:200]}")
    rx.secret = str(r.json()["secret"])
    try:
        await asyncio.sleep(0.5)  # the webhook worker's first pass over the new webhook (nothing timed yet)
        log(f"events: {EVENTS} PATCH /engines/{user} {EVENT_SPACING_S * 1000:.0f} ms apart")
        rtts = await trigger(c, o, key, user, EVENTS, EVENT_SPACING_S)
        await wait_for(lambda: consumer.marks >= EVENTS and len(rx.latencies(user)) >= EVENTS, DELIVERY_WAIT_S)
    finally:
        r = await c.delete(f"{o.base}/products/{product_id}/webhook", headers={"X-Admin-Key": o.admin_key})
        if r.status_code != 200:
            log(f"DELETE webhook: HTTP {r.status_code} {r.text[:200]}")
    sse = list(receipts(consumer, user).values())
    hook = list(rx.latencies(user).values())
    log(f"events: SSE p50 {ms(median(sse))} ({len(sse)}), webhook p50 {ms(median(hook))} ({len(hook)})")
    t.add(f"lifecycle event commit -> SSE consumer: p50 / p99 ({len(sse)}/{EVENTS} received)", p50_p99(sse),
          f"p99 <= {SSE_TARGET_S * 1000:.0f} ms", len(sse) == EVENTS and pct(sse, 99) <= SSE_TARGET_S)
    t.add(f"lifecycle event commit -> webhook receiver: p50 / p99 ({len(hook)}/{EVENTS} received)", p50_p99(hook),
          f"p99 <= {WEBHOOK_TARGET_S * 1000:.0f} ms", len(hook) == EVENTS and pct(hook, 99) <= WEBHOOK_TARGET_S)
    t.add("the triggering call, PATCH /engines/{u} {idle_sleep}: round trip p50 / p99", p50_p99(rtts), "the floor")
    slow = sorted(x for x in hook if x > 0.050)
    if slow:
        t.note(f"webhook: {len(slow)} of {len(hook)} deliveries took over 50 ms ({ms(slow[0])} to {ms(slow[-1])}): "
               "consistent with an event committed after the webhook dispatcher's pass ended (at interval - 0.1 s) "
               "waiting for the next pass (workers/base.py run_loop sleeps out the interval): ~10% of the time")
    if rx.bad_signatures or rx.duplicates:
        t.note(f"webhook: {rx.bad_signatures} of {rx.requests} deliveries with a bad X-Bap-Signature, "
               f"{rx.duplicates} duplicates")
    else:
        t.note(f"webhook: all {rx.requests} deliveries carried a valid X-Bap-Signature (HMAC checked here), "
               "none came twice")


async def fanout_run(c: httpx.AsyncClient, o: Orchestrator, key: str, user: str,
                     consumers: list[SSEConsumer]) -> tuple[tuple[float, float, float], list[float], int]:
    """FANOUT_EVENTS triggers with these consumers connected: (CPU in the fixed window, latencies of
    every receipt, receipts)."""
    await asyncio.sleep(0.5)  # settle
    before = CpuMark.take(o)
    t0 = time.monotonic()
    await trigger(c, o, key, user, FANOUT_EVENTS, FANOUT_SPACING_S)
    await wait_for(lambda: all(x.marks >= FANOUT_EVENTS for x in consumers), DELIVERY_WAIT_S)
    left = FANOUT_WINDOW_S - (time.monotonic() - t0)
    if left > 0:
        await asyncio.sleep(left)
    else:
        log(f"fan-out ({len(consumers)}): deliveries took longer than the {FANOUT_WINDOW_S:.1f}s CPU window")
    cpu = CpuMark.take(o).since(before)
    lat: list[float] = []
    for x in consumers:
        lat.extend(receipts(x, user).values())
    return cpu, lat, len(lat)


async def fanout_section(c: httpx.AsyncClient, o: Orchestrator, key: str, consumers: list[SSEConsumer],
                         t: Table) -> None:
    """`consumers` holds the one already open; the others are added to it (the caller closes them all)."""
    first = consumers[0]
    log(f"fan-out: an idle {FANOUT_WINDOW_S:.1f}s window (1 consumer, no event), then {FANOUT_EVENTS} events")
    before = CpuMark.take(o)
    await asyncio.sleep(FANOUT_WINDOW_S)
    idle = CpuMark.take(o).since(before)
    cpu1, lat1, got1 = await fanout_run(c, o, key, "fanout-1", [first])
    log(f"fan-out: opening {FANOUT - 1} more consumers")
    consumers.extend(await open_consumers(o, key, FANOUT - 1))
    everyone = list(consumers)
    log(f"fan-out: {FANOUT_EVENTS} events with {len(everyone)} consumers")
    cpu200, lat200, got200 = await fanout_run(c, o, key, f"fanout-{FANOUT}", everyone)
    expected = FANOUT * FANOUT_EVENTS
    lost = sum(1 for x in everyone if x.lost)
    t.add(f"{FANOUT} SSE consumers on one replica: events delivered / expected", f"{got200:,} / {expected:,}",
          "all", got200 == expected and got1 == FANOUT_EVENTS)
    t.add(f"{FANOUT} consumers: commit -> consumer p50 / p99 ({got200:,} receipts)", p50_p99(lat200),
          f"p99 <= {SSE_TARGET_S * 1000:.0f} ms", got200 == expected and pct(lat200, 99) <= SSE_TARGET_S)
    t.add(f"1 consumer, same run: commit -> consumer p50 / p99 ({got1} receipts)", p50_p99(lat1))
    per1 = (cpu1[0] - idle[0]) / FANOUT_EVENTS
    per200 = (cpu200[0] - idle[0]) / FANOUT_EVENTS
    added = (cpu200[0] - cpu1[0]) / FANOUT_EVENTS / (FANOUT - 1)
    t.add(f"serve CPU per event (PATCH + fan-out, net of idle), 1 / {FANOUT} consumers",
          f"{ms(per1)} / {ms(per200)}")
    t.add("serve CPU added per event per consumer", f"{added * 1e6:,.1f} us",
          f"=> {FANOUT} consumers cost {added * (FANOUT - 1) * 1000:.2f} ms CPU per event")
    t.add(f"Postgres CPU per event, 1 / {FANOUT} consumers",
          f"{ms((cpu1[2] - idle[2]) / FANOUT_EVENTS)} / {ms((cpu200[2] - idle[2]) / FANOUT_EVENTS)}",
          "no query per consumer")
    t.note(f"fan-out: {FANOUT_EVENTS} PATCHes {FANOUT_SPACING_S * 1000:.0f} ms apart with 1 consumer, then with "
           f"{FANOUT} (1 + {FANOUT - 1} raw-socket GET /events, all past ': connected'); CPU = serve's threads' "
           f"schedstat runtime (ns) over the same fixed {FANOUT_WINDOW_S:.1f}s window for both runs "
           f"(serve {cpu1[0]:.3f} s / {cpu200[0]:.3f} s; clock ticks {cpu1[1]:.2f} s / {cpu200[1]:.2f} s), per event "
           f"net of an idle window of the same length ({idle[0] * 1000:.0f} ms serve, {idle[2] * 1000:.0f} ms "
           f"Postgres: the leader's workers); added per event per consumer = (CPU_{FANOUT} - CPU_1) / "
           f"{FANOUT_EVENTS} / {FANOUT - 1}; Postgres = the postmaster's tree (ticks); "
           "receive times are taken by this driver on CPU 1 (a late consumer's includes the driver's loop "
           "reaching its socket)")
    if lost:
        t.note(f"fan-out: {lost} consumers' streams ended before the end of the run")


async def pool_section(c: httpx.AsyncClient, o: Orchestrator, t: Table, bare_p50: float) -> None:
    key, product_id = await register(c, o, "bench-pool", {"warm_pool": POOL_SIZE})
    try:
        log(f"pool: waiting for {POOL_SIZE} warm engines")
        if not await wait_warm(c, o, key, lambda n: n >= POOL_SIZE, 90):
            raise RuntimeError(f"the pool did not reach {POOL_SIZE} warm engines in 90s")
        timed: list[float] = []
        full: list[float] = []
        waits_min = 0
        for i in range(POOL_ROUNDS + POOL_FULL_ROUNDS):
            brief = i < POOL_ROUNDS
            need = 1 if brief else POOL_SIZE
            if not await wait_warm(c, o, key, lambda n, need=need: n >= need, 30):
                raise RuntimeError(f"pool round {i}: fewer than {need} warm engines for 30s")
            if brief and await warm(c, o, key) == 1:
                waits_min += 1
            dt, _ = await admit_new(c, o, key, f"pool-{i}")
            (timed if brief else full).append(dt)
            await destroy(c, o, key, f"pool-{i}")
        r = await c.get(f"{o.base}/audit", params={"action": "pool_claim", "limit": 1000},
                        headers={"X-Platform-Key": key})
        claims = len(r.json().get("events", [])) if r.status_code == 200 else -1
        p50 = median(timed)
        log(f"pool: admit p50 {ms(p50)} ({len(timed)}), pool full p50 {ms(median(full))}; {claims} pool claims")
        t.add(f"admit of a new user, warm pool of {POOL_SIZE} (warm >= 1): p50 / p99 ({len(timed)})", p50_p99(timed),
              f"p50 <= {POOL_TARGET_S * 1000:.0f} ms", p50 <= POOL_TARGET_S and claims == len(timed) + len(full))
        t.add(f"same, pool full at each admit (no refill boot on CPU 0): p50 / p99 ({len(full)})", p50_p99(full))
        t.add("boot the pool saves: bare start p50 - pool admit p50", ms(bare_p50 - p50))
        t.note(f"pool: policy {{\"warm_pool\": {POOL_SIZE}}}; each round waits (untimed) for GET /status warm >= 1 "
               f"({POOL_ROUNDS} rounds) or warm = {POOL_SIZE} ({POOL_FULL_ROUNDS} rounds), then times one admit "
               "{auto_provision} of a new user, then destroys it (untimed); in the warm >= 1 rounds the leader's "
               "refill boots (4 at a time, ~1 s cadence) share CPU 0 with the admit"
               + (f"; {waits_min} of them found only 1 warm" if waits_min else ""))
        t.note(f"pool: {claims} pool_claim audit rows for {len(timed) + len(full)} admits (every admit took a pool "
               "engine" + (")" if claims == len(timed) + len(full) else ": NOT all did)"))
    finally:
        with contextlib.suppress(Exception):
            await set_policy(c, o, product_id, {})
            if not await wait_warm(c, o, key, lambda n: n == 0, 30):
                log("pool: still warm engines 30s after warm_pool 0 (stop reaps them by pid)")
            await asyncio.sleep(1.0)  # the last pool destroys finish (warm counts only idle running ones)


async def main(workdir: Path) -> int:
    t = Table("Second wave: warm pool, lifecycle events, webhooks (subprocess backend; orchestrator on CPU 0)")
    o = Orchestrator("second_wave", workdir, env={
        "ORCH_PORT_MIN": str(PORT_MIN), "ORCH_PORT_MAX": str(PORT_MAX), "ORCH_BOOT_TIMEOUT_S": str(BOOT_TIMEOUT_S),
        "ORCH_HEALTH_CHECK_INTERVAL_S": "3600", "ORCH_LOG_LEVEL": "WARNING"})
    rx = Receiver()
    consumers: list[SSEConsumer] = []
    rc = 0
    limits = httpx.Limits(max_connections=20, max_keepalive_connections=20)
    async with httpx.AsyncClient(timeout=30, limits=limits) as c:
        try:
            await o.start()
            await rx.start()
            bare_p50 = await plain_section(c, o, workdir, t)
            key, product_id = await register(c, o, "bench-events")
            for user in ("events-user", "fanout-1", f"fanout-{FANOUT}"):
                await admit_new(c, o, key, user)
            first = (await open_consumers(o, key, 1))[0]
            consumers.append(first)
            await events_section(c, o, key, product_id, rx, first, t)
            t.note("events: latency = receive time in this driver (time.time(), on CPU 1) - the event's `timestamp` "
                   "(the audit row's DEFAULT now(): the start of the committing transaction, so a little before "
                   "its commit; milliseconds, truncated: up to 1 ms more); both are this machine's wall clock. "
                   f"{EVENTS} PATCH /engines/{{u}} {{idle_sleep}} flips {EVENT_SPACING_S * 1000:.0f} ms apart, "
                   "each one settings_update row; SSE: one raw-socket GET /events; webhook: an asyncio HTTP/1.1 "
                   "receiver on 127.0.0.1 answering 200, time taken when the body is complete")
            await fanout_section(c, o, key, consumers, t)
            for x in consumers:
                x.close()
            consumers.clear()
            await pool_section(c, o, t, bare_p50)
            t.note("no pool vs bare: each timed admit (a new user, then DELETE, untimed) is followed by one bare "
                   "`python -m bap_engine.refengine` start pinned to CPU 0, timed to its first healthy /health "
                   "with the orchestrator's own probe; one untimed warm-up round first")
        except Exception as err:
            t.note(f"ERROR: {type(err).__name__}: {err}")
            rc = 1
        finally:
            for x in consumers:
                x.close()
            await rx.stop()
            if o.proc is not None and o.proc.poll() is None:
                destroyed, bad = await o.destroy_all(c)
                log(f"destroyed {destroyed} engines ({bad} failed)")
            o.stop()
            t.print()
    return rc


if __name__ == "__main__":
    main_entry(main)

