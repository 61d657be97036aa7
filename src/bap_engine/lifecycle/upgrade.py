"""Upgrading an engine: its runtime replaced by another version, its data, key, URL and id kept.

The target is recorded first (`upgrade_to`, the intent) while `engine_version` still names the
version the engine ran; only the commit moves `engine_version`. Running the new version: stop the
engine (grace), create it again with the new image (the backend keeps its data: the subprocess data
directory, the docker volume), wait for health. When it is not healthy within ORCH_BOOT_TIMEOUT_S, or
exits at once, it is put back on the previous version the same way (audited `rolled_back`); when even
that fails, the engine is marked `failed` on its previous version. An engine that is not running
(stopped, or asleep stopped or paused) is booted on the new version to prove it is healthy, then
stopped again, so its next start or wake runs the new version; a paused sleeper ends up asleep
stopped. A crash mid-upgrade leaves `upgrade_to` set: the reconciler (`finish`) keeps the new version
when the engine answers /health reporting it, and otherwise rolls back.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import httpx

from bap_engine.backends.base import Placement
from bap_engine.errors import BackendFailed, BootTimeout, EngineBusy, EngineNotRunning
from bap_engine.lifecycle import boot
from bap_engine.lifecycle.clock import now
from bap_engine.lifecycle.transition import Audit, Change, Claim
from bap_engine.registry import EngineRow, ProductRow
from bap_engine.states import AuditAction, EngineState

if TYPE_CHECKING:
    from bap_engine.lifecycle.lifecycle import Lifecycle

__all__ = ["upgrade", "finish", "UPGRADED", "ROLLED_BACK"]

S = EngineState
A = AuditAction
OP = "upgrade"
UPGRADED, ROLLED_BACK = "upgraded", "rolled_back"
_SLACK_S = 30.0


def _runs(row: EngineRow) -> bool:
    """Whether the engine's process is meant to be up (a `label` sleeper keeps running)."""
    return row.status == S.RUNNING or (row.status == S.SLEEPING and row.sleep_kind == "label")


def _sleep_kind(row: EngineRow) -> str | None:
    """A paused sleeper is stopped by the upgrade: it stays asleep, stopped."""
    return "stopped" if row.status == S.SLEEPING and row.sleep_kind == "paused" else row.sleep_kind


async def upgrade(lc: Lifecycle, product: ProductRow, user_id: str, version: str, *,
                  actor: str) -> tuple[EngineRow, str]:
    """Move the user's engine to `version`. Returns (row, "upgraded" | "rolled_back"). The same version
    as now answers "upgraded" without touching the runtime. Raises ValidationFailed (unknown version,
    before anything changes), EngineNotFound, EngineBusy, EngineNotRunning (a failed engine), and
    BootTimeout/BackendFailed when even the rollback failed (the engine is then `failed`)."""
    await lc.check_version(version)
    s = lc.settings
    ttl = 2 * s.boot_timeout_s + 3 * s.stop_grace_s + _SLACK_S  # two boots, each after a stop
    async with await lc.tx.claim_user(product.id, user_id, OP, ttl_s=ttl) as claim:
        row = claim.row
        if row.status == S.FAILED:
            raise EngineNotRunning("a failed engine is not upgraded: start or destroy it first")
        if row.status not in (S.RUNNING, S.SLEEPING, S.STOPPED):
            raise EngineBusy()
        if row.engine_version == version:
            return row, UPGRADED  # nothing to do: the claim is released
        return await _replace(lc, claim, version, actor)


async def _replace(lc: Lifecycle, claim: Claim, version: str, actor: str) -> tuple[EngineRow, str]:
    old, started = claim.row, time.monotonic()
    meta: dict[str, object] = {"from": old.engine_version, "to": version}
    row = await claim.note(Change(upgrade_to=version))
    try:
        placement = await _boot(lc, row, version, _runs(old))
    except (BackendFailed, BootTimeout) as err:
        await boot.halt(lc, row.id)
        meta.update(error=err.code, message=err.message)
        return await _roll_back(lc, claim, old, meta, actor, started), ROLLED_BACK
    ms = int((time.monotonic() - started) * 1000)
    done = await claim.commit(
        Change(engine_version=version, upgrade_to=None, ref=placement.ref, url=placement.url,
               sleep_kind=_sleep_kind(old), health_failures=0, last_health_at=now()),
        Audit(A.UPGRADE, {**meta, "outcome": UPGRADED}, actor, ms))
    return done, UPGRADED


async def _roll_back(lc: Lifecycle, claim: Claim, old: EngineRow, meta: dict[str, object], actor: str,
                     started: float, *extra: Audit) -> EngineRow:
    """Run the engine on its previous version again (`old.engine_version`); when that fails too, it is
    marked `failed` on that version (a restart scheduled when it was meant to run) and the error raised."""
    try:
        placement = await _boot(lc, claim.row, old.engine_version, _runs(old))
    except (BackendFailed, BootTimeout) as err:
        await boot.halt(lc, old.id)
        at = now() if _runs(old) else None
        await claim.commit(
            Change(status=S.FAILED, sleep_kind=None, upgrade_to=None, restart_attempts=0, next_restart_at=at),
            Audit(A.UPGRADE, {**meta, "outcome": "failed", "rollback_error": err.code,
                              "rollback_message": err.message}, actor), *extra)
        raise err from None
    ms = int((time.monotonic() - started) * 1000)
    return await claim.commit(
        Change(upgrade_to=None, ref=placement.ref, url=placement.url, sleep_kind=_sleep_kind(old), health_failures=0,
               last_health_at=now()),
        Audit(A.UPGRADE, {**meta, "outcome": ROLLED_BACK}, actor, ms), *extra)


async def _boot(lc: Lifecycle, row: EngineRow, version: str, runs: bool) -> Placement:
    """Stop the engine, create it on `version` (same id, port, key and data), wait until healthy;
    stopped again when it is not meant to run. Raises BackendFailed, BootTimeout."""
    await boot.backend_call(lc.backend.stop(row.id, lc.settings.stop_grace_s), "stop")
    target = dataclasses.replace(row, engine_version=version)
    placement = await boot.backend_call(lc.backend.create(boot.spec_for(lc, target)), "create")
    await boot.await_healthy(lc, dataclasses.replace(target, url=placement.url), lc.settings.boot_timeout_s)
    if not runs:
        await boot.backend_call(lc.backend.stop(row.id, lc.settings.stop_grace_s), "stop")
    return placement


async def _running_version(url: str, timeout: float) -> str | None:
    """The version the engine's /health reports (the reference engine's `version`: its ENGINE_VERSION),
    None when it does not answer healthy or does not say."""
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            reply = await client.get(f"{url}/health")
        doc = reply.json() if reply.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("status") != "ok":
        return None
    version = doc.get("version")
    return version if isinstance(version, str) else None


async def finish(lc: Lifecycle, claim: Claim, found: str) -> str:
    """The reconciler, on an engine left mid-upgrade (`upgrade_to` set): keep the new version when the
    engine is meant to run and answers healthy on it, else put it back on its previous version."""
    c = claim.row
    assert c.upgrade_to is not None
    meta: dict[str, object] = {"from": c.engine_version, "to": c.upgrade_to, "by": "reconcile"}
    if _runs(c) and c.url is not None:
        version = await _running_version(c.url, lc.settings.health_check_timeout_s)
        if version == c.upgrade_to:
            seen = await boot.backend_call(lc.backend.inspect(c.id), "inspect")
            await claim.commit(Change(engine_version=c.upgrade_to, upgrade_to=None, ref=seen.ref or c.ref),
                               Audit(A.UPGRADE, {**meta, "outcome": UPGRADED}),
                               Audit(A.RECONCILE, {"found": found, "done": "upgrade completed"}))
            return "finished"
    await boot.halt(lc, c.id)
    try:
        await _roll_back(lc, claim, c, meta, "system", time.monotonic(),
                         Audit(A.RECONCILE, {"found": found, "done": "upgrade rolled back"}))
    except (BackendFailed, BootTimeout):
        return "failed"
    return "finished"
