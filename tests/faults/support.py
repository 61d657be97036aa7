"""Helpers shared by the fault tests: a thin API client on a served URL, answer classification,
database and process views of the fleet, and the Prometheus text."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import asyncpg
import httpx

from bap_engine.config import Settings
from tests.conftest import ADMIN_KEY, pk
from tests.e2e.test_crash_safety import engine_pids, register

__all__ = ["Api", "Call", "classify", "engine_rows", "audit_count", "audit_trail", "prometheus_text", "engine_pids",
           "register", "unique_user"]


def unique_user(prefix: str) -> str:
    return f"{prefix}-{os.urandom(4).hex()}"


@dataclass
class Call:
    """One request made during a fault: what, how it ended, and how long it took."""

    op: str
    user: str
    status: int | None  # None: no answer (timeout, connection error)
    body: str
    seconds: float
    error: str = ""
    doc: dict[str, object] = field(default_factory=dict)
    at: float = 0.0  # time.monotonic() when it was sent


class Api:
    """The calls the fault tests make, on one served orchestrator and one platform key."""

    def __init__(self, url: str, key: str, timeout: float = 30) -> None:
        self.url = url
        self.key = key
        self.timeout = timeout

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=pk(self.key), timeout=self.timeout)

    async def call(self, c: httpx.AsyncClient, op: str, user: str) -> Call:
        """op: admit_new (auto_provision), admit (auto_wake), provision, get, stop, start, delete."""
        started = time.monotonic()
        try:
            r = await self._send(c, op, user)
        except httpx.HTTPError as err:
            return Call(op, user, None, "", time.monotonic() - started, type(err).__name__, at=started)
        call = Call(op, user, r.status_code, r.text, time.monotonic() - started, at=started)
        try:
            doc = r.json()
            call.doc = doc if isinstance(doc, dict) else {}
        except ValueError:
            pass
        return call

    async def _send(self, c: httpx.AsyncClient, op: str, user: str) -> httpx.Response:
        if op == "admit_new":
            return await c.post(f"/engines/{user}/admit", json={"auto_provision": True, "auto_wake": True})
        if op == "admit":
            return await c.post(f"/engines/{user}/admit", json={"auto_wake": True})
        if op == "provision":
            return await c.post("/engines/provision", json={"user_id": user})
        if op == "get":
            return await c.get(f"/engines/{user}")
        if op == "delete":
            return await c.delete(f"/engines/{user}")
        if op in ("stop", "start"):
            return await c.post(f"/engines/{user}/{op}")
        raise ValueError(op)

    async def admitted(self, user: str, *, provision: bool = True) -> dict[str, object]:
        """Admit (provisioning if asked) and return the engine object; fails on anything else."""
        async with self.client() as c:
            call = await self.call(c, "admit_new" if provision else "admit", user)
        assert call.status == 200 and call.doc.get("admitted") is True, (call.status, call.body, call.error)
        engine = call.doc["engine"]
        assert isinstance(engine, dict)
        return engine

    async def health(self) -> int:
        try:
            async with httpx.AsyncClient(timeout=3) as c:
                return (await c.get(f"{self.url}/health")).status_code
        except httpx.HTTPError:
            return 0


def classify(call: Call, accepted_errors: set[tuple[int, str]]) -> str:
    """"ok" for a 2xx, "error:<status> <code>" for an accepted envelope, else a description of
    what is wrong with the answer (a 500, a body that is not the envelope, no answer)."""
    if call.status is None:
        return f"no answer ({call.error}) after {call.seconds:.1f}s"
    if 200 <= call.status < 300:
        return "ok"
    error = call.doc.get("error")
    if set(call.doc) != {"error"} or not isinstance(error, dict) or set(error) != {"code", "message"} \
            or not isinstance(error.get("message"), str) or not error["message"]:
        return f"not an envelope: {call.status} {call.body[:200]!r}"
    if (call.status, error["code"]) in accepted_errors:
        return f"error:{call.status} {error['code']}"
    return f"unexpected error: {call.status} {call.body[:300]}"


async def engine_rows(dsn: str, settings: Settings) -> list[dict[str, object]]:
    """This test's engines rows (by its deployment)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT id::text AS id, user_id, status, op, port, url FROM engines WHERE deployment = $1",
            settings.deployment)
    finally:
        await conn.close()
    return [dict(r) for r in rows]


async def audit_count(dsn: str, engine_id: str, action: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        n = await conn.fetchval("SELECT count(*) FROM audit_log WHERE engine_id = $1 AND action = $2",
                                engine_id, action)
    finally:
        await conn.close()
    return int(n)


async def audit_trail(dsn: str, engine_id: str | None = None, user_id: str | None = None) -> list[str]:
    """The audit rows of an engine (or of a user's engines), oldest first, as
    "time engine action actor metadata" lines (for failure messages)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT timestamp, engine_id::text AS engine_id, action, actor, metadata::text AS metadata "
            "FROM audit_log WHERE engine_id = $1::uuid OR user_id = $2 ORDER BY id", engine_id, user_id)
    finally:
        await conn.close()
    return [f"{r['timestamp']:%H:%M:%S.%f} {str(r['engine_id'])[:8]} {r['action']} {r['actor']} {r['metadata']}"
            for r in rows]


async def prometheus_text(url: str) -> tuple[int, str]:
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.get(f"{url}/metrics/prometheus", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    return r.status_code, r.text
