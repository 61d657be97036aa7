"""The worker loop, written once: run `run_once()` every interval until stopped.

Each run is scheduled from the previous start; an overrun is logged; stop is immediate.
A failing pass is not caught here: it propagates to the supervisor, which logs it with its
traceback, counts it and runs the loop again after a backoff (see bap_engine.supervisor).
`on_pass` is called after every good pass, so the supervisor forgives earlier failures.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["Worker", "run_loop"]

log = logging.getLogger("bap_engine.workers")


class Worker(Protocol):
    name: str
    interval_s: float

    async def run_once(self) -> int:
        """One level-triggered pass; returns the number of engines acted on."""
        ...


async def run_loop(worker: Worker, stop: asyncio.Event, *, loops: int | None = None,
                   on_pass: Callable[[], None] | None = None) -> None:
    runs = 0
    while not stop.is_set():
        started = time.monotonic()
        acted = await worker.run_once()
        if acted:
            log.info("worker pass", extra={"worker": worker.name, "acted": acted})
        if on_pass is not None:
            on_pass()
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
