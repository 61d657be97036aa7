"""Contract-suite support for the subprocess backend (always available).

Engines run the real reference engine, `python -m bap_engine.refengine`, with this
interpreter; their data lives under the test's `workdir`.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from bap_engine.backends.base import EngineBackend, Placement
from bap_engine.backends.subprocess import SubprocessBackend, SubprocessConfig

__all__ = ["DATA_DIR_NAME", "ENGINE_COMMAND", "kill_behind_back", "make_backend", "make_backend_missing_engine"]

ENGINE_COMMAND = (sys.executable, "-m", "bap_engine.refengine")
DATA_DIR_NAME = "subprocess-backend"  # under the workdir: backends on one workdir share the "runtime"


def _config(workdir: Path, deployment: str, command: tuple[str, ...]) -> SubprocessConfig:
    return SubprocessConfig(data_dir=workdir / DATA_DIR_NAME, command=command, deployment=deployment)


@asynccontextmanager
async def _backend(config: SubprocessConfig) -> AsyncIterator[SubprocessBackend]:
    backend = SubprocessBackend(config)
    try:
        yield backend
    finally:
        if os.environ.get("BAP_KEEP_TEST_RESOURCES") != "1":
            for observed in await backend.list_managed():
                await backend.destroy(observed.engine_id)
        await backend.close()


@asynccontextmanager
async def make_backend(workdir: Path, deployment: str) -> AsyncIterator[EngineBackend]:
    """A SubprocessBackend running the reference engine; destroys its deployment's engines on exit."""
    async with _backend(_config(workdir, deployment, ENGINE_COMMAND)) as backend:
        yield backend


@asynccontextmanager
async def make_backend_missing_engine(workdir: Path, deployment: str) -> AsyncIterator[EngineBackend]:
    """A backend whose engine command does not exist (create must raise ImageNotFound)."""
    command = (str(workdir / "no-such-engine-binary"), "--serve")
    async with _backend(_config(workdir, deployment, command)) as backend:
        yield backend


async def kill_behind_back(backend: EngineBackend, placement: Placement) -> None:
    """Crash the engine without telling the backend: SIGKILL its pid (Placement.ref)."""
    os.kill(int(placement.ref), signal.SIGKILL)
