"""Dependencies: the services built by the app, and auth, as `Annotated` aliases.

All are `async def`: FastAPI runs a plain `def` dependency in a thread pool, which on the
admit hot path cost more than the database round trip."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Protocol

from fastapi import Depends, Header, Path, Request

from bap_engine.api.models import USER_ID_PATTERN
from bap_engine.discovery import Discovery
from bap_engine.errors import ValidationFailed
from bap_engine.fleet import Fleet, ProductRow
from bap_engine.lifecycle import Lifecycle
from bap_engine.supervisor import Supervisor

__all__ = [
    "Services", "LeaderView", "LifecycleDep", "DiscoveryDep", "FleetDep", "ProductDep", "AdminDep", "UserIdDep",
    "ServicesDep", "check_user_id",
]


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


LifecycleDep = Annotated[Lifecycle, Depends(get_lifecycle)]
DiscoveryDep = Annotated[Discovery, Depends(get_discovery)]
FleetDep = Annotated[Fleet, Depends(get_fleet)]

_USER_ID = re.compile(USER_ID_PATTERN)


def check_user_id(user_id: str) -> str:
    """Raises ValidationFailed unless user_id matches the contract's pattern."""
    if not _USER_ID.fullmatch(user_id):
        raise ValidationFailed("user_id must match ^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$")
    return user_id


async def get_user_id(user_id: Annotated[str, Path(description="the product's user id")]) -> str:
    return check_user_id(user_id)


UserIdDep = Annotated[str, Depends(get_user_id)]


async def get_product(
    fleet: FleetDep, x_platform_key: Annotated[str | None, Header(include_in_schema=True)] = None
) -> ProductRow:
    return await fleet.authenticate(x_platform_key)


ProductDep = Annotated[ProductRow, Depends(get_product)]


async def require_admin(fleet: FleetDep, x_admin_key: Annotated[str | None, Header()] = None) -> None:
    fleet.check_admin(x_admin_key)


AdminDep = Annotated[None, Depends(require_admin)]
