"""What both clients share: one `Call` per endpoint (method, path, body, parser), the retry policy,
how an engine's 401 for a stale key is recognised, and the Server-Sent Events parser of `events()`.
No I/O here."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, Literal, TypeVar
from urllib.parse import quote

import httpx

from bap_engine_client._errors import BapClientError, MissingKey
from bap_engine_client._models import (
    Admission,
    AuditEvent,
    AuditPage,
    Engine,
    EngineAction,
    EnginePage,
    Event,
    FleetMetrics,
    FleetStatus,
    Json,
    PlatformKey,
    Product,
    ProductDeletion,
    RegisteredProduct,
    Usage,
    Webhook,
    WebhookSecret,
)

__all__ = [
    "Call", "RetryPolicy", "Keys", "key_rejected", "engine_url", "DEFAULT_URL", "USER_AGENT", "STALE_KEY_CODES",
    "SseMessage", "SseParser", "Instant", "IdleSleep", "EVENTS_PATH", "parse_event", "fatal", "reconnect_delay",
]

T = TypeVar("T")
Auth = Literal["platform", "admin", "none"]
Params = Mapping[str, str | int]
Instant = datetime | str  # a timezone-aware datetime, or ISO 8601 with Z or an offset (sent as is)
IdleSleep = Literal["auto", "never"]
EVENTS_PATH = "/events"
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


@dataclass(frozen=True, slots=True)
class SseMessage:
    """One dispatched Server-Sent Event: its `id:` (the last one seen in the stream, as EventSource
    keeps it), `event:` (default "message") and its `data:` lines joined by newlines."""

    data: str
    event: str = "message"
    id: str | None = None


class SseParser:
    """An incremental text/event-stream parser (the WHATWG rules): feed it the bytes as they come,
    in chunks of any size; it returns the events completed so far.

    Lines end with CRLF, LF or CR (a CR at the end of a chunk may be the first half of a CRLF); a
    leading BOM is dropped; `:` starts a comment (`comments` counts them: keep-alives); `field: value`
    loses one space after the colon; a line without a colon is a field with an empty value; several
    `data:` lines are joined with newlines; a blank line dispatches the event, unless it has no data;
    `retry:` (digits only) sets `retry_ms`; an `id:` holding NUL is ignored; unknown fields are ignored.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._cr = False  # the previous chunk ended with CR: a LF starting this one belongs to it
        self._started = False
        self._data: list[str] = []
        self._event = ""
        self.last_id: str | None = None
        self.retry_ms: int | None = None
        self.comments = 0

    def feed(self, chunk: bytes) -> list[SseMessage]:
        if not chunk:
            return []
        if self._cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._cr = chunk.endswith(b"\r")
        lines = (self._buffer + chunk).replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        self._buffer = lines.pop()  # the unterminated rest (b"" after a line end)
        out: list[SseMessage] = []
        for raw in lines:
            message = self._line(raw.decode("utf-8", errors="replace"))
            if message is not None:
                out.append(message)
        return out

    def _line(self, line: str) -> SseMessage | None:
        if not self._started:
            self._started = True
            line = line.removeprefix("\ufeff")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            self.comments += 1
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self.last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> SseMessage | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return SseMessage("\n".join(data), event or "message", self.last_id)


def parse_event(message: SseMessage) -> Event:
    """The event an SSE message of GET /events carries in its data (JSON)."""
    try:
        doc = json.loads(message.data)
    except ValueError:
        raise BapClientError("unexpected event: its data is not JSON", code="BAD_RESPONSE") from None
    return Event.parse(doc)


def fatal(error: BapClientError, retry: RetryPolicy) -> bool:
    """An answer a reconnect cannot change: a 4xx other than the retried codes (a bad key, a bad id)."""
    return 400 <= error.status < 500 and error.code not in retry.retry_codes


def reconnect_delay(delay_s: float | None, retry_ms: int | None, failures: int, error: BapClientError | None,
                    retry: RetryPolicy) -> float:
    """Seconds before the next connection of a stream that was connected: `delay_s`, else the server's
    `retry:` hint, else 1 s; doubled per consecutive failed attempt up to `retry.backoff_max_s` (never
    below the base), +10 % jitter; at least the Retry-After of a 429/503."""
    base = delay_s if delay_s is not None else (retry_ms / 1000 if retry_ms is not None else 1.0)
    delay = float(min(max(base, retry.backoff_max_s), base * 2 ** min(failures, 30)) * (1 + random.random() * 0.1))
    if error is not None and error.retry_after is not None:
        delay = max(delay, error.retry_after)
    return delay


def instant(name: str, value: Instant) -> str:
    """A query-string time: a datetime must be timezone-aware (a naive one is ambiguous: ValueError)."""
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            raise ValueError(f"{name}: a timezone-aware datetime is needed (e.g. datetime.now(UTC))")
        return value.isoformat()
    return value


def _params(**values: str | int | Instant | None) -> dict[str, str | int]:
    """The given query parameters (None: left out), times as ISO 8601."""
    return {k: instant(k, v) if isinstance(v, datetime) else v for k, v in values.items() if v is not None}


def _u(user_id: str) -> str:
    return quote(user_id, safe="")


def _ok(raw: object) -> bool:
    return True


def _none(raw: object) -> None:
    return None


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


def set_idle_sleep(user_id: str, idle_sleep: IdleSleep) -> Call[Engine]:
    return Call("PATCH", f"/engines/{_u(user_id)}", Engine.parse, json={"idle_sleep": idle_sleep})


def audit_page(user_id: str | None, engine_id: str | None, action: str | None, since: Instant | None,
               until: Instant | None, limit: int, cursor: str | None) -> Call[AuditPage]:
    params = _params(user_id=user_id, engine_id=engine_id, action=action, since=since, until=until, limit=limit,
                     cursor=cursor)
    return Call("GET", "/audit", AuditPage.parse, params=params)


def usage(since: Instant | None, until: Instant | None, user_id: str | None) -> Call[Usage]:
    return Call("GET", "/usage", Usage.parse, params=_params(since=since, until=until, user_id=user_id))


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


def get_product(product_id: str) -> Call[Product]:
    return Call("GET", f"/products/{_u(product_id)}", Product.parse, auth="admin")


def delete_product(product_id: str) -> Call[ProductDeletion]:
    return Call("DELETE", f"/products/{_u(product_id)}", ProductDeletion.parse, auth="admin")


def rotate_platform_key(product_id: str, overlap_seconds: int) -> Call[PlatformKey]:
    return Call("POST", f"/products/{_u(product_id)}/rotate-platform-key", PlatformKey.parse, auth="admin",
                json={"overlap_seconds": overlap_seconds})


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


def set_webhook(product_id: str, url: str) -> Call[WebhookSecret]:
    return Call("PUT", f"/products/{_u(product_id)}/webhook", WebhookSecret.parse, auth="admin", json={"url": url})


def get_webhook(product_id: str) -> Call[Webhook]:
    return Call("GET", f"/products/{_u(product_id)}/webhook", Webhook.parse, auth="admin")


def delete_webhook(product_id: str) -> Call[None]:
    return Call("DELETE", f"/products/{_u(product_id)}/webhook", _none, auth="admin")


def admin_action(product_id: str, user_id: str, verb: Literal["start", "stop"]) -> Call[EngineAction]:
    return Call("POST", f"/products/{_u(product_id)}/engines/{_u(user_id)}/{verb}", EngineAction.parse,
                auth="admin")


def admin_destroy(product_id: str, user_id: str) -> Call[EngineAction]:
    return Call("DELETE", f"/products/{_u(product_id)}/engines/{_u(user_id)}", EngineAction.parse, auth="admin")


def admin_rotate_key(product_id: str, user_id: str) -> Call[EngineAction]:
    return Call("POST", f"/products/{_u(product_id)}/engines/{_u(user_id)}/rotate-key", EngineAction.parse,
                auth="admin")
