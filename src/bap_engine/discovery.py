"""Discovery: `admit`, the call a product makes before every user request.

Hot path. In the common case (engine running) it costs one database round trip: the
product's key and the user's engine are read together; the rate limit is spent from
leased tokens in memory; activity and denials are buffered and flushed in batches.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import orjson

from bap_engine import audit, registry
from bap_engine.audit import Denial
from bap_engine.errors import BapError, InvalidPlatformKey, RateLimited
from bap_engine.keys import hash_key
from bap_engine.lifecycle import EngineView, Lifecycle, view
from bap_engine.policy import Policy, RateLimiter, parse_policy
from bap_engine.registry import AdmitLookup, EngineRow, ProductRow
from bap_engine.states import EngineState

__all__ = ["Discovery", "Admission"]

S = EngineState
_REASONS = {
    S.SLEEPING: "engine_sleeping",
    S.FAILED: "engine_unhealthy",
    S.STOPPED: "engine_stopped",
    S.DESTROYING: "engine_destroying",
}


@dataclass(frozen=True, slots=True)
class Admission:
    admitted: bool
    engine: EngineView | None = None
    reason: str | None = None


class Discovery:
    def __init__(self, pool: asyncpg.Pool, lifecycle: Lifecycle, limiter: RateLimiter) -> None:
        self._pool = pool
        self._lifecycle = lifecycle
        self._limiter = limiter
        self._activity: dict[str, datetime] = {}
        self._denials: dict[tuple[str, str, datetime, str], int] = defaultdict(int)
        self._policies: dict[str, Policy] = {}

    async def admit(self, platform_key: str, user_id: str, *, auto_provision: bool, auto_wake: bool) -> Admission:
        """Admit a user's request. Raises InvalidPlatformKey, RateLimited, QuotaExceeded,
        PortExhaustion, BootTimeout, BackendFailed."""
        async with self._pool.acquire() as conn:
            found = await registry.admit_lookup(conn, hash_key(platform_key), user_id)
        if found is None:
            raise InvalidPlatformKey()
        policy = self._policy(found.policy_text)
        if policy.rate_limit_rpm is not None:
            try:
                await self._limiter.acquire(found.product_id, policy.rate_limit_rpm)
            except RateLimited:
                self._deny(found.product_id, found.slug, "rate_limited")
                raise
        brief = found.engine
        if brief is not None and brief.status == S.RUNNING:  # the common case: answer from the lookup
            engine = EngineView(brief.id, found.product_id, user_id, str(brief.status), brief.url,
                                self._lifecycle.open_key(brief.engine_key_enc), brief.engine_version,
                                brief.created_at, brief.last_health_at, brief.idle_sleep)
            self._activity[brief.id] = datetime.now(UTC)
            return Admission(True, engine)
        try:
            result = await self._slow_path(found, policy, user_id, auto_provision, auto_wake)
        except BapError as err:
            self._deny(found.product_id, found.slug, err.code.lower())
            raise
        if result.admitted and result.engine is not None:
            self._activity[result.engine.engine_id] = datetime.now(UTC)
        elif result.reason:
            self._deny(found.product_id, found.slug, result.reason)
        return result

    def _policy(self, text: str) -> Policy:
        policy = self._policies.get(text)
        if policy is None:
            if len(self._policies) > 10_000:
                self._policies.clear()
            policy = self._policies[text] = parse_policy(orjson.loads(text))
        return policy

    async def _slow_path(
        self, found: AdmitLookup, policy: Policy, user_id: str, auto_provision: bool, auto_wake: bool
    ) -> Admission:
        """Anything but a running engine: read the full rows, then decide."""
        async with self._pool.acquire() as conn:
            product = await registry.get_product(conn, found.product_id)
            row = await registry.get_engine(conn, found.product_id, user_id)
        if product is None:
            raise InvalidPlatformKey()
        return await self._decide(product, policy, user_id, row, auto_provision, auto_wake)

    async def _decide(
        self, product: ProductRow, policy: Policy, user_id: str, row: EngineRow | None, auto_provision: bool,
        auto_wake: bool,
    ) -> Admission:
        deadline = time.monotonic() + self._lifecycle.settings.boot_timeout_s + 5
        while True:
            if row is None:
                if not auto_provision:
                    return Admission(False, reason="engine_not_found")
                row, key = await self._lifecycle.provision(
                    product, user_id, policy.engine_version, actor=product.slug, max_engines=policy.max_engines,
                    reuse_existing=True)
                if key is not None:
                    return Admission(True, view(row, key))
            if row.status == S.RUNNING:
                return Admission(True, view(row, self._lifecycle.key_of(row)))
            if row.status == S.SLEEPING and auto_wake:
                row = await self._lifecycle.wake(row, actor=product.slug)
                if row.status == S.RUNNING:
                    return Admission(True, view(row, self._lifecycle.key_of(row)))
            if row.status != S.PROVISIONING:
                return Admission(False, reason=_REASONS[row.status])
            if time.monotonic() > deadline:
                return Admission(False, reason="engine_unhealthy")
            await asyncio.sleep(0.02)  # another request is provisioning it: wait, then re-read
            async with self._pool.acquire() as conn:
                row = await registry.get_engine(conn, product.id, user_id)

    def _deny(self, product_id: str, slug: str, reason: str) -> None:
        minute = datetime.now(UTC).replace(second=0, microsecond=0)
        self._denials[(product_id, reason, minute, slug)] += 1

    async def flush(self) -> None:
        """Write buffered activity and coalesced denials (a few round trips per period)."""
        activity, self._activity = self._activity, {}
        denials, self._denials = self._denials, defaultdict(int)
        if not activity and not denials:
            return
        async with self._pool.acquire() as conn:
            if activity:
                await registry.touch_activity(conn, list(activity), list(activity.values()))
            if denials:
                await audit.add_denials(conn, [Denial(p, r, m, n, a) for (p, r, m, a), n in denials.items()])

    async def run_flusher(self, period_s: float, stop: asyncio.Event) -> None:
        """Flush every period until stop is set, then a last time."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), period_s)
            except TimeoutError:
                pass
            try:
                await self.flush()
            except (OSError, asyncpg.PostgresError):
                pass  # the next period retries with whatever accumulates
