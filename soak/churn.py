"""The churn clients: concurrent asyncio tasks doing provision, admit (auto_provision and
auto_wake, or neither), get, stop, start, rotate-key and destroy at random against both
replicas, over each product's small pool of users (a skewed choice, so some users stay hot
and the cold ones go to sleep). Every answer is logged as an `Answer` for the checks.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import httpx

from soak.cluster import Product, Replica

__all__ = ["Answer", "Churn", "OPS"]

# op -> weight
OPS: dict[str, int] = {
    "admit": 40, "admit-noflags": 6, "get": 6, "provision": 8, "start": 10, "stop": 10, "rotate-key": 8,
    "destroy": 6,
}
_TIMEOUT_S = 60.0  # boot timeout (20 s) + waiting for a concurrent provision + slack


@dataclass(frozen=True, slots=True)
class Answer:
    op: str
    product: str
    user: str
    replica: str
    t0: float  # wall clock (time.time()) when sent
    t1: float  # wall clock when answered
    status: int  # HTTP status; 0 = no answer (transport error)
    code: str = ""  # error code of a non-2xx, the admit reason of a 200 not admitted, the exception name
    engine_id: str | None = None
    admitted: bool | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def _request(op: str, user: str, rng: random.Random) -> tuple[str, str, dict[str, object] | None]:
    if op == "admit":
        return "POST", f"/engines/{user}/admit", {"auto_provision": True, "auto_wake": True}
    if op == "admit-noflags":
        flags: list[dict[str, object]] = [{}, {"auto_wake": True}, {"auto_provision": True}]
        return "POST", f"/engines/{user}/admit", rng.choice(flags)
    if op == "provision":
        return "POST", "/engines/provision", {"user_id": user}
    if op == "get":
        return "GET", f"/engines/{user}", None
    if op == "destroy":
        return "DELETE", f"/engines/{user}", None
    return "POST", f"/engines/{user}/{op}", None  # start, stop, rotate-key


def _parse(op: str, r: httpx.Response) -> tuple[str, str | None, bool | None, str]:
    """(code, engine_id, admitted, detail) of an answer."""
    try:
        body = r.json()
    except ValueError:
        return "NOT_JSON", None, None, r.text[:200]
    if not isinstance(body, dict):
        return "NOT_AN_OBJECT", None, None, r.text[:200]
    if r.status_code >= 300:
        err = body.get("error")
        code = str(err.get("code")) if isinstance(err, dict) else "NO_ENVELOPE"
        return code, None, None, r.text[:200]
    if op.startswith("admit"):
        engine = body.get("engine")
        engine_id = engine.get("engine_id") if isinstance(engine, dict) else None
        admitted = body.get("admitted") is True
        return ("" if admitted else str(body.get("reason"))), engine_id, admitted, ""
    engine_id = body.get("engine_id")
    return "", str(engine_id) if engine_id is not None else None, None, ""


@dataclass
class Churn:
    replicas: list[Replica]
    products: list[Product]
    seed: int
    answers: list[Answer] = field(default_factory=list)
    _weights: dict[str, list[float]] = field(default_factory=dict)

    def _pick_user(self, product: Product, rng: random.Random) -> str:
        weights = self._weights.setdefault(product.slug, [1 / (i + 1) for i in range(len(product.users))])
        return rng.choices(product.users, weights)[0]

    async def one(self, c: httpx.AsyncClient, rng: random.Random) -> Answer:
        op = rng.choices(list(OPS), list(OPS.values()))[0]
        product = rng.choice(self.products)
        user = self._pick_user(product, rng)
        replica = rng.choice(self.replicas)
        method, path, body = _request(op, user, rng)
        t0 = time.time()
        try:
            r = await c.request(method, replica.url + path, json=body, headers={"X-Platform-Key": product.key},
                                timeout=_TIMEOUT_S)
        except httpx.HTTPError as err:
            answer = Answer(op, product.slug, user, replica.name, t0, time.time(), 0, type(err).__name__,
                            detail=str(err)[:200])
        else:
            code, engine_id, admitted, detail = _parse(op, r)
            answer = Answer(op, product.slug, user, replica.name, t0, time.time(), r.status_code, code, engine_id,
                            admitted, detail)
        self.answers.append(answer)
        return answer

    async def client(self, index: int, until: float) -> None:
        """One client: ops back to back with a short random pause, until the monotonic `until`."""
        rng = random.Random(self.seed * 1000 + index)
        limits = httpx.Limits(max_connections=4, max_keepalive_connections=4)
        async with httpx.AsyncClient(limits=limits) as c:
            while time.monotonic() < until:
                await self.one(c, rng)
                await asyncio.sleep(rng.uniform(0.02, 0.25))

    async def run(self, clients: int, seconds: float) -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(*(self.client(i, until) for i in range(clients)))
