"""Booting an engine for lifecycle: create it on a free port, run it again, wait for health.

Backend errors become domain errors here, once: `BackendFailed(transient=...)` keeps the
backend's verdict, so a permanent error (a missing image, a bad command) fails at once and is
not retried; an engine that exits while booting fails the attempt at once instead of waiting
out the boot timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, TypeVar

from bap_engine import registry
from bap_engine.backends.base import (
    LABEL_DEPLOYMENT,
    LABEL_ENGINE_ID,
    LABEL_PRODUCT_ID,
    BackendError,
    EngineAbsent,
    EngineSpec,
    ImageNotFound,
    ObservedState,
    PortInUse,
)
from bap_engine.errors import BackendFailed, BootTimeout, PortExhaustion
from bap_engine.lifecycle.clock import now
from bap_engine.lifecycle.probe import probe_health
from bap_engine.lifecycle.transition import Audit, Change, Claim
from bap_engine.registry import EngineRow
from bap_engine.states import AuditAction, EngineState

if TYPE_CHECKING:
    from bap_engine.lifecycle.lifecycle import Lifecycle

__all__ = ["create", "await_healthy", "bring_up", "halt", "backend_call", "spec_for", "Failure", "BootError"]

S = EngineState
T = TypeVar("T")
_INSPECT_EVERY_S = 0.5  # while booting, how often to ask the backend whether the engine still runs
BootError = BackendFailed | BootTimeout
Failure = Callable[[BootError], tuple[Change, list[Audit]]]  # how a failed bring-up is recorded


def spec_for(lc: Lifecycle, row: EngineRow) -> EngineSpec:
    env = {**lc.engine_env, "ENGINE_KEY_HASH": row.api_key_hash, "ENGINE_VERSION": row.engine_version}
    labels = {LABEL_ENGINE_ID: row.id, LABEL_PRODUCT_ID: row.product_id, LABEL_DEPLOYMENT: lc.settings.deployment}
    assert row.port is not None
    return EngineSpec(engine_id=row.id, product_id=row.product_id, port=row.port, image=row.engine_version,
                      env=env, labels=labels, cpus=lc.settings.engine_cpus, memory=lc.settings.engine_memory)


async def backend_call(call: Awaitable[T], what: str) -> T:
    """Await a backend call; its BackendError becomes BackendFailed (keeping `transient`)."""
    try:
        return await call
    except BackendError as err:
        raise BackendFailed(f"backend failed to {what} the engine: {err.message}", transient=err.transient) from None


async def create(lc: Lifecycle, claim: Claim) -> None:
    """Create the claimed engine, moving to another port when something outside the registry holds
    its port; the runtime handle is recorded (an intent) as soon as it exists."""
    avoid: list[int] = []
    for _ in range(5):
        try:
            placement = await lc.backend.create(spec_for(lc, claim.row))
        except PortInUse as err:
            avoid.append(err.port)
            await _move_port(lc, claim, avoid)
            continue
        except ImageNotFound as err:
            raise BackendFailed(err.message, transient=False) from None
        except BackendError as err:
            message = f"backend failed to create the engine: {err.message}"
            raise BackendFailed(message, transient=err.transient) from None
        await claim.note(Change(ref=placement.ref, url=placement.url))
        return
    raise PortExhaustion("no usable engine port found")


async def _move_port(lc: Lifecycle, claim: Claim, avoid: list[int]) -> None:
    s = lc.settings
    async with lc.pool.acquire() as conn:
        port = await registry.allocate_port(conn, s.port_min, s.port_max, avoid)
    if port is None:
        raise PortExhaustion(f"all ports {s.port_min}-{s.port_max} are in use")
    await claim.note(Change(port=port, url=lc.backend.url_for(claim.row.id, port)))


async def await_healthy(lc: Lifecycle, row: EngineRow, timeout: float) -> None:
    """Poll /health (fast at first, then every 100 ms) until ok. Raises BootTimeout, or
    BackendFailed when the engine exits (or vanishes) before it is healthy."""
    assert row.url is not None
    deadline = time.monotonic() + timeout
    next_inspect = time.monotonic() + _INSPECT_EVERY_S
    delay = 0.005
    while (left := deadline - time.monotonic()) > 0:
        if await probe_health(row.url, min(left, lc.settings.health_check_timeout_s)):
            return
        if time.monotonic() >= next_inspect:
            next_inspect = time.monotonic() + _INSPECT_EVERY_S
            seen = await backend_call(lc.backend.inspect(row.id), "inspect")
            if seen.state in (ObservedState.EXITED, ObservedState.ABSENT):
                raise BackendFailed(f"engine {seen.state} before it became healthy")
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, 0.1)
    raise BootTimeout(f"engine did not become healthy within {lc.settings.boot_timeout_s:g}s")


async def halt(lc: Lifecycle, engine_id: str, *, destroy: bool = False) -> None:
    """Never leave a half-alive engine behind a failed row; what is left, the reconciler sees."""
    try:
        if destroy:
            await lc.backend.destroy(engine_id)
        else:
            await lc.backend.stop(engine_id, min(2.0, lc.settings.stop_grace_s))
    except BackendError:
        pass


def _failed(action: AuditAction, actor: str, status: EngineState) -> Failure:
    def failure(err: BootError) -> tuple[Change, list[Audit]]:
        meta = {"from": str(status), "outcome": "failed", "error": err.code, "message": err.message}
        return Change(status=S.FAILED, sleep_kind=None, next_restart_at=None), [Audit(action, meta, actor)]

    return failure


async def bring_up(lc: Lifecycle, claim: Claim, action: AuditAction, actor: str,
                   metadata: Mapping[str, object] | None = None,
                   failure: Failure | None = None) -> EngineRow:
    """Run a claimed engine and wait for health. On failure the engine is halted and the failure
    recorded (by default: `failed`, with `action`'s audit row saying so), then the error raised."""
    row, started = claim.row, time.monotonic()
    try:
        ref = await _run(lc, row)
        await await_healthy(lc, row, lc.settings.boot_timeout_s)
    except (BootTimeout, BackendFailed) as err:
        await halt(lc, row.id)
        change, audits = (failure or _failed(action, actor, row.status))(err)
        await claim.commit(change, *audits)
        raise err from None
    ms = int((time.monotonic() - started) * 1000)
    t = now()
    return await claim.commit(
        Change(status=S.RUNNING, sleep_kind=None, health_failures=0, restart_attempts=0, next_restart_at=None,
               last_health_at=t, last_active_at=t, ref=ref),
        Audit(action, {"from": str(row.status), **(metadata or {})}, actor, ms))


async def _run(lc: Lifecycle, row: EngineRow) -> str:
    """Run the engine again; returns its (possibly new) runtime handle."""
    if row.status == S.FAILED:
        await halt(lc, row.id)  # a failed engine may still hold its port half-alive
    if row.status == S.SLEEPING and row.sleep_kind == "label":
        return row.ref or ""
    if row.status == S.SLEEPING and row.sleep_kind == "paused":
        try:
            await backend_call(lc.backend.resume(row.id), "resume")
            return row.ref or ""
        except BackendFailed:
            pass  # vanished or stopped behind our back: start it below
    try:
        await lc.backend.start(row.id)
    except EngineAbsent:  # vanished behind our back: re-create with its data
        return (await backend_call(lc.backend.create(spec_for(lc, row)), "create")).ref
    except BackendError as err:
        raise BackendFailed(f"backend failed to start the engine: {err.message}", transient=err.transient) from None
    return (await backend_call(lc.backend.inspect(row.id), "inspect")).ref or row.ref or ""
