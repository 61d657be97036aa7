"""What lifecycle hands upward: engine views (with or without the plaintext key)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from bap_engine.registry import EngineRow

__all__ = ["EngineView", "view"]


@dataclass(frozen=True, slots=True)
class EngineView:
    engine_id: str
    product_id: str
    user_id: str
    status: str
    url: str | None
    api_key: str | None
    engine_version: str
    created_at: datetime
    last_health_at: datetime | None
    idle_sleep: str = "auto"


def view(row: EngineRow, api_key: str | None = None) -> EngineView:
    return EngineView(
        engine_id=row.id, product_id=row.product_id, user_id=row.user_id, status=str(row.status),
        url=row.url, api_key=api_key, engine_version=row.engine_version, created_at=row.created_at,
        last_health_at=row.last_health_at, idle_sleep=row.idle_sleep,
    )
