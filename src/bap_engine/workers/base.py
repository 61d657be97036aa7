"""The worker loop, written once: run `run_once()` every interval until stopped.

Each run is scheduled from the previous start; an overrun is logged; an Exception is
logged and the loop goes on; CancelledError propagates; stop is immediate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

__all__ = ["Worker", "run_loop"]

log = logging.getLogger("bap_engine.workers")


class Worker(Protocol):
    name: str
    interval_s: float

    async def run_once(self) -> int:
        """One level-triggered pass; returns the number of engines acted on."""
        ...


async def run_loop(worker: Worker, stop: asyncio.Event, *, loops: int | None = None) -> None:
    runs = 0
    while not stop.is_set():
        started = time.monotonic()
        try:
            acted = await worker.run_once()
            if acted:
                log.info("worker pass", extra={"worker": worker.name, "acted": acted})
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a worker never dies of one bad pass
            log.error("worker pass failed", extra={"worker": worker.name, "error": type(err).__name__,
                                                    "detail": str(err)[:200]})
        runs += 1
        if loops is not None and runs >= loops:
            return
        elapsed = time.monotonic() - started
        if elapsed > worker.interval_s:
            log.warning("worker overran its interval", extra={"worker": worker.name, "elapsed_s": round(elapsed, 3)})
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, worker.interval_s - elapsed))
        except TimeoutError:
            pass
