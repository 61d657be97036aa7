"""A dedicated Postgres for the fault suite, which tests may stop and start at will.

It runs pgserver's bundled binaries (so it works wherever `make install` ran) directly with
`initdb` / `pg_ctl`, listening on 127.0.0.1:<port> with a fixed data directory, so a stop and a
start keep the same DSN. As root, the server runs as the unprivileged `pgserver` user (the one
pgserver itself creates), with pgserver's own helpers making the binaries and the data directory's
parents reachable for it. The suite's shared Postgres (tests/conftest.py) is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import subprocess
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # pgserver warns about XDG_RUNTIME_DIR at import
    from pgserver._commands import POSTGRES_BIN_PATH
    from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

__all__ = ["FaultPostgres"]

_SYSTEM_USER = "pgserver"  # pgserver's own choice of a non-root user
_CTL_TIMEOUT_S = 60


class FaultPostgres:
    """One restartable server: `init()` once, then `start()` / `stop()` as often as needed."""

    def __init__(self, base: Path, port: int) -> None:
        self.base = base
        self.port = port
        self.pgdata = base / "data"
        self.socket_dir = base / "sock"
        self.log = base / "postgres.log"
        self._user = _SYSTEM_USER if os.geteuid() == 0 else None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(POSTGRES_BIN_PATH / name), *args], user=self._user, cwd=self.base, text=True,
            stdin=subprocess.DEVNULL, capture_output=True, timeout=_CTL_TIMEOUT_S, check=False,
        )

    def _chown(self, *paths: Path) -> None:
        if self._user is None:
            return
        entry = pwd.getpwnam(self._user)
        for path in paths:
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def init(self) -> None:
        """initdb (trust auth, superuser `postgres`), as pgserver does, unless already done."""
        for path in (self.pgdata, self.socket_dir):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._user is not None:
            ensure_user_exists(self._user)
            ensure_prefix_permissions(self.pgdata)
            ensure_prefix_permissions(POSTGRES_BIN_PATH)
            ensure_folder_permissions(POSTGRES_BIN_PATH, 0o055)  # g+rx,o+rx
            ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", 0o044)  # g+r,o+r
            self.base.chmod(0o755)
            self._chown(self.base, self.pgdata, self.socket_dir)
        if (self.pgdata / "PG_VERSION").exists():
            return
        done = self._run("initdb", "-D", str(self.pgdata), "--auth=trust", "--encoding=utf8", "-U", "postgres")
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr[-2000:]}")

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.pgdata), "status").returncode == 0

    def start_sync(self) -> None:
        """pg_ctl start (waits until it accepts connections); a no-op when already running."""
        if self.running():
            return
        options = (f"-h 127.0.0.1 -p {self.port} -k {self.socket_dir} -c max_connections=300 "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        done = self._run("pg_ctl", "-D", str(self.pgdata), "-l", str(self.log), "-w", "-t", "30",
                         "-o", options, "start")
        if done.returncode != 0:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {done.stderr[-1000:]}\n{tail}")

    def stop_sync(self, mode: str = "fast") -> None:
        """pg_ctl -m <mode> stop (fast: every session is disconnected at once)."""
        if not self.running():
            return
        done = self._run("pg_ctl", "-D", str(self.pgdata), "-m", mode, "-w", "-t", "30", "stop")
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl stop failed: {done.stderr[-1000:]}")

    async def start(self) -> None:
        await asyncio.to_thread(self.start_sync)

    async def stop(self, mode: str = "fast") -> None:
        await asyncio.to_thread(self.stop_sync, mode)

    @contextlib.asynccontextmanager
    async def down(self, mode: str = "fast") -> AsyncIterator[None]:
        """Postgres is stopped inside the block and always started again on the way out."""
        await self.stop(mode)
        try:
            yield
        finally:
            await self.start()
