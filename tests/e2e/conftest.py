"""End-to-end fixtures: real `bap-engine serve` processes on free ports, killed by PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bap_engine.config import Settings
from tests.log_scan import record_server_log


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60, log: Path | None = None) -> None:
    """Poll /health until 200; fail at once (with the log's tail) if the server exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = f":\n{log.read_text()[-2000:]}" if log is not None else ""
            raise AssertionError(f"bap-engine serve exited with {proc.returncode}{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not become ready")


StartServer = Callable[..., Server]


@pytest.fixture
def start_server(settings: Settings, tmp_path: Path) -> Iterator[StartServer]:
    """start_server(**ORCH_overrides) → a running `bap-engine serve` on the test database
    (`ready=False`: do not wait for it to answer, for a server meant to die while starting)."""
    servers: list[Server] = []
    exe = shutil.which("bap-engine") or str(Path(os.sys.executable).with_name("bap-engine"))  # type: ignore[attr-defined]

    def start(*, ready: bool = True, **overrides: object) -> Server:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
        base = {
            "database_url": settings.database_url, "master_key": settings.master_key,
            "admin_key": settings.admin_key, "data_dir": str(settings.data_dir), "port_min": settings.port_min,
            "port_max": settings.port_max, "deployment": settings.deployment, "boot_timeout_s": 15,
            "stop_grace_s": 5, "port": port, "log_level": "INFO",
        }
        for key, value in {**base, **overrides}.items():
            env[f"ORCH_{key.upper()}"] = str(value)
        log = tmp_path / f"serve-{port}.log"
        record_server_log(log, env.get("ORCH_ADMIN_KEY"), env.get("ORCH_MASTER_KEY"))  # scanned at session end
        with log.open("wb") as out:
            proc = subprocess.Popen([exe, "serve"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        server = Server(proc, f"http://127.0.0.1:{port}", log)
        servers.append(server)
        if ready:
            wait_ready(server.url, proc, log=log)
        return server

    yield start
    for server in servers:
        if server.proc.poll() is None:
            server.proc.terminate()
            try:
                server.proc.wait(20)
            except subprocess.TimeoutExpired:
                server.kill9()
