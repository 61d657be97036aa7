"""Lifecycle: the engine state machine. The only layer that calls a backend.

Each transition follows three steps: (1) claim the engine's op and write the intent,
commit; (2) call the backend outside any transaction; (3) record the outcome with its
audit row in one transaction. A crash between steps leaves an op whose owner is dead,
which the reconciler (or the next request) takes over.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime

import asyncpg

from bap_engine import audit, registry
from bap_engine.backends.base import (
    LABEL_DEPLOYMENT,
    LABEL_ENGINE_ID,
    LABEL_PRODUCT_ID,
    BackendError,
    EngineAbsent,
    EngineBackend,
    EngineSpec,
    ImageNotFound,
    PortInUse,
)
from bap_engine.config import Settings
from bap_engine.errors import (
    BackendFailed,
    BootTimeout,
    EngineAlreadyExists,
    EngineAlreadyRunning,
    EngineBusy,
    EngineNotFound,
    EngineNotRunning,
    InternalError,
    PortExhaustion,
    QuotaExceeded,
)
from bap_engine.keys import KeySealer, hash_key, new_engine_key
from bap_engine.lifecycle.probe import wait_healthy
from bap_engine.lifecycle.views import EngineView, view
from bap_engine.registry import EngineRow, ProductRow
from bap_engine.states import AuditAction, EngineState, can_transition

__all__ = ["LifecycleCore", "now"]

S = EngineState
_OP_SLACK_S = 30.0  # op deadline beyond the boot timeout


class LifecycleCore:
    def __init__(
        self, pool: asyncpg.Pool, backend: EngineBackend, settings: Settings, sealer: KeySealer,
        owner_id: int, engine_env: Mapping[str, str],
    ) -> None:
        self.pool = pool
        self.backend = backend
        self.settings = settings
        self.sealer = sealer
        self.owner_id = owner_id
        self._engine_env = dict(engine_env)
        self._keys: dict[str, str] = {}
        self._op_ttl = settings.boot_timeout_s + settings.stop_grace_s + _OP_SLACK_S

    # ---- helpers -------------------------------------------------------------------------
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

    def spec_for(self, row: EngineRow) -> EngineSpec:
        env = {**self._engine_env, "ENGINE_KEY_HASH": row.api_key_hash, "ENGINE_VERSION": row.engine_version}
        labels = {LABEL_ENGINE_ID: row.id, LABEL_PRODUCT_ID: row.product_id,
                  LABEL_DEPLOYMENT: self.settings.deployment}
        assert row.port is not None
        return EngineSpec(engine_id=row.id, product_id=row.product_id, port=row.port, image=row.engine_version,
                          env=env, labels=labels, cpus=self.settings.engine_cpus, memory=self.settings.engine_memory)

    async def wait_healthy(self, url: str, timeout: float) -> bool:
        return await wait_healthy(url, timeout, self.settings.health_check_timeout_s)

    async def _claim(self, product_id: str, user_id: str, op: str) -> EngineRow:
        """Claim the engine for `op`. Raises EngineNotFound, EngineBusy."""
        async with self.pool.acquire() as conn:
            row = await registry.get_engine(conn, product_id, user_id)
            if row is None:
                raise EngineNotFound()
            claimed = await registry.claim_op(conn, row.id, op, self.owner_id, self._op_ttl)
        if claimed is None:
            raise EngineBusy()
        return claimed

    async def claim_row(self, row: EngineRow, op: str) -> EngineRow | None:
        async with self.pool.acquire() as conn:
            return await registry.claim_op(conn, row.id, op, self.owner_id, self._op_ttl)

    async def release(self, row: EngineRow) -> None:
        async with self.pool.acquire() as conn:
            await registry.update_engine(conn, row.id, op=None, op_owner=None, op_deadline=None)

    async def finish(
        self, row: EngineRow, action: AuditAction | None, *, actor: str = "system",
        metadata: dict[str, object] | None = None, duration_ms: int | None = None, **values: object,
    ) -> EngineRow:
        """Record an outcome and its audit row in one transaction; releases the op."""
        new = values.get("status")
        if isinstance(new, EngineState) and new != row.status and not can_transition(row.status, new):
            raise InternalError(f"transition {row.status} → {new} is not in the state table")
        async with self.pool.acquire() as conn, conn.transaction():
            new = await registry.update_engine(conn, row.id, op=None, op_owner=None, op_deadline=None, **values)
            if action is not None:
                await audit.write(conn, action, product_id=row.product_id, user_id=row.user_id,
                                  engine_id=row.id, actor=actor, metadata=metadata, duration_ms=duration_ms)
        return new or row

    # ---- provision -----------------------------------------------------------------------
    async def provision(
        self, product: ProductRow, user_id: str, engine_version: str | None = None, *,
        actor: str, max_engines: int | None = None, reuse_existing: bool = False,
    ) -> tuple[EngineRow, str | None]:
        """Create a user's engine and wait until healthy. Returns (row, plaintext key).

        With reuse_existing an existing row is returned as is (key None) instead of
        raising EngineAlreadyExists. Raises QuotaExceeded, PortExhaustion, BootTimeout,
        BackendFailed."""
        version = engine_version or self.settings.engine_image
        key = new_engine_key()
        async with self.pool.acquire() as conn, conn.transaction():
            await registry.lock_product(conn, product.id)
            existing = await registry.get_engine(conn, product.id, user_id)
            if existing is not None:
                if reuse_existing:
                    return existing, None
                raise EngineAlreadyExists()
            if max_engines is not None:
                existing_count = await registry.count_engines(conn, product.id)
                if existing_count >= max_engines:
                    raise QuotaExceeded(f"product already has {existing_count} engines (max_engines={max_engines})")
            row = await self._insert(conn, product, user_id, version, key)
        return await self._boot(row, actor), key

    async def _insert(
        self, conn: asyncpg.Connection, product: ProductRow, user_id: str, version: str, key: str
    ) -> EngineRow:
        s = self.settings
        port = await registry.allocate_port(conn, s.port_min, s.port_max)
        if port is None:
            raise PortExhaustion(f"all ports {s.port_min}-{s.port_max} are in use")
        engine_id = str(uuid.uuid4())
        row = await registry.insert_engine(
            conn, id=engine_id, product_id=product.id, user_id=user_id, port=port,
            url=self.backend.url_for(engine_id, port), engine_version=version, api_key_hash=hash_key(key),
            engine_key_enc=self.sealer.seal(key), op_owner=self.owner_id, op_ttl_s=self._op_ttl,
            deployment=self.settings.deployment,
        )
        if row is None:  # a concurrent insert won; the product lock makes this unreachable
            raise EngineAlreadyExists()
        return row

    async def _boot(self, row: EngineRow, actor: str) -> EngineRow:
        started = time.monotonic()
        try:
            row = await self._create_with_free_port(row)
            left = self.settings.boot_timeout_s - (time.monotonic() - started)
            assert row.url is not None
            if not await self.wait_healthy(row.url, left):
                raise BootTimeout(f"engine did not become healthy within {self.settings.boot_timeout_s:g}s")
        except (BootTimeout, BackendFailed, PortExhaustion) as err:
            await self._provision_failed(row, err, actor)
            raise
        boot_ms = int((time.monotonic() - started) * 1000)
        return await self.finish(
            row, AuditAction.PROVISION, actor=actor, duration_ms=boot_ms,
            metadata={"engine_version": row.engine_version, "port": row.port},
            status=S.RUNNING, boot_ms=boot_ms, last_health_at=now(), last_active_at=now(),
        )

    async def _create_with_free_port(self, row: EngineRow) -> EngineRow:
        avoid: list[int] = []
        for _ in range(5):
            try:
                placement = await self.backend.create(self.spec_for(row))
            except PortInUse as err:  # something outside our registry holds it: move on
                avoid.append(err.port)
                row = await self._move_port(row, avoid)
                continue
            except ImageNotFound as err:
                raise BackendFailed(err.message) from None
            except BackendError as err:
                raise BackendFailed(f"backend failed to create the engine: {err.message}") from None
            async with self.pool.acquire() as conn:  # intent: the runtime handle exists now
                return await registry.update_engine(conn, row.id, ref=placement.ref, url=placement.url) or row
        raise PortExhaustion("no usable engine port found")

    async def _move_port(self, row: EngineRow, avoid: list[int]) -> EngineRow:
        s = self.settings
        async with self.pool.acquire() as conn, conn.transaction():
            port = await registry.allocate_port(conn, s.port_min, s.port_max, avoid)
            if port is None:
                raise PortExhaustion(f"all ports {s.port_min}-{s.port_max} are in use")
            new = await registry.update_engine(conn, row.id, port=port, url=self.backend.url_for(row.id, port))
        return new or row

    async def _provision_failed(self, row: EngineRow, err: Exception, actor: str) -> None:
        try:
            await self.backend.destroy(row.id)
        except BackendError:
            pass  # the reconciler removes what is left
        async with self.pool.acquire() as conn, conn.transaction():
            await registry.delete_engine(conn, row.id)
            code = getattr(err, "code", "BACKEND_ERROR")
            await audit.write(conn, AuditAction.PROVISION_FAILED, product_id=row.product_id, user_id=row.user_id,
                              engine_id=row.id, actor=actor, metadata={"error": code, "message": str(err)})

    # ---- start / stop / destroy ------------------------------------------------------------
    async def start(self, product: ProductRow, user_id: str, *, actor: str) -> EngineRow:
        """stopped|sleeping|failed → running, waiting for health. Raises EngineNotFound,
        EngineBusy, EngineAlreadyRunning, BootTimeout, BackendFailed."""
        row = await self._claim(product.id, user_id, "start")
        if row.status not in (S.STOPPED, S.SLEEPING, S.FAILED):
            await self.release(row)
            raise EngineAlreadyRunning() if row.status == S.RUNNING else EngineBusy()
        action = AuditAction.WAKE if row.status == S.SLEEPING else AuditAction.START
        return await self.bring_up(row, action, actor=actor)

    async def bring_up(self, row: EngineRow, action: AuditAction, *, actor: str,
                       metadata: dict[str, object] | None = None) -> EngineRow:
        """Run a claimed engine and wait for health; on failure it is marked failed."""
        started = time.monotonic()
        try:
            ref = await self._run_backend(row)
            assert row.url is not None
            if not await self.wait_healthy(row.url, self.settings.boot_timeout_s):
                raise BootTimeout(f"engine did not become healthy within {self.settings.boot_timeout_s:g}s")
        except (BootTimeout, BackendFailed) as err:
            await self._halt(row.id)  # never leave a half-alive engine behind a failed row
            await self.finish(row, None, status=S.FAILED, sleep_kind=None, next_restart_at=None)
            raise err from None
        ms = int((time.monotonic() - started) * 1000)
        return await self.finish(
            row, action, actor=actor, duration_ms=ms, metadata={"from": str(row.status), **(metadata or {})},
            status=S.RUNNING, sleep_kind=None, health_failures=0, restart_attempts=0, next_restart_at=None,
            last_health_at=now(), last_active_at=now(), ref=ref,
        )

    async def _halt(self, engine_id: str) -> None:
        try:
            await self.backend.stop(engine_id, min(2.0, self.settings.stop_grace_s))
        except BackendError:
            pass  # the reconciler sees what is left

    async def _run_backend(self, row: EngineRow) -> str:
        """Run the engine again; returns its (possibly new) runtime handle."""
        if row.status == S.FAILED:
            await self._halt(row.id)  # a failed engine may still hold its port half-alive
        try:
            if row.status == S.SLEEPING and row.sleep_kind == "label":
                return row.ref or ""
            if row.status == S.SLEEPING and row.sleep_kind == "paused":
                try:
                    await self.backend.resume(row.id)
                    return row.ref or ""
                except EngineAbsent:
                    pass
            try:
                await self.backend.start(row.id)
            except EngineAbsent:  # vanished behind our back: re-create with its data
                return (await self.backend.create(self.spec_for(row))).ref
            return (await self.backend.inspect(row.id)).ref or row.ref or ""
        except BackendError as err:
            raise BackendFailed(f"backend failed to start the engine: {err.message}") from None

    async def stop(self, product: ProductRow, user_id: str, *, actor: str) -> EngineRow:
        """running|sleeping → stopped (data kept). Raises EngineNotFound, EngineBusy, EngineNotRunning."""
        row = await self._claim(product.id, user_id, "stop")
        if row.status not in (S.RUNNING, S.SLEEPING):
            await self.release(row)
            raise EngineNotRunning() if row.status in (S.STOPPED, S.FAILED) else EngineBusy()
        try:
            await self.backend.stop(row.id, self.settings.stop_grace_s)
        except BackendError as err:
            await self.release(row)
            raise BackendFailed(f"backend failed to stop the engine: {err.message}") from None
        return await self.finish(row, AuditAction.STOP, actor=actor, metadata={"from": str(row.status)},
                                 status=S.STOPPED, sleep_kind=None)

    async def destroy(self, product: ProductRow, user_id: str, *, actor: str) -> str:
        """Remove the engine, its data, port and row. Raises EngineNotFound, EngineBusy, BackendFailed."""
        row = await self._claim(product.id, user_id, "destroy")
        return await self.destroy_claimed(row, actor=actor)

    async def destroy_claimed(self, row: EngineRow, *, actor: str, metadata: dict[str, object] | None = None) -> str:
        async with self.pool.acquire() as conn:
            await registry.update_engine(conn, row.id, status=S.DESTROYING)
        try:
            await self.backend.destroy(row.id)
        except BackendError as err:
            raise BackendFailed(f"backend failed to destroy the engine: {err.message}") from None
        async with self.pool.acquire() as conn, conn.transaction():
            await registry.delete_engine(conn, row.id)
            await audit.write(conn, AuditAction.DESTROY, product_id=row.product_id, user_id=row.user_id,
                              engine_id=row.id, actor=actor, metadata=metadata or {"from": str(row.status)})
        return row.id

    async def engine_view(self, product: ProductRow, user_id: str) -> EngineView:
        """GET /engines/{user_id}. Raises EngineNotFound."""
        async with self.pool.acquire() as conn:
            row = await registry.get_engine(conn, product.id, user_id)
        if row is None:
            raise EngineNotFound()
        return view(row, self.key_of(row))


def now() -> datetime:
    return datetime.now(UTC)
