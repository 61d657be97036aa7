"""GET /status's health verdict: ok / degraded / critical at 10 % failed (and at least one)."""

from __future__ import annotations

import pytest

from bap_engine.fleet import health_of


@pytest.mark.parametrize(
    ("total", "failed", "health"),
    [(0, 0, "ok"), (1, 0, "ok"), (1000, 0, "ok"), (1, 1, "critical"), (2, 1, "critical"), (10, 1, "critical"),
     (11, 1, "degraded"), (19, 1, "degraded"), (20, 2, "critical"), (21, 2, "degraded"), (100, 9, "degraded"),
     (100, 10, "critical"), (1000, 99, "degraded"), (1000, 100, "critical"), (5, 5, "critical")],
)
def test_thresholds(total: int, failed: int, health: str) -> None:
    assert health_of(total, failed) == health
