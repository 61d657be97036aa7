"""The worker loop: N runs at interval 0, errors go to the supervisor, stop is immediate."""

from __future__ import annotations

import asyncio
import time

from bap_engine.workers.base import run_loop


class Counter:
    name = "counter"

    def __init__(self, interval_s: float, fail_every: int = 0) -> None:
        self.interval_s = interval_s
        self.runs = 0
        self.fail_every = fail_every

    async def run_once(self) -> int:
        self.runs += 1
        if self.fail_every and self.runs % self.fail_every == 0:
            raise RuntimeError("boom")
        return 1


async def test_runs_n_times_and_reports_each_good_pass() -> None:
    worker = Counter(0)
    passes: list[int] = []
    await run_loop(worker, asyncio.Event(), loops=5, on_pass=lambda: passes.append(worker.runs))
    assert worker.runs == 5 and passes == [1, 2, 3, 4, 5]


async def test_a_failing_pass_escapes_to_the_supervisor() -> None:
    worker = Counter(0, fail_every=2)
    try:
        await run_loop(worker, asyncio.Event(), loops=5)
    except RuntimeError:
        pass
    assert worker.runs == 2


async def test_stop_is_immediate() -> None:
    worker = Counter(3600)
    stop = asyncio.Event()
    task = asyncio.create_task(run_loop(worker, stop))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    stop.set()
    await task
    assert time.monotonic() - started < 0.1
    assert worker.runs == 1


async def test_cancel_propagates() -> None:
    worker = Counter(3600)
    task = asyncio.create_task(run_loop(worker, asyncio.Event()))
    await asyncio.sleep(0.01)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    assert task.cancelled()
