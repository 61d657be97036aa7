"""Backend contract fixtures: one `backend` fixture parametrized over every runtime.

Each runtime has a support module `tests/backends/support_<name>.py` exposing

    @asynccontextmanager
    async def make_backend(workdir: Path, deployment: str) -> AsyncIterator[EngineBackend]

which yields a ready backend or calls `pytest.skip(...)` (or `pytest.fail` when
BAP_REQUIRE_BACKENDS / BAP_REQUIRE_<NAME>=1 asks for it) when the runtime is absent.
It removes everything labelled with `deployment` on exit unless BAP_KEEP_TEST_RESOURCES=1.
"""

from __future__ import annotations

import importlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

BACKENDS = ["subprocess", "docker", "kubernetes"]


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[object]:
    support = importlib.import_module(f"tests.backends.support_{request.param}")
    deployment = f"test-{uuid.uuid4().hex[:8]}"
    async with support.make_backend(tmp_path, deployment) as b:
        yield b
