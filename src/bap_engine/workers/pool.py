"""Warm-pool worker (leader only): keep each product's `policy.warm_pool` engines booted.

Each pass reads the products that ask for a pool and this deployment's pool engines (two
queries), then per product: destroys pool engines that are no use (failed, stopped, asleep),
destroys the surplus when the size was lowered (newest first; `warm_pool: 0` empties it), and
boots the missing ones, a few at a time. A product whose fills fail backs off (doubling, at
most a minute) so a bad image does not write a failed provision every second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict

from bap_engine import registry
from bap_engine.config import Settings
from bap_engine.errors import BapError
from bap_engine.lifecycle import Lifecycle
from bap_engine.lifecycle.pool import fill
from bap_engine.policy import parse_policy
from bap_engine.registry import EngineRow, ProductRow
from bap_engine.states import EngineState

__all__ = ["PoolWorker"]

log = logging.getLogger("bap_engine.workers.pool")
S = EngineState
_USEFUL = (S.RUNNING, S.PROVISIONING)
_BACKOFF_MAX_S = 60.0


class PoolWorker:
    name = "pool"

    def __init__(self, lifecycle: Lifecycle, settings: Settings, *, interval_s: float = 1.0,
                 concurrency: int = 4) -> None:
        self.lc = lifecycle
        self.s = settings
        self.interval_s = interval_s
        self._gate = asyncio.Semaphore(concurrency)
        self._failures: dict[str, int] = defaultdict(int)
        self._next_try: dict[str, float] = {}

    async def run_once(self) -> int:
        async with self.lc.pool.acquire() as conn:
            products = {p.id: p for p in await registry.products_with_pool(conn)}
            engines = await registry.pool_engines(conn, self.s.deployment)
        by_product: dict[str, list[EngineRow]] = defaultdict(list)
        for row in engines:
            by_product[row.product_id].append(row)
        acted = 0
        fills: list[tuple[ProductRow, int]] = []
        for product_id in set(by_product) | set(products):
            rows = by_product.get(product_id, [])
            product = products.get(product_id)
            want = (parse_policy(product.policy).warm_pool or 0) if product else 0
            useless = [r for r in rows if r.status not in _USEFUL and r.op is None]
            useful = [r for r in rows if r.status in _USEFUL]
            surplus = [r for r in reversed(useful) if r.op is None][:max(0, len(useful) - want)]
            for row in useless + surplus:
                acted += await self._destroy(row)
            if product is not None and len(useful) < want:
                fills.append((product, want - len(useful)))
        results = await asyncio.gather(*(self._fill(p) for p, n in fills for _ in range(n)))
        return acted + sum(results)

    async def _destroy(self, row: EngineRow) -> int:
        claim = await self.lc.tx.claim(row.id, "destroy")
        if claim is None:
            return 0
        async with claim:
            if not claim.row.pool:  # claimed by a user meanwhile
                return 0
            await self.lc.destroy_claimed(claim, actor="system")
        return 1

    async def _fill(self, product: ProductRow) -> int:
        if time.monotonic() < self._next_try.get(product.id, 0.0):
            return 0
        policy = parse_policy(product.policy)
        async with self._gate:
            try:
                row = await fill(self.lc, product, policy.engine_version or self.s.engine_image, policy.max_engines)
            except BapError as err:
                n = self._failures[product.id] = self._failures[product.id] + 1
                delay = min(2.0 ** n, _BACKOFF_MAX_S)
                self._next_try[product.id] = time.monotonic() + delay
                log.warning("warm pool fill failed", extra={"product_id": product.id, "error": err.code,
                                                            "reason": err.message, "retry_in_s": delay})
                return 0
        self._failures.pop(product.id, None)
        self._next_try.pop(product.id, None)
        return 0 if row is None else 1
