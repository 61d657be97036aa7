"""The one supervisor of every long-lived task: leader election, worker loops, the activity
flusher, the owner lock, restart attempts, and whatever later workers add.

    supervisor.start(name, factory)   an eternal task: `factory()` is awaited again after it fails
                                      (or returns while not stopping), with exponential backoff
    supervisor.spawn(name, coro)      a one-shot task (a restart attempt): a failure is logged and
                                      counted, never retried here (its owner reschedules)
    supervisor.ok(name)               the task made progress: its consecutive-failure count is reset

A failure is always logged with its traceback (kopf's `guard()` idea). `restarts` feeds
`bap_task_restarts_total{task}`; a task failing `unhealthy_after` times in a row is named by
`failing()`, and /health answers 503 with it, so a replica that cannot heal leaves rotation.
It must never swallow CancelledError, and it never reads settings (its numbers are arguments).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass

__all__ = ["Supervisor", "TaskStatus"]

log = logging.getLogger("bap_engine.supervisor")


@dataclass(slots=True)
class TaskStatus:
    """What the supervisor knows of one named task (or family of one-shot tasks)."""

    restarts: int = 0  # failures (and unexpected returns) since start
    consecutive: int = 0  # failures since the last success
    last_error: str = ""


class Supervisor:
    def __init__(self, *, backoff_base_s: float = 0.5, backoff_max_s: float = 30.0, unhealthy_after: int = 3) -> None:
        self._base = backoff_base_s
        self._max = backoff_max_s
        self._unhealthy_after = unhealthy_after
        self._status: dict[str, TaskStatus] = {}
        self._eternal: dict[str, asyncio.Task[None]] = {}
        self._oneshot: set[asyncio.Task[None]] = set()
        self._stopping: set[str] = set()
        self._closing = False

    # ---- eternal tasks -----------------------------------------------------------------
    def start(self, name: str, factory: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Run `factory()` until stopped, restarting it with backoff after each failure."""
        if name in self._eternal and not self._eternal[name].done():
            raise RuntimeError(f"task {name} is already supervised")
        self._status.setdefault(name, TaskStatus())
        self._stopping.discard(name)
        task = asyncio.get_running_loop().create_task(self._guard(name, factory), name=name)
        self._eternal[name] = task
        return task

    async def _guard(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        status = self._status[name]
        while not self._closing:
            try:
                await factory()
                if self._closing or name in self._stopping:
                    return
                log.warning("task finished unexpectedly; restarting", extra={"task": name})
                self._count(name, "finished unexpectedly")
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the point of a supervisor
                log.error("task failed; restarting", exc_info=True, extra={"task": name})
                self._count(name, f"{type(err).__name__}: {err}"[:300])
            delay = min(self._base * 2 ** max(0, status.consecutive - 1), self._max)
            await asyncio.sleep(delay)

    def expect_stop(self, *names: str) -> None:
        """These tasks are about to be told to return (their stop event set next): a return is no failure."""
        self._stopping.update(names)

    async def stop(self, name: str, grace_s: float = 5.0) -> None:
        """End one eternal task (a worker loop when leadership ends): give it `grace_s` to return
        by itself (its stop event is set by the caller), then cancel it."""
        task = self._eternal.pop(name, None)
        if task is None:
            return
        self._stopping.add(name)
        try:
            await asyncio.wait_for(asyncio.shield(task), grace_s)
        except TimeoutError:
            await _cancel(task, 15.0)
        except Exception:  # already logged by the guard
            pass

    # ---- one-shot tasks ----------------------------------------------------------------
    def spawn(self, name: str, coro: Coroutine[object, object, None], *,
              family: str | None = None) -> asyncio.Task[None]:
        """Run `coro` once; a failure is logged with its traceback and counted under `family`."""
        key = family or name
        self._status.setdefault(key, TaskStatus())

        async def once() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.error("task failed", exc_info=True, extra={"task": name})
                self._count(key, f"{type(err).__name__}: {err}"[:300])
            else:
                self.ok(key)

        task = asyncio.get_running_loop().create_task(once(), name=name)
        self._oneshot.add(task)
        task.add_done_callback(self._oneshot.discard)
        return task

    # ---- visibility ----------------------------------------------------------------------
    def ok(self, name: str) -> None:
        """A supervised task reports progress: its consecutive failures are forgiven."""
        status = self._status.get(name)
        if status is not None:
            status.consecutive = 0

    def _count(self, name: str, error: str) -> None:
        status = self._status.setdefault(name, TaskStatus())
        status.restarts += 1
        status.consecutive += 1
        status.last_error = error

    def status(self) -> dict[str, TaskStatus]:
        return dict(self._status)

    def failing(self) -> list[str]:
        """Tasks that failed `unhealthy_after` times in a row (the replica cannot heal)."""
        return sorted(n for n, s in self._status.items() if s.consecutive >= self._unhealthy_after)

    # ---- shutdown ------------------------------------------------------------------------
    async def aclose(self, timeout: float = 15.0) -> None:
        """Cancel everything (eternal tasks first), waiting at most `timeout` for each group."""
        self._closing = True
        for task in list(self._eternal.values()):
            await _cancel(task, timeout)
        self._eternal.clear()
        for task in list(self._oneshot):
            await _cancel(task, timeout)


async def _cancel(task: asyncio.Task[None], timeout: float) -> None:
    task.cancel()
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout)
    except (asyncio.CancelledError, TimeoutError):
        pass
    except Exception:  # already logged by the guard
        pass
