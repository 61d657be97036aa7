"""Query parameters: one pydantic model per query string, so FastAPI both documents every rule in
OpenAPI (type, bounds, enum, pattern) and enforces it before a value reaches SQL.

Each model forbids unknown parameters (400 VALIDATION_ERROR through the envelope). Integers are
digits only: pydantic's lax mode would also read " 5", "+5", "5.0" and "5_0", and `str.isdigit`
lets "²" through to an `int()` that fails. Bounds keep every value inside what Postgres and asyncpg
take (an offset past int64 was a 500) and what every JSON client reads exactly (2**53 - 1).
"""

from __future__ import annotations

import uuid
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from bap_engine.api.deps import UUID_PATTERN
from bap_engine.states import EngineState

__all__ = ["MAX_QUERY_INT", "QueryInt", "QueryUuid", "PageQuery", "AuditQuery", "AdminAuditQuery", "ACTION_PATTERN"]

MAX_QUERY_INT = 2**53 - 1
ACTION_PATTERN = r"^[a-z][a-z_]{0,63}$"
_MAX_DIGITS = len(str(MAX_QUERY_INT))


def _digits(value: object) -> object:
    if not (isinstance(value, str) and value.isascii() and value.isdigit()):
        raise PydanticCustomError("int_parsing", "Input should be a whole number written in digits")
    # that many digits is past every bound: skip parsing them (int() refuses > 4300), the bound reports it
    return int(value) if len(value) <= _MAX_DIGITS else MAX_QUERY_INT + 1


QueryInt = Annotated[int, BeforeValidator(_digits)]
# a UUID in the hyphenated form (any case), passed on in Postgres' canonical lower-case form
QueryUuid = Annotated[str, Field(pattern=UUID_PATTERN, json_schema_extra={"format": "uuid"}),
                      AfterValidator(lambda value: str(uuid.UUID(value)))]


class _Query(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PageQuery(_Query):
    """`GET /engines` and `GET /products/{product_id}/engines`."""

    status: EngineState | None = Field(default=None, description="only engines in this state")
    limit: QueryInt = Field(default=100, ge=1, le=1000)
    offset: QueryInt = Field(default=0, ge=0, le=MAX_QUERY_INT)


class AuditQuery(_Query):
    """`GET /products/{product_id}/audit`: newest first, or with `after_id` the rows after it."""

    limit: QueryInt = Field(default=50, ge=1, le=1000)
    after_id: QueryInt = Field(default=0, ge=0, le=MAX_QUERY_INT)
    action: str | None = Field(default=None, pattern=ACTION_PATTERN, description="an audit action name")


class AdminAuditQuery(AuditQuery):
    """`GET /audit`: every product's rows, or one product's."""

    product_id: QueryUuid | None = None
