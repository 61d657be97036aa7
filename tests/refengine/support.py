"""Helpers for the reference-engine tests: spawn the real engine process and talk to it.

The engine is a program, never imported (an import-linter contract), so every test runs
``python -m bap_engine.refengine`` on a free 127.0.0.1 port with its own data directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import wait_until

SRC = Path(__file__).resolve().parents[2] / "src"
ENGINE_ENV_NAMES = (
    "PORT",
    "HOST",
    "ENGINE_KEY_HASH",
    "ENGINE_API_KEY",
    "ENGINE_VERSION",
    "SQLITE_DB_PATH",
    "BAP_KEY_ROTATION_MAX_OVERLAP_SECONDS",
    "REFENGINE_DELTA_DELAY_MS",
    "REFENGINE_SHUTDOWN_GRACE_S",
)


def sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])




def parse_sse(text: str) -> list[tuple[str, dict[str, object]]]:
    """Split an event-stream body into (event, data) pairs; every event must have both lines."""
    events: list[tuple[str, dict[str, object]]] = []
    for block in text.split("\n\n"):
        if not block:
            continue
        lines = block.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        events.append((lines[0][len("event: ") :], json.loads(lines[1][len("data: ") :])))
    return events


class Engine:
    """One real engine process."""

    def __init__(self, data_dir: Path, env: dict[str, str], log_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"engine-{self.port}.log"
        self._env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def db_path(self) -> Path:
        return self.data_dir / "brain.sqlite"

    def launch(self) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k not in ENGINE_ENV_NAMES}
        env.update(
            PYTHONPATH=str(SRC),
            HOST="127.0.0.1",
            PORT=str(self.port),
            SQLITE_DB_PATH=str(self.db_path),
        )
        env.update(self._env)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bap_engine.refengine"], env=env, stdout=log, stderr=log
            )
        return self.proc

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    async def is_healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"engine exited with {self.proc.returncode}:\n{self.log()}")
        try:
            async with httpx.AsyncClient(base_url=self.url, timeout=1.0) as c:
                return (await c.get("/health")).status_code == 200
        except httpx.TransportError:
            return False

    async def start(self, timeout: float = 15.0) -> Engine:
        self.launch()
        await wait_until(self.is_healthy, timeout)
        return self

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    async def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 5.0) -> int:
        """Send ``sig`` and wait for the exit; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        await wait_until(self.exited, timeout)
        assert self.proc.returncode is not None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def client(self, key: str | None = None, timeout: float = 10.0) -> httpx.AsyncClient:
        headers = {"X-Engine-Key": key} if key is not None else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)
