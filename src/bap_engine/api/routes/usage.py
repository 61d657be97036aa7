"""GET /usage (X-Platform-Key): the seconds the product's users' engines spent running, sleeping and
stopped inside a window, with their provisions, wakes and restarts (computed by `bap_engine.usage`).

Also the query-string instant both this route and GET /audit read: ISO-8601 with `Z` or an offset
(a time without one is ambiguous and refused: 400), returned in UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from bap_engine import usage
from bap_engine.api.deps import LifecycleDep, ProductDep
from bap_engine.api.models import USER_ID_PATTERN, ErrorOut, iso
from bap_engine.api.responses import JSON
from bap_engine.errors import ValidationFailed

__all__ = ["router", "QueryInstant", "UsageQuery", "DEFAULT_WINDOW", "MAX_WINDOW"]

router = APIRouter(tags=["fleet"])
_ERRORS: dict[int | str, dict[str, object]] = {400: {"model": ErrorOut}, 401: {"model": ErrorOut}}
DEFAULT_WINDOW = timedelta(hours=24)
MAX_WINDOW = timedelta(days=400)
_EARLIEST, _LATEST = datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)


def _instant(value: object) -> datetime:
    if isinstance(value, str):
        try:
            ts = datetime.fromisoformat(value)
        except ValueError:
            ts = None
        if ts is not None and (offset := ts.utcoffset()) is not None:
            try:
                return ts.astimezone(UTC)
            except OverflowError:  # 0001-01-01T00:00+01:00 is before year 1 in UTC, 9999-12-31T23:59-01:00
                return _EARLIEST if offset > timedelta(0) else _LATEST  # after 9999: as far as Python goes
    raise PydanticCustomError("datetime_parsing", "Input should be an ISO-8601 time with Z or an offset, "
                                                  "e.g. 2025-01-31T12:00:00Z")


# an aware UTC datetime from "2025-01-31T12:00:00Z", "...+02:00" (never a bare number, nor a local time)
QueryInstant = Annotated[datetime, BeforeValidator(_instant)]


class UsageQuery(BaseModel):
    """`GET /usage`: the window [since, until) and optionally one user."""

    model_config = ConfigDict(extra="forbid")

    since: QueryInstant | None = Field(default=None, description="window start (inclusive); default until - 24 h")
    until: QueryInstant | None = Field(default=None, description="window end (exclusive); default now")
    user_id: str | None = Field(default=None, pattern=USER_ID_PATTERN, description="only this user")


def _figures(f: usage.Figures) -> dict[str, int]:
    return {"running_s": f.running_s, "sleeping_s": f.sleeping_s, "stopped_s": f.stopped_s,
            "provisions": f.provisions, "wakes": f.wakes, "restarts": f.restarts}


@router.get("/usage", responses=_ERRORS)
async def get_usage(product: ProductDep, lifecycle: LifecycleDep, query: Annotated[UsageQuery, Query()]) -> JSON:
    """Seconds each user's engines spent running, sleeping and stopped in [since, until), from the audit
    log's transitions, and their provisions (provision and pool_claim), wakes and restarts
    (auto_restart_success). Whole seconds: each user's exact sum floored; totals are the sums of the
    users. An interval still open counts until `until`, or now when `until` is later. `since` must be
    before `until`, and the window at most 400 days. Warm-pool engines bill no one until claimed."""
    until = query.until or datetime.now(UTC)
    try:
        since = query.since or until - DEFAULT_WINDOW
    except OverflowError:  # until in the first day of year 1
        raise ValidationFailed("until is too early for the default window; give since") from None
    if since >= until:
        raise ValidationFailed("since must be before until")
    if until - since > MAX_WINDOW:
        raise ValidationFailed("the window may span at most 400 days")
    report = await usage.report(lifecycle.pool, product.id, since, until, query.user_id)
    return JSON({"since": iso(report.since), "until": iso(report.until),
                 "users": [{"user_id": u.user_id, **_figures(u.figures)} for u in report.users],
                 "totals": _figures(report.totals)})
