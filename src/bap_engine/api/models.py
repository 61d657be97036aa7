"""Request and response models of the HTTP API (strict: "5" is not an int, unknown fields are 400).

Patterns are written so that JSON Schema (ECMA-262), pydantic (Rust regex) and Python's `re` read
them alike: no `\\s` (each dialect has its own whitespace set), character ranges spelled out."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.config import JsonDict

from bap_engine.policy import Policy

__all__ = [
    "USER_ID_PATTERN", "SLUG_PATTERN", "VERSION_PATTERN", "ProvisionBody", "AdmitBody", "RegisterBody", "PolicyBody",
    "EngineSettingsBody", "UpgradeBody",
    "EngineOut", "EngineListItem", "AdmitOut", "ErrorOut", "iso",
]

USER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$"
SLUG_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
# no control character (NUL cannot be stored in Postgres text) nor whitespace: C0, space, DEL, and
# Unicode's White_Space characters, listed
VERSION_PATTERN = r"^[^\x00-\x20\x7f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+$"


def _whole_numbers(policy: dict[str, object]) -> dict[str, object]:
    """JSON does not tell 5 from 5.0, nor does the documented schema's `integer`: 5.0 is 5 (1.5 stays
    a float, refused by the policy's strict integers)."""
    return {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in policy.items()}


# The policy as documented: the domain model's own schema; its validation stays in policy.parse_policy.
PolicyDoc = Annotated[dict[str, object], AfterValidator(_whole_numbers),
                      WithJsonSchema(Policy.model_json_schema(mode="validation"))]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _example(doc: JsonDict) -> ConfigDict:
    """The body the OpenAPI schema shows (and schemathesis' examples phase sends); merged by pydantic
    with the parent's config, so the model stays strict."""
    return ConfigDict(json_schema_extra={"examples": [doc]})


class ProvisionBody(_Strict):
    model_config = _example({"user_id": "alice"})

    user_id: str = Field(pattern=USER_ID_PATTERN)
    engine_version: str | None = Field(default=None, min_length=1, max_length=200, pattern=VERSION_PATTERN)


class AdmitBody(_Strict):
    model_config = _example({"auto_provision": True, "auto_wake": True})

    auto_provision: bool = False
    auto_wake: bool = False


class RegisterBody(_Strict):
    model_config = _example({"slug": "demo", "display_name": "Demo", "policy": {"max_engines": 100}})

    slug: str = Field(pattern=SLUG_PATTERN)
    display_name: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00]+$")  # NUL: not storable
    policy: PolicyDoc = Field(default_factory=dict)


class PolicyBody(_Strict):
    model_config = _example({"policy": {"max_engines": 100, "rate_limit_rpm": 600}})

    policy: PolicyDoc


class EngineSettingsBody(_Strict):
    """PATCH /engines/{user_id}: the engine's settings (no state change)."""

    model_config = _example({"idle_sleep": "never"})

    idle_sleep: Literal["auto", "never"] = Field(
        description='"auto": put to sleep after ORCH_IDLE_SLEEP_AFTER_S without an admit (and not busy); '
                    '"never": kept awake (a sleeping engine stays asleep until admit wakes it)')


class UpgradeBody(_Strict):
    """POST /engines/{user_id}/upgrade: the version to run (one the backend knows)."""

    model_config = _example({"engine_version": "v2"})

    engine_version: str = Field(min_length=1, max_length=200, pattern=VERSION_PATTERN)


class EngineOut(BaseModel):
    engine_id: str
    user_id: str
    status: str
    url: str | None
    api_key: str | None
    engine_version: str
    created_at: str
    last_health_at: str | None
    idle_sleep: str = Field(description='"auto" (slept when idle) or "never"')


class EngineListItem(BaseModel):
    engine_id: str
    user_id: str
    status: str
    url: str | None
    engine_version: str
    created_at: str
    last_health_at: str | None
    idle_sleep: str = Field(description='"auto" (slept when idle) or "never"')


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
