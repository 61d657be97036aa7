"""What both clients share: one `Call` per endpoint (method, path, body, parser), the retry policy,
and how an engine's 401 for a stale key is recognised. No I/O here."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar
from urllib.parse import quote

import httpx

from bap_engine_client._errors import BapClientError, MissingKey
from bap_engine_client._models import (
    Admission,
    AuditEvent,
    Engine,
    EngineAction,
    EnginePage,
    FleetMetrics,
    FleetStatus,
    Json,
    Product,
    RegisteredProduct,
)

__all__ = [
    "Call", "RetryPolicy", "Keys", "key_rejected", "engine_url", "DEFAULT_URL", "USER_AGENT", "STALE_KEY_CODES",
]

T = TypeVar("T")
Auth = Literal["platform", "admin", "none"]
Params = Mapping[str, str | int]
DEFAULT_URL = "http://127.0.0.1:8000"
USER_AGENT = "bap-engine-client"
STALE_KEY_CODES = frozenset({"INVALID_KEY", "KEY_ROTATION_PENDING"})


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One API request and how to read its 2xx answer."""

    method: str
    path: str
    parse: Callable[[object], T]
    auth: Auth = "platform"
    json: object | None = None
    params: Params | None = None
    retry: bool = True


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded retries with exponential backoff (+10 % jitter) for transient answers.

    Retried: the codes in `retry_codes` (429 RATE_LIMITED, 409 ENGINE_BUSY, 503s and connection
    failures where nothing was sent). A Retry-After header is honoured; one longer than
    `max_retry_after_s` is not waited for (the error is raised). `attempts=1` disables retries.
    """

    attempts: int = 4
    backoff_s: float = 0.25
    backoff_max_s: float = 8.0
    max_retry_after_s: float = 30.0
    retry_codes: frozenset[str] = field(default_factory=lambda: frozenset({
        "RATE_LIMITED", "ENGINE_BUSY", "SERVICE_UNAVAILABLE", "PORT_EXHAUSTION", "CONNECTION_ERROR"}))

    def delay(self, error: BapClientError, attempt: int) -> float | None:
        """Seconds to wait before retry number attempt+1, or None to give up."""
        if attempt + 1 >= self.attempts:
            return None
        if error.code not in self.retry_codes and error.status != 503:
            return None
        if error.retry_after is not None:
            return None if error.retry_after > self.max_retry_after_s else error.retry_after
        return float(min(self.backoff_max_s, self.backoff_s * 2**attempt) * (1 + random.random() * 0.1))


@dataclass(frozen=True, slots=True)
class Keys:
    platform_key: str | None = field(default=None, repr=False)
    admin_key: str | None = field(default=None, repr=False)

    def headers(self, auth: Auth) -> dict[str, str]:
        """Raises MissingKey when the call needs a key the client lacks."""
        if auth == "platform":
            if not self.platform_key:
                raise MissingKey("this call needs a platform key (platform_key=...)")
            return {"X-Platform-Key": self.platform_key}
        if auth == "admin":
            if not self.admin_key:
                raise MissingKey("this call needs the admin key (admin_key=...)")
            return {"X-Admin-Key": self.admin_key}
        return {}


def key_rejected(response: httpx.Response) -> bool:
    """The engine's 401 for a key it no longer (or not yet) accepts."""
    if response.status_code != 401:
        return False
    try:
        doc = response.json()
    except ValueError:
        return False
    code = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(code, dict):
        code = code.get("code")
    return code in STALE_KEY_CODES


def engine_url(base: str, path: str) -> str:
    return base.rstrip("/") + "/" + path.lstrip("/")


def _u(user_id: str) -> str:
    return quote(user_id, safe="")


def _ok(raw: object) -> bool:
    return True


def _policy(raw: object) -> Json:
    policy = raw.get("policy") if isinstance(raw, dict) else None
    return dict(policy) if isinstance(policy, dict) else {}


def _products(raw: object) -> list[Product]:
    items = raw.get("products") if isinstance(raw, dict) else None
    return [Product.parse(p) for p in items] if isinstance(items, list) else []


def _events(raw: object) -> list[AuditEvent]:
    items = raw.get("events") if isinstance(raw, dict) else None
    return [AuditEvent.parse(e) for e in items] if isinstance(items, list) else []


def _page(status: str | None, limit: int, offset: int) -> dict[str, str | int]:
    params: dict[str, str | int] = {"limit": limit, "offset": offset}
    if status:
        params["status"] = status
    return params


# --- product calls (X-Platform-Key) ----------------------------------------------------------------
def admit(user_id: str, auto_provision: bool, auto_wake: bool) -> Call[Admission]:
    return Call("POST", f"/engines/{_u(user_id)}/admit", Admission.parse,
                json={"auto_provision": auto_provision, "auto_wake": auto_wake})


def provision(user_id: str, engine_version: str | None) -> Call[Engine]:
    body: Json = {"user_id": user_id}
    if engine_version:
        body["engine_version"] = engine_version
    return Call("POST", "/engines/provision", Engine.parse, json=body)


def get(user_id: str) -> Call[Engine]:
    return Call("GET", f"/engines/{_u(user_id)}", Engine.parse)


def action(user_id: str, verb: Literal["start", "stop"]) -> Call[EngineAction]:
    return Call("POST", f"/engines/{_u(user_id)}/{verb}", EngineAction.parse)


def destroy(user_id: str) -> Call[EngineAction]:
    return Call("DELETE", f"/engines/{_u(user_id)}", EngineAction.parse)


def rotate_key(user_id: str) -> Call[Engine]:
    return Call("POST", f"/engines/{_u(user_id)}/rotate-key", Engine.parse)


def list_engines(status: str | None, limit: int, offset: int) -> Call[EnginePage]:
    return Call("GET", "/engines", EnginePage.parse, params=_page(status, limit, offset))


def status() -> Call[FleetStatus]:
    return Call("GET", "/status", FleetStatus.parse)


def metrics() -> Call[FleetMetrics]:
    return Call("GET", "/metrics", FleetMetrics.parse)


def health() -> Call[bool]:
    return Call("GET", "/health", _ok, auth="none", retry=False)


# --- admin calls (X-Admin-Key) ---------------------------------------------------------------------
def register_product(slug: str, display_name: str, policy: Mapping[str, object] | None) -> Call[RegisteredProduct]:
    body: Json = {"slug": slug, "display_name": display_name}
    if policy is not None:
        body["policy"] = dict(policy)
    return Call("POST", "/products/register", RegisteredProduct.parse, auth="admin", json=body)


def set_policy(product_id: str, policy: Mapping[str, object]) -> Call[Json]:
    return Call("PUT", f"/products/{_u(product_id)}/policy", _policy, auth="admin", json={"policy": dict(policy)})


def products() -> Call[list[Product]]:
    return Call("GET", "/products", _products, auth="admin")


def product_engines(product_id: str, status: str | None, limit: int, offset: int) -> Call[EnginePage]:
    return Call("GET", f"/products/{_u(product_id)}/engines", EnginePage.parse, auth="admin",
                params=_page(status, limit, offset))


def product_engine(product_id: str, user_id: str) -> Call[Engine]:
    return Call("GET", f"/products/{_u(product_id)}/engines/{_u(user_id)}", Engine.parse, auth="admin")


def product_metrics(product_id: str) -> Call[FleetMetrics]:
    return Call("GET", f"/products/{_u(product_id)}/metrics", FleetMetrics.parse, auth="admin")


def audit(product_id: str | None, limit: int, after_id: int, action: str | None) -> Call[list[AuditEvent]]:
    params: dict[str, str | int] = {"limit": limit}
    if after_id:
        params["after_id"] = after_id
    if action:
        params["action"] = action
    path = f"/products/{_u(product_id)}/audit" if product_id else "/audit"
    return Call("GET", path, _events, auth="admin", params=params)


def admin_action(product_id: str, user_id: str, verb: Literal["start", "stop"]) -> Call[EngineAction]:
    return Call("POST", f"/products/{_u(product_id)}/engines/{_u(user_id)}/{verb}", EngineAction.parse,
                auth="admin")


def admin_destroy(product_id: str, user_id: str) -> Call[EngineAction]:
    return Call("DELETE", f"/products/{_u(product_id)}/engines/{_u(user_id)}", EngineAction.parse, auth="admin")


def admin_rotate_key(product_id: str, user_id: str) -> Call[EngineAction]:
    return Call("POST", f"/products/{_u(product_id)}/engines/{_u(user_id)}/rotate-key", EngineAction.parse,
                auth="admin")
