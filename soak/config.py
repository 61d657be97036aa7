"""The soak's settings: every SOAK_* variable, its default, and the bounds that keep a run
under ten minutes of wall time whatever is asked."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SoakConfig", "ROOT", "BAP_ENGINE", "HOST", "MAX_WALL_S", "PRODUCTS"]

ROOT = Path(__file__).resolve().parent.parent
BAP_ENGINE = str(ROOT / ".venv" / "bin" / "bap-engine")
HOST = "127.0.0.1"
MAX_WALL_S = 570.0  # the whole run, setup and cleanup included (make adds a 600 s backstop)
_MAX_CHURN_S = 380.0  # what is left of MAX_WALL_S after setup, in-flight ops, the quiet period, cleanup

# slug -> (policy, users in its pool). Small pools keep the fleet small (≤ 22 engines).
PRODUCTS: dict[str, tuple[dict[str, object], int]] = {
    "soak-quota": ({"max_engines": 4}, 8),
    "soak-rate": ({"rate_limit_rpm": 120}, 6),
    "soak-plain": ({}, 8),
}


def _num(name: str, default: float, low: float, high: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise SystemExit(f"soak: {name}={raw!r} is not a number") from None
    return min(max(value, low), high)


@dataclass(frozen=True)
class SoakConfig:
    churn_s: float  # SOAK_SECONDS: how long the clients churn
    clients: int  # SOAK_CLIENTS: concurrent client tasks
    seed: int  # SOAK_SEED: the random choices (ops, users, kills) are reproducible from it
    kill_every_s: float  # SOAK_KILL_EVERY_S: mean time between engine SIGKILLs
    check_every_s: float  # SOAK_CHECK_EVERY_S: invariant checks period
    persist_s: float  # SOAK_PERSIST_S: a mismatch is a violation once it lasted this long
    quiet_s: float  # SOAK_QUIET_S: at the end, longest wait for the workers to converge
    pg_down_s: float  # SOAK_PG_DOWN_S: how long Postgres stays down in the middle
    report_every_s: float  # SOAK_REPORT_EVERY_S: progress lines
    port_min: int  # SOAK_PORT_MIN: engine ports (SOAK_PORT_MIN .. +59)
    keep: bool  # SOAK_KEEP=1: keep the temporary directory (logs) instead of removing it
    clamped: bool  # SOAK_SECONDS was above what fits in the wall-time bound

    @property
    def port_max(self) -> int:
        return self.port_min + 59

    @staticmethod
    def from_env() -> SoakConfig:
        asked = _num("SOAK_SECONDS", 300, 20, 10_000)
        seed_raw = os.environ.get("SOAK_SEED", "").strip()
        return SoakConfig(
            churn_s=min(asked, _MAX_CHURN_S),
            clients=int(_num("SOAK_CLIENTS", 8, 1, 32)),
            seed=int(seed_raw) if seed_raw.isdigit() else random.randrange(1_000_000),
            kill_every_s=_num("SOAK_KILL_EVERY_S", 12, 2, 600),
            check_every_s=_num("SOAK_CHECK_EVERY_S", 5, 1, 30),
            persist_s=_num("SOAK_PERSIST_S", 10, 2, 60),
            quiet_s=_num("SOAK_QUIET_S", 40, 5, 60),
            pg_down_s=_num("SOAK_PG_DOWN_S", 5, 1, 20),
            report_every_s=_num("SOAK_REPORT_EVERY_S", 30, 5, 300),
            port_min=int(_num("SOAK_PORT_MIN", 19000, 1024, 65000)),
            keep=os.environ.get("SOAK_KEEP", "") == "1",
            clamped=asked > _MAX_CHURN_S,
        )
