"""Fixtures for the operator/developer-experience tests.

- `ops_server` (session): one real `bap-engine serve` process on a free port, on the session's test
  Postgres, with its JSON logs captured to a file. Engines it leaves are destroyed at the end, by
  the same helper the shared conftest uses. Stopped by its PID, never by name.
- `admin` / `product` / `bap`: clients of `bap_engine.client` against it, a fresh product per test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from bap_engine.client import BapClient
from bap_engine.config import Settings
from tests.conftest import ADMIN_KEY, destroy_leftover_engines, next_port_range, unique_slug
from tests.e2e.conftest import free_port, wait_ready


@dataclass
class OpsServer:
    url: str
    settings: Settings
    log: Path
    proc: subprocess.Popen[bytes]
    secrets: list[str] = field(default_factory=list)

    @property
    def admin_key(self) -> str:
        assert self.settings.admin_key
        return self.settings.admin_key

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass(frozen=True)
class OpsProduct:
    product_id: str
    slug: str
    platform_key: str


@pytest.fixture(scope="package")  # its leader must not act on the products of tests outside tests/ops
async def ops_server(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[OpsServer]:
    data_dir = tmp_path_factory.mktemp("ops-server")
    port_min, port_max = next_port_range()
    settings = Settings(database_url=pg_dsn, master_key=Fernet.generate_key().decode(), admin_key=ADMIN_KEY,
                        data_dir=data_dir, port_min=port_min, port_max=port_max,
                        deployment=f"ops-{uuid.uuid4().hex[:10]}")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "BAP_"))}
    env.update({
        "ORCH_DATABASE_URL": pg_dsn, "ORCH_MASTER_KEY": settings.master_key or "", "ORCH_ADMIN_KEY": ADMIN_KEY,
        "ORCH_DATA_DIR": str(data_dir), "ORCH_PORT_MIN": str(port_min), "ORCH_PORT_MAX": str(port_max),
        "ORCH_DEPLOYMENT": settings.deployment, "ORCH_BOOT_TIMEOUT_S": "20", "ORCH_STOP_GRACE_S": "5",
        "ORCH_WORKERS_ENABLED": "false", "ORCH_LOG_LEVEL": "INFO", "ORCH_PORT": str(port),
    })
    exe = str(Path(sys.executable).with_name("bap-engine"))
    log = data_dir / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([exe, "serve"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    server = OpsServer(f"http://127.0.0.1:{port}", settings, log, proc,
                       secrets=[ADMIN_KEY, settings.master_key or ""])
    try:
        wait_ready(server.url, proc, log=log)
        yield server
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        await destroy_leftover_engines(settings, pg_dsn)


@pytest.fixture
def admin(ops_server: OpsServer) -> Iterator[BapClient]:
    with BapClient(ops_server.url, admin_key=ops_server.admin_key) as client:
        yield client


@pytest.fixture
def product(admin: BapClient, ops_server: OpsServer) -> OpsProduct:
    reg = admin.register_product(unique_slug("ops"), "Ops test product")
    ops_server.secrets.append(reg.platform_api_key)
    return OpsProduct(reg.product_id, reg.slug, reg.platform_api_key)


@pytest.fixture
def bap(ops_server: OpsServer, product: OpsProduct) -> Iterator[BapClient]:
    with BapClient(ops_server.url, platform_key=product.platform_key, admin_key=ops_server.admin_key) as client:
        yield client
