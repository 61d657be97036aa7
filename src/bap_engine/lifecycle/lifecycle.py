"""Lifecycle: the engine state machine, and the only layer that calls a backend.

Every verb runs through the transition executor (transition.py): claim the op, call the
backend outside any transaction, then commit the typed update with all its audit rows in one
transaction — or release the claim on any error. Booting (create, start, health wait) lives in
boot.py; the engine's own key-rotation call in probe.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

import asyncpg

from bap_engine import audit, registry
from bap_engine.backends.base import BackendError, EngineBackend
from bap_engine.config import Settings
from bap_engine.errors import (
    BackendFailed,
    BootTimeout,
    EngineAlreadyExists,
    EngineAlreadyRunning,
    EngineBusy,
    EngineNotFound,
    EngineNotRunning,
    PortExhaustion,
    QuotaExceeded,
    ValidationFailed,
)
from bap_engine.keys import KeySealer, hash_key, new_engine_key
from bap_engine.lifecycle import boot
from bap_engine.lifecycle import pool as warm
from bap_engine.lifecycle import upgrade as upgrades
from bap_engine.lifecycle.clock import now
from bap_engine.lifecycle.probe import push_key
from bap_engine.lifecycle.transition import Audit, Change, Claim, Transitions
from bap_engine.lifecycle.views import EngineView, view
from bap_engine.registry import EngineRow, ProductRow
from bap_engine.states import AuditAction, EngineState

__all__ = ["Lifecycle", "check_version", "now", "use_pool"]

S = EngineState
A = AuditAction
_OP_SLACK_S = 30.0  # op deadline beyond the boot timeout


def use_pool(product: ProductRow) -> bool:
    """Whether provisions of this product look for a warm engine first."""
    size = product.policy.get("warm_pool")
    return isinstance(size, int) and size > 0


async def check_version(backend: EngineBackend, version: str) -> None:
    """Raises ValidationFailed naming an `engine_version` the backend does not know, BackendFailed
    when the backend cannot tell (its daemon is unreachable)."""
    if not await boot.backend_call(backend.has_version(version), "look up the version of"):
        raise ValidationFailed(f"unknown engine_version {version!r}: the {backend.name} backend does not have it")


class Lifecycle:
    def __init__(
        self, pool: asyncpg.Pool, backend: EngineBackend, settings: Settings, sealer: KeySealer,
        owner_id: int, engine_env: Mapping[str, str],
    ) -> None:
        self.pool = pool
        self.backend = backend
        self.settings = settings
        self.sealer = sealer
        self.owner_id = owner_id
        self.engine_env = dict(engine_env)
        self._keys: dict[str, str] = {}
        self.tx = Transitions(pool, owner_id, settings.boot_timeout_s + settings.stop_grace_s + _OP_SLACK_S)

    # ---- keys ----------------------------------------------------------------------------
    def key_of(self, row: EngineRow) -> str:
        return self.open_key(row.engine_key_enc)

    def open_key(self, sealed: str) -> str:
        """Decrypt an engine key, cached by ciphertext (a rotation changes it), because admit
        hands the key out on every call."""
        key = self._keys.get(sealed)
        if key is None:
            if len(self._keys) >= 10_000:
                self._keys.clear()
            key = self._keys[sealed] = self.sealer.open(sealed)
        return key

    async def engine_view(self, product: ProductRow, user_id: str) -> EngineView:
        """GET /engines/{user_id}. Raises EngineNotFound."""
        async with self.pool.acquire() as conn:
            row = await registry.get_engine(conn, product.id, user_id)
        if row is None:
            raise EngineNotFound()
        return view(row, self.key_of(row))

    # ---- versions ------------------------------------------------------------------------
    async def check_version(self, version: str) -> None:
        """Refuse an `engine_version` the backend cannot run (before anything is created).
        Raises ValidationFailed naming it, BackendFailed when the backend cannot tell."""
        await check_version(self.backend, version)

    # ---- provision -----------------------------------------------------------------------
    async def provision(
        self, product: ProductRow, user_id: str, engine_version: str | None = None, *,
        actor: str, max_engines: int | None = None, reuse_existing: bool = False,
    ) -> tuple[EngineRow, str | None]:
        """Create a user's engine and wait until healthy. Returns (row, plaintext key).

        With reuse_existing an existing row is returned as is (key None) instead of
        raising EngineAlreadyExists. A product with a warm pool hands over a ready pool engine of
        the version when it has one (no boot; the pool counts in max_engines already). Raises
        ValidationFailed (unknown version), QuotaExceeded, PortExhaustion, BootTimeout, BackendFailed."""
        key = new_engine_key()
        version = engine_version or self.settings.engine_image
        await self.check_version(version)
        async with self.pool.acquire() as conn, conn.transaction():
            await registry.lock_product(conn, product.id)
            existing = await registry.get_engine(conn, product.id, user_id)
            if existing is not None:
                if reuse_existing:
                    return existing, None
                raise EngineAlreadyExists()
            bound = await warm.bind(self, conn, product, user_id, version, key) if use_pool(product) else None
            if bound is None:
                if max_engines is not None:
                    count = await registry.count_engines(conn, product.id)
                    if count >= max_engines:
                        raise QuotaExceeded(f"product already has {count} engines (max_engines={max_engines})")
                row = await self.insert(conn, product, user_id, version, key)
        if bound is not None:
            if (claimed := await warm.hand_over(self, bound, key, actor)) is not None:
                return claimed, key
            return await self.provision(product, user_id, engine_version, actor=actor, max_engines=max_engines,
                                        reuse_existing=reuse_existing)
        return await self._boot_new(self.tx.adopt(row, "provision"), actor), key

    async def insert(self, conn: asyncpg.Connection, product: ProductRow, user_id: str, version: str,
                     key: str, *, engine_id: str | None = None, pool: bool = False, op: str = "provision") -> EngineRow:
        """A `provisioning` row on a free port, holding `op` for this process."""
        s = self.settings
        port = await registry.allocate_port(conn, s.port_min, s.port_max)
        if port is None:
            raise PortExhaustion(f"all ports {s.port_min}-{s.port_max} are in use")
        engine_id = engine_id or str(uuid.uuid4())
        row = await registry.insert_engine(
            conn, id=engine_id, product_id=product.id, user_id=user_id, port=port,
            url=self.backend.url_for(engine_id, port), engine_version=version, api_key_hash=hash_key(key),
            engine_key_enc=self.sealer.seal(key), op_owner=self.owner_id, op_ttl_s=self.tx.op_ttl_s,
            deployment=s.deployment, pool=pool, op=op,
        )
        if row is None:  # a concurrent insert won; the product lock makes this unreachable
            raise EngineAlreadyExists()
        return row

    async def _boot_new(self, claim: Claim, actor: str) -> EngineRow:
        started = time.monotonic()
        async with claim:  # a lost database mid-boot expires the op: the reconciler finishes or undoes it
            try:
                await boot.create(self, claim)
                await boot.await_healthy(self, claim.row, self.settings.boot_timeout_s - (time.monotonic() - started))
            except (BackendFailed, BootTimeout, PortExhaustion) as err:
                await boot.halt(self, claim.row.id, destroy=True)
                await claim.delete(Audit(A.PROVISION_FAILED, {"error": err.code, "message": str(err)}, actor))
                raise
            ms = int((time.monotonic() - started) * 1000)
            return await claim.commit(
                Change(status=S.RUNNING, boot_ms=ms, last_health_at=now(), last_active_at=now()),
                Audit(A.PROVISION, {"engine_version": claim.row.engine_version, "port": claim.row.port}, actor, ms))

    # ---- start / wake / restart ----------------------------------------------------------
    async def start(self, product: ProductRow, user_id: str, *, actor: str) -> EngineRow:
        """stopped|sleeping|failed → running, waiting for health. Raises EngineNotFound,
        EngineBusy, EngineAlreadyRunning, BootTimeout, BackendFailed."""
        async with await self.tx.claim_user(product.id, user_id, "start") as claim:
            status = claim.row.status
            if status not in (S.STOPPED, S.SLEEPING, S.FAILED):
                raise EngineAlreadyRunning() if status == S.RUNNING else EngineBusy()
            return await boot.bring_up(self, claim, A.WAKE if status == S.SLEEPING else A.START, actor)

    async def wake(self, row: EngineRow, *, actor: str) -> EngineRow:
        """sleeping → running for admit(auto_wake); waits for a concurrent transition.
        Raises EngineBusy (timeout), BootTimeout, BackendFailed."""
        deadline = time.monotonic() + self.settings.boot_timeout_s
        while (claim := await self.tx.claim(row.id, "wake")) is None:
            if time.monotonic() > deadline:
                raise EngineBusy()
            await asyncio.sleep(0.02)
            async with self.pool.acquire() as conn:
                fresh = await registry.get_engine_by_id(conn, row.id)
            if fresh is None or fresh.status != S.SLEEPING:
                return fresh or row
        async with claim:
            if claim.row.status != S.SLEEPING:
                return claim.row
            return await boot.bring_up(self, claim, A.WAKE, actor)

    async def restart(self, row: EngineRow, attempt: int, *, retry_in_s: float | None) -> EngineRow | None:
        """One auto-restart attempt of a failed engine (audited auto_restart_start first); None
        when busy or no longer failed. On failure the next attempt is scheduled `retry_in_s` later,
        or the restarts give up (no retry left, or a permanent error such as a missing image),
        and BootTimeout/BackendFailed is raised (the engine stays failed)."""
        claim = await self.tx.claim(row.id, "restart")
        if claim is None:
            return None
        async with claim:
            if claim.row.status != S.FAILED:
                return None
            claim.row = await claim.note(Change(), Audit(A.AUTO_RESTART_START, {"attempt": attempt}))

            def failure(err: boot.BootError) -> tuple[Change, list[Audit]]:
                meta: dict[str, object] = {"attempt": attempt, "error": err.code, "reason": err.message}
                audits = [Audit(A.AUTO_RESTART_FAILED, meta)]
                if retry_in_s is not None and getattr(err, "transient", True):
                    meta["next_in_s"] = round(retry_in_s, 2)
                    at = now() + timedelta(seconds=retry_in_s)
                    return Change(restart_attempts=attempt + 1, next_restart_at=at), audits
                why = "too many attempts" if retry_in_s is None else "permanent backend error"
                audits.append(Audit(A.AUTO_RESTART_GAVE_UP, {"attempts": attempt + 1, "reason": why}))
                return Change(restart_attempts=attempt + 1, next_restart_at=None), audits

            return await boot.bring_up(self, claim, A.AUTO_RESTART_SUCCESS, "system", {"attempt": attempt}, failure)

    # ---- upgrade ---------------------------------------------------------------------------
    async def upgrade(self, product: ProductRow, user_id: str, engine_version: str, *,
                      actor: str) -> tuple[EngineRow, str]:
        """Replace the engine's runtime with `engine_version`, keeping data, key, URL and id (see
        upgrade.py). Returns (row, "upgraded" | "rolled_back"). Raises ValidationFailed, EngineNotFound,
        EngineBusy, EngineNotRunning, BootTimeout, BackendFailed."""
        return await upgrades.upgrade(self, product, user_id, engine_version, actor=actor)

    # ---- stop / sleep / fail -------------------------------------------------------------
    async def stop(self, product: ProductRow, user_id: str, *, actor: str) -> EngineRow:
        """running|sleeping → stopped (data kept). Raises EngineNotFound, EngineBusy, EngineNotRunning."""
        async with await self.tx.claim_user(product.id, user_id, "stop") as claim:
            status = claim.row.status
            if status not in (S.RUNNING, S.SLEEPING):
                raise EngineNotRunning() if status in (S.STOPPED, S.FAILED) else EngineBusy()
            await boot.backend_call(self.backend.stop(claim.row.id, self.settings.stop_grace_s), "stop")
            return await claim.commit(Change(status=S.STOPPED, sleep_kind=None),
                                      Audit(A.STOP, {"from": str(status)}, actor))

    async def sleep(self, row: EngineRow, *, idle_s: float) -> bool:
        """running → sleeping after idleness, by ORCH_SLEEP_MODE. False when busy or changed."""
        claim = await self.tx.claim(row.id, "sleep")
        if claim is None:
            return False
        async with claim:
            fresh = claim.row  # what the worker read may be stale: exempt, busy and pool engines stay up
            if fresh.status != S.RUNNING or fresh.idle_sleep == "never" or fresh.busy or fresh.pool:
                return False
            mode = self.settings.sleep_mode
            try:
                if mode == "pause":
                    await self.backend.pause(row.id)
                elif mode == "stop":
                    await self.backend.stop(row.id, self.settings.stop_grace_s)
            except BackendError:
                return False
            kind = {"pause": "paused", "stop": "stopped", "label": "label"}[mode]
            await claim.commit(Change(status=S.SLEEPING, sleep_kind=kind),
                               Audit(A.SLEEP, {"mode": mode, "idle_s": round(idle_s)}))
            return True

    async def deep_sleep(self, row: EngineRow) -> bool:
        """A long-sleeping paused engine is stopped to free memory; it stays `sleeping`."""
        claim = await self.tx.claim(row.id, "deep_sleep")
        if claim is None:
            return False
        async with claim:
            if claim.row.status != S.SLEEPING or claim.row.sleep_kind == "stopped":
                return False
            try:
                await self.backend.stop(row.id, self.settings.stop_grace_s)
            except BackendError:
                return False
            await claim.commit(Change(sleep_kind="stopped"), Audit(A.SLEEP, {"mode": "stop", "stage": "long_idle"}))
            return True

    async def mark_failed(self, row: EngineRow, *, reason: str, next_restart_at: datetime, by: str = "health",
                          extra: Sequence[Audit] = ()) -> bool:
        """running → failed (audit health_failed), the first restart scheduled."""
        claim = await self.tx.claim(row.id, "mark_failed")
        if claim is None:
            return False
        async with claim:
            if claim.row.status != S.RUNNING:
                return False
            await claim.commit(Change(status=S.FAILED, restart_attempts=0, next_restart_at=next_restart_at),
                               Audit(A.HEALTH_FAILED, {"reason": reason, "by": by}), *extra)
            return True

    async def record_probes(self, ok: Sequence[EngineRow], bad: Sequence[EngineRow],
                            sampled: Sequence[EngineRow]) -> dict[str, int]:
        """A health sweep's observations in one transaction (no state change: mark_failed does that).
        Returns the consecutive failure count of each bad engine."""
        async with self.pool.acquire() as conn, conn.transaction():
            await registry.record_health_ok(conn, [r.id for r in ok])
            counts = await registry.bump_health_failures(conn, [r.id for r in bad])
            await audit.write_many(conn, [(r.product_id, r.user_id, r.id, A.HEALTH_CHECK, "system",
                                           {"ok": True}, None) for r in sampled])
        return counts

    # ---- destroy / rotate ------------------------------------------------------------------
    async def destroy(self, product: ProductRow, user_id: str, *, actor: str) -> str:
        """Remove the engine, its data, port and row. Raises EngineNotFound, EngineBusy, BackendFailed."""
        claim = await self.tx.claim_user(product.id, user_id, "destroy")
        async with claim:
            return await self.destroy_claimed(claim, actor=actor)

    async def destroy_claimed(self, claim: Claim, *, actor: str, found: str | None = None) -> str:
        """Audited `destroy` as it enters `destroying` (the intent), then the backend, then the row
        goes. `found`: the reconciler finishing an interrupted destroy (audited `reconcile`)."""
        row = claim.row
        if row.status != S.DESTROYING:
            await claim.note(Change(status=S.DESTROYING), Audit(A.DESTROY, {"from": str(row.status)}, actor))
        await boot.backend_call(self.backend.destroy(row.id), "destroy")
        await claim.delete(*([Audit(A.RECONCILE, {"found": found, "done": "destroy completed"})] if found else []))
        return row.id

    async def rotate_key(self, product: ProductRow, user_id: str, *, actor: str) -> tuple[EngineRow, str]:
        """Hand a new key's hash to the live engine, then store it. Returns (row, new key).

        The sealed new key is recorded first, so a crash mid-rotation is completed by the
        reconciler (complete_rotation). Raises EngineNotFound, EngineBusy, EngineNotRunning,
        BackendFailed."""
        async with await self.tx.claim_user(product.id, user_id, "rotate_key") as claim:
            if claim.row.status != S.RUNNING:
                raise EngineNotRunning()
            new_key = new_engine_key()
            row = await claim.note(Change(pending_key_enc=self.sealer.seal(new_key)))
            status = await self.push_key(row, self.key_of(row), new_key)
            if status != 200:
                await claim.commit(Change(pending_key_enc=None))
                why = "does not support live key rotation" if status == 404 else f"answered {status}"
                raise BackendFailed(f"engine {why}" if status else "engine did not answer the key rotation")
            overlap = self.settings.key_rotation_overlap_s
            row = await claim.commit(
                Change(api_key_hash=hash_key(new_key), engine_key_enc=self.sealer.seal(new_key), pending_key_enc=None),
                Audit(A.ROTATE_KEY, {"overlap_seconds": overlap}, actor))
            return row, new_key

    async def push_key(self, row: EngineRow, auth: str, new_key: str, *, overlap_s: int | None = None) -> int:
        """Hand the live engine a new key's hash (authenticated with `auth`); its HTTP status, 0 for none."""
        assert row.url is not None
        overlap = self.settings.key_rotation_overlap_s if overlap_s is None else overlap_s
        return await push_key(row.url, auth, hash_key(new_key), overlap, self.settings.health_check_timeout_s)

    async def complete_rotation(self, claim: Claim, found: str) -> bool:
        """After a crash mid-rotation: make engine and row agree on the pending key (idempotent).
        True when the new key is now stored; False when the rotation was dropped."""
        row = claim.row
        assert row.pending_key_enc is not None
        new_key = self.sealer.open(row.pending_key_enc)
        for auth in (self.key_of(row), new_key):  # old key (within the overlap), or the engine already moved on
            if await self.push_key(row, auth, new_key) == 200:
                await claim.commit(
                    Change(api_key_hash=hash_key(new_key), engine_key_enc=row.pending_key_enc, pending_key_enc=None),
                    Audit(A.ROTATE_KEY, {"completed_by": "reconcile"}),
                    Audit(A.RECONCILE, {"found": found, "done": "rotation completed"}))
                return True
        await claim.commit(Change(pending_key_enc=None), Audit(A.RECONCILE, {"found": found,
                                                                            "done": "rotation dropped"}))
        return False
