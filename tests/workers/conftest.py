"""Fixtures for the worker tests: an app built from tuned settings, and engine helpers."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from bap_engine.app import create_app
from bap_engine.config import Settings
from bap_engine.lifecycle import Lifecycle

AppFactory = Callable[..., contextlib.AbstractAsyncContextManager[tuple[FastAPI, httpx.AsyncClient]]]


@pytest.fixture
def make_app(settings: Settings) -> AppFactory:
    """`async with make_app(**overrides) as (app, client)`: an app on tuned settings."""

    @contextlib.asynccontextmanager
    async def factory(**overrides: Any) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
        application = create_app(settings.model_copy(update=overrides))
        async with LifespanManager(application, startup_timeout=60, shutdown_timeout=60):
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
                yield application, c

    return factory


def lifecycle_of(app: FastAPI) -> Lifecycle:
    lc = app.state.services.lifecycle
    assert isinstance(lc, Lifecycle)
    return lc


def engine_pid(settings: Settings, engine_id: str) -> int:
    record = json.loads((settings.data_dir / "engines" / engine_id / ".bap-process.json").read_text())
    return int(record["pid"])


def process_state(pid: int) -> str | None:
    """The one-letter state of /proc/<pid>/stat (R, S, T, Z...), None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    state = process_state(pid)
    return state is not None and state not in ("Z", "X")


def flaky_engine_command(tmp_path: Path) -> tuple[str, Path]:
    """An engine command that serves normally unless `flag` exists, then never gets healthy."""
    flag = tmp_path / "engine-broken"
    script = tmp_path / "engine.sh"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ -e "{flag}" ]; then exec sleep 600; fi\n'
        f'exec "{sys.executable}" -m bap_engine.refengine\n'
    )
    script.chmod(0o755)
    return str(script), flag
