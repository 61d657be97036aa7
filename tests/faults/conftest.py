"""Fault-suite fixtures: a dedicated, restartable Postgres, and `disruptive` tests run last.

- `fault_pg` (session): a `FaultPostgres` (see pgctl.py) on its own port and data directory,
  migrated once. Tests stop and start it; the suite's shared Postgres is never touched.
- `pg_dsn` is overridden for this directory with the fault server's DSN, so the shared fixtures
  (`settings`, `start_server`, `response_log`...) of tests/conftest.py and tests/e2e/conftest.py
  all run on it unchanged.
- `_pg_running` (autouse): every test starts with the fault Postgres up, whatever the last did.
- `pytest_collection_modifyitems`: tests marked `disruptive` (they restart shared daemons, such
  as dockerd) are moved to the very end of the whole session, keeping the order of the rest.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bap_engine.db import migrate
from tests.backends.helpers import free_port
from tests.conftest import wait_out_owner_grace
from tests.e2e.conftest import start_server
from tests.faults.pgctl import FaultPostgres

__all__ = ["start_server"]  # the e2e fixture, made visible to this directory

# Below the kernel's ephemeral range (so no outgoing connection can take the port while the
# server is down) and away from engine (20000-29999) and orchestrator (8000, 9001-9999) ports.
PG_PORTS = "15000-19999"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Disruptive tests last (a stable sort: everything else keeps its order)."""
    items.sort(key=lambda item: item.get_closest_marker("disruptive") is not None)


@pytest.fixture(scope="session")
async def fault_pg() -> AsyncIterator[FaultPostgres]:
    base = Path(tempfile.mkdtemp(prefix="bap-fault-pg-"))
    server = FaultPostgres(base, free_port(PG_PORTS))
    try:
        server.init()
        await server.start()
        await migrate.upgrade(server.dsn)
        await wait_out_owner_grace(server.dsn)
        yield server
    finally:
        try:
            server.stop_sync("immediate")
        finally:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_dsn(fault_pg: FaultPostgres) -> str:
    """This directory's database: the fault Postgres (overrides tests/conftest.py's pg_dsn)."""
    return fault_pg.dsn


@pytest.fixture(autouse=True)
async def _pg_running(fault_pg: FaultPostgres) -> None:
    await fault_pg.start()
