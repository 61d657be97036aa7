"""Runtime-agnostic helpers for the backend contract suite.

Everything here talks to an engine only through the URL a backend returned, so the same
helpers serve the subprocess, docker and kubernetes runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import inspect
import json
import os
import random
import secrets
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TypeVar, overload

import httpx

from bap_engine.backends.base import (
    LABEL_DEPLOYMENT,
    LABEL_ENGINE_ID,
    LABEL_PRODUCT_ID,
    EngineBackend,
    EngineSpec,
)

__all__ = [
    "DEFAULT_IMAGE",
    "NewEngine",
    "execute",
    "free_port",
    "health_ok",
    "history",
    "make_spec",
    "support_for",
    "wait_healthy",
    "wait_until",
]

T = TypeVar("T")

# Image tag for docker/kubernetes runs (informational for subprocess).
DEFAULT_IMAGE = os.environ.get("BAP_TEST_ENGINE_IMAGE", "bap-engine/refengine:dev")
# Ports for test engines: away from the orchestrator's default 9001-9999 and from ephemeral ports.
_PORT_RANGE = os.environ.get("BAP_TEST_PORT_RANGE", "20000-29999")
_handed_out: set[int] = set()


def support_for(backend: EngineBackend) -> ModuleType:
    """The `tests.backends.support_<name>` module of a backend (kill_behind_back, make_backend...)."""
    return importlib.import_module(f"tests.backends.support_{backend.name}")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when `host:port` can be bound right now (SO_REUSEADDR, as servers do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(port_range: str | None = None, host: str = "127.0.0.1") -> int:
    """A random bindable port in `port_range` ("lo-hi", default BAP_TEST_PORT_RANGE or 20000-29999)
    never handed out before in this test process."""
    lo, hi = (int(part) for part in (port_range or _PORT_RANGE).split("-", 1))
    for _ in range(500):
        port = random.randint(lo, hi)
        if port not in _handed_out and port_is_free(port, host):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port in {lo}-{hi}")


@dataclass(frozen=True, slots=True)
class NewEngine:
    """A spec ready for `backend.create` plus the plaintext key its ENGINE_KEY_HASH matches."""

    spec: EngineSpec
    key: str

    @property
    def engine_id(self) -> str:
        return self.spec.engine_id


def make_spec(
    port: int | None = None,
    *,
    deployment: str | None = None,
    image: str = DEFAULT_IMAGE,
    product_id: str | None = None,
    extra_labels: dict[str, str] | None = None,
) -> NewEngine:
    """A fresh engine spec with a random key (only its sha256 goes in the env) and the
    bap-engine labels. LABEL_DEPLOYMENT is set only when `deployment` is given: a backend
    stamps its own deployment label, and the suite checks that it does."""
    key = secrets.token_urlsafe(32)
    engine_id, product = str(uuid.uuid4()), product_id or str(uuid.uuid4())
    labels = {LABEL_ENGINE_ID: engine_id, LABEL_PRODUCT_ID: product, **(extra_labels or {})}
    if deployment is not None:
        labels[LABEL_DEPLOYMENT] = deployment
    spec = EngineSpec(
        engine_id=engine_id,
        product_id=product,
        port=port if port is not None else free_port(),
        image=image,
        env={"ENGINE_KEY_HASH": hashlib.sha256(key.encode()).hexdigest()},
        labels=labels,
    )
    return NewEngine(spec=spec, key=key)


@overload
async def wait_until(
    predicate: Callable[[], Awaitable[T]], timeout: float, interval: float = ..., what: str = ...
) -> T: ...
@overload
async def wait_until(predicate: Callable[[], T], timeout: float, interval: float = ..., what: str = ...) -> T: ...
async def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05, what: str = "") -> object:
    """Poll `predicate` (sync or async) until it returns something truthy; return that value.
    Raises AssertionError after `timeout` seconds, naming `what` and the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate!r}: last {value!r}")
        await asyncio.sleep(interval)


async def health_ok(url: str, timeout: float = 1.0) -> bool:
    """True when GET {url}/health answers 200 with {"status": "ok"} within `timeout`."""
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            response = await client.get(f"{url}/health")
        return response.status_code == 200 and response.json().get("status") == "ok"
    except (httpx.TransportError, ValueError):
        return False


async def wait_healthy(url: str, timeout: float = 30.0) -> None:
    """Wait until the engine at `url` reports healthy; AssertionError after `timeout`."""
    await wait_until(lambda: health_ok(url), timeout, what=f"{url}/health")


async def execute(url: str, key: str, message: str, timeout: float = 10.0) -> tuple[int, list[dict[str, object]]]:
    """POST /execute and read the whole SSE stream: (status, [{"event", "data"}...])."""
    events: list[dict[str, object]] = []
    async with (
        httpx.AsyncClient(timeout=timeout) as client,
        client.stream("POST", f"{url}/execute", json={"message": message}, headers={"X-Engine-Key": key}) as r,
    ):
        if r.status_code != 200:
            await r.aread()
            return r.status_code, events
        name = ""
        async for line in r.aiter_lines():
            if line.startswith("event:"):
                name = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                events.append({"event": name, "data": json.loads(line.removeprefix("data:"))})
    return r.status_code, events


async def history(url: str, key: str, timeout: float = 10.0) -> list[dict[str, object]]:
    """GET /history with the engine key; the stored messages, oldest first."""
    async with httpx.AsyncClient(timeout=timeout) as client:
        response = await client.get(f"{url}/history", headers={"X-Engine-Key": key})
    response.raise_for_status()
    messages = response.json()["messages"]
    assert isinstance(messages, list)
    return messages
