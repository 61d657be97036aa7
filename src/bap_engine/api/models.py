"""Request and response models of the HTTP API (strict: "5" is not an int, unknown fields are 400)."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "USER_ID_PATTERN", "SLUG_PATTERN", "ProvisionBody", "AdmitBody", "RegisterBody", "PolicyBody",
    "EngineOut", "EngineListItem", "AdmitOut", "ErrorOut", "iso",
]

USER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$"
SLUG_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ProvisionBody(_Strict):
    user_id: str = Field(pattern=USER_ID_PATTERN)
    # no whitespace nor control characters (NUL cannot be stored in Postgres text)
    engine_version: str | None = Field(default=None, min_length=1, max_length=200,
                                       pattern=r"^[^\s\x00-\x1f\x7f]+$")


class AdmitBody(_Strict):
    auto_provision: bool = False
    auto_wake: bool = False


class RegisterBody(_Strict):
    slug: str = Field(pattern=SLUG_PATTERN)
    display_name: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00]+$")  # NUL: not storable
    policy: dict[str, object] = Field(default_factory=dict)


class PolicyBody(_Strict):
    policy: dict[str, object]


class EngineOut(BaseModel):
    engine_id: str
    user_id: str
    status: str
    url: str | None
    api_key: str | None
    engine_version: str
    created_at: str
    last_health_at: str | None


class EngineListItem(BaseModel):
    engine_id: str
    user_id: str
    status: str
    url: str | None
    engine_version: str
    created_at: str
    last_health_at: str | None


class AdmitOut(BaseModel):
    admitted: bool
    engine: EngineOut | None
    reason: str | None = None


class _ErrorBody(BaseModel):
    code: str
    message: str


class ErrorOut(BaseModel):
    error: _ErrorBody


def iso(ts: datetime | None) -> str | None:
    """ISO-8601 UTC with a Z suffix."""
    if ts is None:
        return None
    if ts.tzinfo is not None:  # naive values are already UTC (asyncpg returns aware UTC)
        ts = ts.astimezone(UTC).replace(tzinfo=None)
    return ts.isoformat(timespec="milliseconds") + "Z"
