"""Engine settings, read once from the environment at start.

Owns parsing and validating the environment variables of the Engine contract. It must never
log or echo a key: error messages name the variable, never its value.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from typing import NamedTuple, TypeGuard

__all__ = ["DEFAULT_VERSION", "ConfigError", "EngineConfig", "is_key_hash", "load_config"]

DEFAULT_VERSION = "0.1.0"
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


class ConfigError(Exception):
    """Raised when an environment variable is missing or malformed."""


class EngineConfig(NamedTuple):
    """Everything the engine needs to start.

    Values in this package are NamedTuples, not frozen dataclasses: each dataclass is built with
    ``exec`` at import and costs about 2 ms of start time, a NamedTuple about a tenth of that.
    """

    host: str
    port: int
    key_hash: str | None  # lowercase sha256 hex of the engine key, from the environment
    db_path: str
    max_overlap_seconds: int
    version: str
    delta_delay_seconds: float  # pause between text deltas; 0 except in tests of in-flight work
    shutdown_grace_seconds: float

    @property
    def data_dir(self) -> str:
        """The directory holding the database and the rotated-key file."""
        return os.path.dirname(os.path.abspath(self.db_path))


def is_key_hash(value: object) -> TypeGuard[str]:
    """True when ``value`` is a string of exactly 64 hex digits."""
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}")
    return value


def _key_hash(env: Mapping[str, str]) -> str | None:
    hashed = env.get("ENGINE_KEY_HASH", "").strip()
    if hashed:
        if not is_key_hash(hashed):
            raise ConfigError("ENGINE_KEY_HASH must be 64 hex characters (sha256 of the engine key)")
        return hashed.lower()
    plain = env.get("ENGINE_API_KEY", "")
    if plain:
        return hashlib.sha256(plain.encode()).hexdigest()
    return None


def load_config(env: Mapping[str, str]) -> EngineConfig:
    """Build the settings from ``env``; raises ConfigError on a bad value."""
    delay_ms = _int(env, "REFENGINE_DELTA_DELAY_MS", 0, 0, 60_000)
    return EngineConfig(
        host=env.get("HOST", "").strip() or "0.0.0.0",
        port=_int(env, "PORT", 8000, 0, 65535),
        key_hash=_key_hash(env),
        db_path=env.get("SQLITE_DB_PATH", "").strip() or "/data/brain.sqlite",
        max_overlap_seconds=_int(env, "BAP_KEY_ROTATION_MAX_OVERLAP_SECONDS", 300, 0, 10**9),
        version=env.get("ENGINE_VERSION", "").strip() or DEFAULT_VERSION,
        delta_delay_seconds=delay_ms / 1000,
        shutdown_grace_seconds=_int(env, "REFENGINE_SHUTDOWN_GRACE_S", 5, 0, 3600),
    )
