"""The app's route table as tests read it: every (method, path template) it routes, with the
security schemes its OpenAPI operation declares. Tests built on it cover a new route by themselves."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts

__all__ = ["RouteInfo", "route_table"]


@dataclass(frozen=True)
class RouteInfo:
    method: str
    path: str
    schemes: frozenset[str]  # security schemes the OpenAPI document declares for it

    def url(self, product_id: str, user_id: str) -> str:
        values = {"product_id": product_id, "user_id": user_id}
        return self.path.format_map(_Fill(values))

    def credentials(self, platform_key: str, admin_key: str) -> dict[str, str]:
        """The headers that authenticate this route (none for a public one)."""
        if "AdminBearer" in self.schemes:
            return {"Authorization": f"Bearer {admin_key}"}
        if "AdminKey" in self.schemes:
            return {"X-Admin-Key": admin_key}
        return {"X-Platform-Key": platform_key} if "PlatformKey" in self.schemes else {}


class _Fill(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return str(uuid.uuid4())


def route_table(app: FastAPI) -> list[RouteInfo]:
    """Every (method, path) the app routes, with the schemes its OpenAPI operation declares."""
    paths = app.openapi()["paths"]
    out = []
    for route in iter_route_contexts(app.routes):
        for method in sorted((route.methods or set()) - {"HEAD"}):
            op = paths.get(route.path, {}).get(method.lower(), {}) if isinstance(route.original_route, APIRoute) else {}
            schemes = frozenset(name for requirement in op.get("security", []) for name in requirement)
            out.append(RouteInfo(method, str(route.path), schemes))
    assert len(out) >= 25, out  # the table was read (a change in FastAPI's route wrapping would empty it)
    return out
