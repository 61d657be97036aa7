"""The system under test: two `bap-engine serve` replicas (subprocess backend, reference engine)
on the soak's Postgres, with one master key, admin key, data dir, deployment and port range;
the products they serve; and the teardown (engines through the API, then by pid, then the
replicas, each ended by its own pid).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from cryptography.fernet import Fernet

from soak import procs
from soak.config import BAP_ENGINE, HOST, PRODUCTS, SoakConfig

__all__ = ["Replica", "Product", "Cluster", "free_port"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Replica:
    name: str
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_lines(self, needle: str = "", limit: int = 12) -> list[str]:
        with contextlib.suppress(OSError):
            lines = self.log.read_text(errors="replace").splitlines()
            return [line for line in lines if needle in line][-limit:]
        return []


    def uncaught(self, limit: int = 4) -> list[str]:
        """Exception lines printed outside the JSON log (uncaught: uvicorn's or asyncio's own report)."""
        found: list[str] = []
        for line in self.log_lines(limit=100_000):
            text = line.strip(" |+")
            if line.startswith("{") or text.startswith("File ") or not re.search(r"(Error|Exception)\b", text):
                continue
            if text not in found:
                found.append(text[:200])
        return found[:limit]


@dataclass(frozen=True)
class Product:
    slug: str
    product_id: str
    key: str
    policy: dict[str, object]
    users: tuple[str, ...]

    @property
    def max_engines(self) -> int | None:
        value = self.policy.get("max_engines")
        return value if isinstance(value, int) else None

    @property
    def rpm(self) -> int | None:
        value = self.policy.get("rate_limit_rpm")
        return value if isinstance(value, int) else None


@dataclass
class Cluster:
    cfg: SoakConfig
    workdir: Path
    dsn: str
    deployment: str = field(default_factory=lambda: f"soak-{secrets.token_hex(4)}")
    master_key: str = field(default_factory=lambda: Fernet.generate_key().decode(), repr=False)
    admin_key: str = field(default_factory=lambda: f"adm-soak-{secrets.token_urlsafe(24)}", repr=False)
    replicas: list[Replica] = field(default_factory=list)
    products: list[Product] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    def env(self, port: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
        env.update({
            "ORCH_DATABASE_URL": self.dsn, "ORCH_MASTER_KEY": self.master_key, "ORCH_ADMIN_KEY": self.admin_key,
            "ORCH_DATA_DIR": str(self.data_dir), "ORCH_HOST": HOST, "ORCH_PORT": str(port),
            "ORCH_PORT_MIN": str(self.cfg.port_min), "ORCH_PORT_MAX": str(self.cfg.port_max),
            "ORCH_DEPLOYMENT": self.deployment, "ORCH_ENGINE_BACKEND": "subprocess",
            "ORCH_HEALTH_CHECK_INTERVAL_S": "1", "ORCH_HEALTH_CHECK_TIMEOUT_S": "2",
            "ORCH_RECONCILE_INTERVAL_S": "2", "ORCH_RESTART_BACKOFF_BASE_S": "1", "ORCH_RESTART_BACKOFF_MAX_S": "8",
            "ORCH_BOOT_TIMEOUT_S": "20", "ORCH_STOP_GRACE_S": "5", "ORCH_IDLE_SLEEP_AFTER_S": "3",
            "ORCH_IDLE_STOP_AFTER_S": "30", "ORCH_LOG_LEVEL": "INFO",
        })
        return env

    async def start(self, names: tuple[str, ...] = ("A", "B")) -> None:
        """Start the replicas one after the other (each runs the migrations at start-up)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            port = free_port()
            replica = Replica(name, port, self.workdir / f"serve-{name}.log")
            with replica.log.open("wb") as out:
                replica.proc = subprocess.Popen([BAP_ENGINE, "serve"], env=self.env(port), stdout=out,
                                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                cwd=self.workdir, start_new_session=True)
            self.replicas.append(replica)
            await self._wait_ready(replica)

    async def _wait_ready(self, replica: Replica, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2) as c:
            while time.monotonic() < deadline:
                if not replica.alive():
                    tail = "\n".join(replica.log_lines(limit=30))
                    raise RuntimeError(f"replica {replica.name} exited at start-up:\n{tail}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await c.get(replica.url + "/health")).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise RuntimeError(f"replica {replica.name} not healthy after {timeout:.0f}s")

    async def register_products(self, c: httpx.AsyncClient) -> None:
        for slug, (policy, pool) in PRODUCTS.items():
            r = await c.post(self.replicas[0].url + "/products/register", headers={"X-Admin-Key": self.admin_key},
                             json={"slug": slug, "display_name": slug, "policy": policy})
            r.raise_for_status()
            body = r.json()
            users = tuple(f"u{i}" for i in range(pool))
            self.products.append(Product(slug, body["product_id"], body["platform_api_key"], policy, users))

    async def destroy_all(self, c: httpx.AsyncClient, deadline_s: float = 60) -> tuple[int, list[str]]:
        """DELETE every engine of our products through the API (retrying ENGINE_BUSY)."""
        deadline = time.monotonic() + deadline_s
        destroyed, failures = 0, []
        gate = asyncio.Semaphore(6)

        async def one(product: Product, user: str) -> None:
            nonlocal destroyed
            async with gate:
                while True:
                    try:
                        r = await c.delete(f"{self.replicas[0].url}/engines/{user}",
                                           headers={"X-Platform-Key": product.key}, timeout=30)
                    except httpx.HTTPError as err:
                        failures.append(f"{product.slug}/{user}: {type(err).__name__}")
                        return
                    if r.status_code in (200, 404):
                        destroyed += r.status_code == 200
                        return
                    if r.status_code not in (409, 503) or time.monotonic() > deadline:
                        failures.append(f"{product.slug}/{user}: HTTP {r.status_code} {r.text[:120]}")
                        return
                    await asyncio.sleep(0.5)

        await asyncio.gather(*(one(p, u) for p in self.products for u in p.users))
        return destroyed, failures

    def stop_replicas(self) -> dict[str, int | None]:
        """SIGTERM every replica still up, wait, SIGKILL after 25 s; their exit codes."""
        for replica in self.replicas:
            if replica.alive():
                assert replica.proc is not None
                replica.proc.send_signal(signal.SIGTERM)
        for replica in self.replicas:
            if replica.proc is None:
                continue
            try:
                replica.proc.wait(25)
            except subprocess.TimeoutExpired:
                replica.proc.kill()
                replica.proc.wait(10)
        return {r.name: r.proc.returncode if r.proc is not None else None for r in self.replicas}

    def reap_engines(self) -> int:
        """End every engine process of our deployment still alive (by pid and start time)."""
        left = procs.scan_engines(self.deployment)
        for proc in left:
            procs.end_group(proc.pid, proc.starttime)
        return len(left)
