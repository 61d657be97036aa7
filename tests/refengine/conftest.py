"""Fixtures for the reference-engine tests: an engine factory that cleans up every process it started."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.refengine.support import Engine, sha256_hex

SpawnEngine = Callable[..., Awaitable[Engine]]


@pytest.fixture
def key() -> str:
    return f"key-{uuid.uuid4().hex}"


@pytest.fixture
async def spawn(tmp_path: Path, key: str) -> AsyncIterator[SpawnEngine]:
    """``await spawn(**env)`` starts a healthy engine; by default keyed with ENGINE_KEY_HASH=sha256(key).

    Pass ``data_dir`` to reuse a previous engine's data (a restart); an env value of None removes it.
    """
    started: list[Engine] = []

    async def _spawn(data_dir: Path | None = None, **env: str | None) -> Engine:
        merged: dict[str, str | None] = {"ENGINE_KEY_HASH": sha256_hex(key), **env}
        env_set = {k: v for k, v in merged.items() if v is not None}
        engine = Engine(data_dir or tmp_path / "data", env_set, log_dir=tmp_path)
        started.append(engine)
        return await engine.start()

    yield _spawn
    for engine in started:
        engine.kill()
