"""Dependencies: the services built by the app, auth, and the path parameters, as `Annotated` aliases.

Auth goes through FastAPI's security classes (`APIKeyHeader`, `HTTPBearer`), so every route that
needs a key says which one in the OpenAPI document (securitySchemes `PlatformKey`, `AdminKey`,
`AdminBearer`); the key itself is still checked by `Fleet` (hash lookup, constant-time compare).
Path parameters carry their pattern, so FastAPI both documents and enforces it (400 through the
envelope). All dependencies are `async def`: FastAPI runs a plain `def` dependency in a thread pool,
which on the hot path cost more than the database round trip."""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

from fastapi import Depends, Path, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from bap_engine.api.models import USER_ID_PATTERN
from bap_engine.discovery import Discovery
from bap_engine.errors import ProductNotFound, ServiceUnavailable, ValidationFailed
from bap_engine.events import EventHub
from bap_engine.fleet import Fleet, ProductRow
from bap_engine.lifecycle import Lifecycle
from bap_engine.supervisor import Supervisor
from bap_engine.webhooks import Webhooks

__all__ = [
    "Services", "LeaderView", "LifecycleDep", "DiscoveryDep", "FleetDep", "ProductDep", "AdminDep", "UserIdDep",
    "ServicesDep", "EventsDep", "PlatformKeyDep", "BearerDep", "ProductIdDep", "check_user_id", "canonical_uuid",
    "PLATFORM_KEY_HEADER", "ADMIN_KEY_HEADER", "UUID_PATTERN",
]

PLATFORM_KEY_HEADER, ADMIN_KEY_HEADER = "X-Platform-Key", "X-Admin-Key"
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"


class LeaderView(Protocol):
    """What the API reads of the leader election (metrics, dashboard)."""

    @property
    def is_leader(self) -> bool: ...

    @property
    def workers(self) -> Mapping[str, object]: ...


@dataclass
class Services:
    """What the composition root builds for one process (see app.build_services)."""

    lifecycle: Lifecycle
    discovery: Discovery
    fleet: Fleet
    ready: Callable[[], Awaitable[bool]]  # Postgres answers and migrations are current
    supervisor: Supervisor
    dsn: str
    leadership: LeaderView | None = None  # set once this process takes part in the election
    # the features' leader-only workers, built for each term (see workers/leader.py)
    # (typed Any: workers/ sits beside api/ and is not imported here; each builds a workers.base.Worker)
    workers: list[Callable[[], Any]] = field(default_factory=list)
    events: EventHub | None = None  # the lifecycle-event hub (GET /events, webhooks); see events.py
    webhooks: Webhooks | None = None  # the webhook service (set by the composition root)


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_lifecycle(services: ServicesDep) -> Lifecycle:
    return services.lifecycle


async def get_discovery(services: ServicesDep) -> Discovery:
    return services.discovery


async def get_fleet(services: ServicesDep) -> Fleet:
    return services.fleet


async def get_events(services: ServicesDep) -> EventHub:
    if services.events is None:
        raise ServiceUnavailable("the event stream is not enabled in this app")
    return services.events


LifecycleDep = Annotated[Lifecycle, Depends(get_lifecycle)]
EventsDep = Annotated[EventHub, Depends(get_events)]
DiscoveryDep = Annotated[Discovery, Depends(get_discovery)]
FleetDep = Annotated[Fleet, Depends(get_fleet)]

_USER_ID = re.compile(USER_ID_PATTERN)
_UUID = re.compile(UUID_PATTERN)


def check_user_id(user_id: str) -> str:
    """Raises ValidationFailed unless user_id matches the contract's pattern (for the admit fast path
    and bodies; path parameters are checked by FastAPI through `UserIdDep`)."""
    if not _USER_ID.fullmatch(user_id):
        raise ValidationFailed("user_id must match ^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$")
    return user_id


def canonical_uuid(value: str) -> str | None:
    """The lower-case hyphenated form of a UUID written that way, else None. `uuid.UUID` alone also
    takes braces, `urn:uuid:` and bare hex, which Postgres does not all read."""
    return str(uuid.UUID(value)) if _UUID.fullmatch(value) else None


UserIdDep = Annotated[str, Path(description="the product's user id", pattern=USER_ID_PATTERN, examples=["alice"])]


async def get_product_id(
    product_id: Annotated[str, Path(description="the product's id (a UUID)", json_schema_extra={"format": "uuid"})],
) -> str:
    """A product id that is not a UUID names no product: 404 PRODUCT_NOT_FOUND, as an unknown one."""
    canonical = canonical_uuid(product_id)
    if canonical is None:
        raise ProductNotFound()
    return canonical


ProductIdDep = Annotated[str, Depends(get_product_id)]

_PLATFORM_KEY = APIKeyHeader(name=PLATFORM_KEY_HEADER, scheme_name="PlatformKey", auto_error=False,
                             description="a product's platform key (pk-sept-...), shown once at registration")
_ADMIN_KEY = APIKeyHeader(name=ADMIN_KEY_HEADER, scheme_name="AdminKey", auto_error=False,
                          description="the operator's key (ORCH_ADMIN_KEY)")
_ADMIN_BEARER = HTTPBearer(scheme_name="AdminBearer", auto_error=False,
                           description="the admin key as a bearer token (Prometheus scrapers send this form)")

PlatformKeyDep = Annotated[str | None, Security(_PLATFORM_KEY)]
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Security(_ADMIN_BEARER)]


async def get_product(fleet: FleetDep, platform_key: PlatformKeyDep) -> ProductRow:
    return await fleet.authenticate(platform_key)


ProductDep = Annotated[ProductRow, Depends(get_product)]


async def require_admin(fleet: FleetDep, admin_key: Annotated[str | None, Security(_ADMIN_KEY)]) -> None:
    fleet.check_admin(admin_key)


AdminDep = Annotated[None, Depends(require_admin)]
