"""Policy: the product policy document, the engine quota, and the shared rate limit.

The rate limit is kept in Postgres (`bap_rate_lease`) so every replica shares one
rolling-minute budget. A replica leases tokens in batches and spends them from memory,
so the admit hot path does no database write in the common case. Unused tokens are
handed back with the next lease.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bap_engine.errors import RateLimited, ValidationFailed

__all__ = ["Policy", "parse_policy", "RateLimiter"]

LEASE_S = 2.0  # a lease's tokens are spent within this many seconds or handed back
_INT4_MAX = 2**31 - 1


class Policy(BaseModel):
    """`products.policy`; `{}` means no limits."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    # bounded by the database's integer columns and parameters (bap_rate_lease takes an int4)
    max_engines: int | None = Field(default=None, ge=0, le=_INT4_MAX)
    rate_limit_rpm: int | None = Field(default=None, ge=1, le=_INT4_MAX)
    engine_version: str | None = Field(default=None, min_length=1, max_length=200,
                                       pattern=r"^[^\x00-\x1f\x7f]+$")  # NUL cannot be stored
    warm_pool: int | None = Field(default=None, ge=0, le=100)  # booted, unassigned engines kept ready


def parse_policy(raw: object) -> Policy:
    """Validate a policy document. Raises ValidationFailed."""
    if not isinstance(raw, dict):
        raise ValidationFailed("policy must be a JSON object")
    try:
        return Policy.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValidationFailed(f"policy.{where}: {first['msg']}") from None


@dataclass(slots=True)
class _Bucket:
    lease_id: int | None = None
    tokens: int = 0
    expires: float = 0.0
    lock: asyncio.Lock | None = None


class RateLimiter:
    """Per-product rolling-minute admit budget, exact across replicas."""

    def __init__(self, pool: asyncpg.Pool, clock: Callable[[], float] = time.monotonic) -> None:
        self._pool = pool
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._retry_after = 1

    def _take_local(self, b: _Bucket) -> bool:
        if b.tokens > 0 and self._clock() < b.expires:
            b.tokens -= 1
            return True
        return False

    async def acquire(self, product_id: str, rpm: int) -> None:
        """Spend one admit token. Raises RateLimited with a Retry-After in seconds."""
        b = self._buckets.get(product_id)
        if b is None:
            b = self._buckets[product_id] = _Bucket(lock=asyncio.Lock())
        if self._take_local(b):
            return
        assert b.lock is not None
        async with b.lock:  # one lease request at a time per product in this process
            if self._take_local(b):
                return
            await self._lease(product_id, b, rpm)
            if not self._take_local(b):
                raise RateLimited(self._retry_after)

    async def _lease(self, product_id: str, b: _Bucket, rpm: int) -> None:
        want = max(1, rpm // 20)
        unused = b.tokens if b.lease_id is not None else 0
        r = await self._pool.fetchrow(
            "SELECT lease_id, granted, retry_after_s FROM bap_rate_lease($1, $2, $3, $4, $5, $6)",
            product_id, want, rpm, LEASE_S, b.lease_id, unused,
        )
        b.lease_id, b.tokens = r["lease_id"], int(r["granted"])
        b.expires = self._clock() + LEASE_S
        self._retry_after = max(1, math.ceil(float(r["retry_after_s"])))

    async def release_all(self) -> None:
        """Hand unused tokens back (at shutdown) so other replicas may use them."""
        for product_id, b in self._buckets.items():
            if b.lease_id is not None and b.tokens > 0 and self._clock() < b.expires:
                await self._pool.execute(
                    "UPDATE rate_leases SET tokens = GREATEST(tokens - $2, 0) WHERE id = $1 AND product_id = $3",
                    b.lease_id, b.tokens, product_id,
                )
                b.tokens = 0
