"""The supervisor: failures are logged with their traceback, counted and restarted with backoff;
repeated failures are named by failing(); progress forgives them; stop and close are prompt."""

from __future__ import annotations

import asyncio
import time

import pytest

from bap_engine.supervisor import Supervisor
from bap_engine.workers.base import run_loop
from tests.conftest import wait_until


class Flaky:
    """Fails its first `failures` passes, then succeeds."""

    name = "flaky"
    interval_s = 0.0

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.runs = 0

    async def run_once(self) -> int:
        self.runs += 1
        if self.runs <= self.failures:
            raise RuntimeError(f"pass {self.runs} failed")
        await asyncio.sleep(0.001)
        return 0


async def test_failure_is_logged_with_traceback_counted_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    sup = Supervisor(backoff_base_s=0.001, backoff_max_s=0.01, unhealthy_after=3)
    worker, stop = Flaky(failures=4), asyncio.Event()
    sup.start("worker-flaky", lambda: run_loop(worker, stop, on_pass=lambda: sup.ok("worker-flaky")))
    await wait_until(lambda: worker.runs > 6, timeout=5)
    status = sup.status()["worker-flaky"]
    assert status.restarts == 4 and status.consecutive == 0 and "pass 4 failed" in status.last_error
    assert sup.failing() == []
    failed = [r for r in caplog.records if r.getMessage() == "task failed; restarting"]
    assert len(failed) == 4 and all(r.exc_info for r in failed)
    stop.set()
    await sup.aclose()


async def test_repeated_failures_are_named_until_progress() -> None:
    sup = Supervisor(backoff_base_s=0.001, backoff_max_s=0.005, unhealthy_after=3)
    gate = asyncio.Event()

    async def broken() -> None:
        if not gate.is_set():
            raise ValueError("still broken")
        sup.ok("broken")
        await asyncio.Event().wait()

    sup.start("broken", broken)
    await wait_until(lambda: sup.failing() == ["broken"], timeout=5)
    gate.set()
    await wait_until(lambda: sup.failing() == [], timeout=5)
    await sup.aclose()


async def test_unexpected_return_is_restarted(caplog: pytest.LogCaptureFixture) -> None:
    sup = Supervisor(backoff_base_s=0.001, backoff_max_s=0.001)
    calls: list[int] = []

    async def returns() -> None:
        calls.append(1)

    sup.start("returns", returns)
    await wait_until(lambda: len(calls) >= 3, timeout=5)
    await sup.aclose()
    assert any(r.getMessage() == "task finished unexpectedly; restarting" for r in caplog.records)


async def test_oneshot_failure_is_counted_under_its_family(caplog: pytest.LogCaptureFixture) -> None:
    sup = Supervisor()

    async def boom() -> None:
        raise KeyError("lost")

    await sup.spawn("restart-e1", boom(), family="restart")
    assert sup.status()["restart"].restarts == 1
    assert any(r.exc_info and getattr(r, "task", "") == "restart-e1" for r in caplog.records)


async def test_stop_and_close_are_prompt() -> None:
    sup = Supervisor()
    stop = asyncio.Event()

    async def forever() -> None:
        await stop.wait()

    sup.start("a", forever)
    sup.start("b", lambda: asyncio.sleep(3600))
    started = time.monotonic()
    stop.set()
    await sup.stop("a")
    await sup.aclose()
    assert time.monotonic() - started < 0.5
    assert sup.status()["a"].restarts == 0


