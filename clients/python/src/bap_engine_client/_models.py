"""Typed results of the client: frozen dataclasses parsed from the API's JSON.

Keys (`api_key`, `platform_api_key`) are excluded from `repr`, so printing a result never shows one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from bap_engine_client._errors import BapClientError, NotAdmitted

__all__ = [
    "Engine", "Admission", "EngineAction", "EnginePage", "FleetStatus", "FleetMetrics", "BootBucket",
    "RegisteredProduct", "Product", "ProductDeletion", "PlatformKey", "AuditEvent", "AuditPage", "Event", "Usage",
    "UserUsage", "UsageTotals", "Webhook", "WebhookSecret", "Json",
]

Json = dict[str, object]


def _obj(doc: object) -> Json:
    if not isinstance(doc, dict):
        raise BapClientError("unexpected response: not a JSON object", code="BAD_RESPONSE")
    return doc


def _s(doc: Json, key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str):
        raise BapClientError(f"unexpected response: {key} is not a string", code="BAD_RESPONSE")
    return value


def _os(doc: Json, key: str) -> str | None:
    value = doc.get(key)
    return value if isinstance(value, str) else None


def _i(doc: Json, key: str) -> int:
    value = doc.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BapClientError(f"unexpected response: {key} is not an integer", code="BAD_RESPONSE")
    return value


def _oi(doc: Json, key: str) -> int | None:
    value = doc.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _ts(doc: Json, key: str) -> datetime | None:
    value = _os(doc, key)
    return datetime.fromisoformat(value) if value else None


def _meta(doc: Json) -> Mapping[str, object]:
    meta = doc.get("metadata")
    return dict(meta) if isinstance(meta, dict) else {}


def _counts(value: object) -> Mapping[str, int]:
    return {str(k): int(v) for k, v in value.items() if isinstance(v, int)} if isinstance(value, dict) else {}


@dataclass(frozen=True, slots=True)
class Engine:
    """A user's engine. `api_key` is set only by provision, get, admit and rotate_key; `idle_sleep`
    ("auto" or "never", see `set_idle_sleep`) by get, set_idle_sleep and the listings."""

    engine_id: str
    user_id: str
    status: str
    url: str | None
    api_key: str | None = field(default=None, repr=False)
    engine_version: str | None = None
    created_at: datetime | None = None
    last_health_at: datetime | None = None
    idle_sleep: str | None = None

    @classmethod
    def parse(cls, raw: object) -> Engine:
        doc = _obj(raw)
        return cls(engine_id=_s(doc, "engine_id"), user_id=_s(doc, "user_id"), status=_s(doc, "status"),
                   url=_os(doc, "url"), api_key=_os(doc, "api_key"), engine_version=_os(doc, "engine_version"),
                   created_at=_ts(doc, "created_at"), last_health_at=_ts(doc, "last_health_at"),
                   idle_sleep=_os(doc, "idle_sleep"))


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer of admit: the engine (URL and key) when admitted, else the reason."""

    admitted: bool
    engine: Engine | None = None
    reason: str | None = None

    @property
    def url(self) -> str | None:
        return self.engine.url if self.engine else None

    @property
    def api_key(self) -> str | None:
        return self.engine.api_key if self.engine else None

    def require(self) -> Engine:
        """The admitted engine. Raises NotAdmitted with the reason."""
        if not self.admitted or self.engine is None or not self.engine.url or not self.engine.api_key:
            raise NotAdmitted(self.reason or "unknown")
        return self.engine

    @classmethod
    def parse(cls, raw: object) -> Admission:
        doc = _obj(raw)
        engine = doc.get("engine")
        return cls(admitted=doc.get("admitted") is True, engine=Engine.parse(engine) if engine else None,
                   reason=_os(doc, "reason"))


@dataclass(frozen=True, slots=True)
class EngineAction:
    """The answer of start, stop and destroy."""

    engine_id: str
    status: str
    url: str | None = None

    @classmethod
    def parse(cls, raw: object) -> EngineAction:
        doc = _obj(raw)
        return cls(engine_id=_s(doc, "engine_id"), status=_s(doc, "status"), url=_os(doc, "url"))


@dataclass(frozen=True, slots=True)
class EnginePage:
    """One page of a fleet listing (never with keys) and the total matching."""

    engines: tuple[Engine, ...]
    total: int

    @classmethod
    def parse(cls, raw: object) -> EnginePage:
        doc = _obj(raw)
        items = doc.get("engines")
        engines = tuple(Engine.parse(e) for e in items) if isinstance(items, list) else ()
        return cls(engines=engines, total=_i(doc, "total"))


@dataclass(frozen=True, slots=True)
class FleetStatus:
    """The product's engines by state; `warm`: booted engines of its warm pool not yet given to a user
    (policy `warm_pool`; 0 from a server without one)."""

    total: int
    by_status: Mapping[str, int]
    health: str
    unhealthy_count: int
    warm: int = 0

    @classmethod
    def parse(cls, raw: object) -> FleetStatus:
        doc = _obj(raw)
        return cls(total=_i(doc, "total"), by_status=_counts(doc.get("by_status")), health=_s(doc, "health"),
                   unhealthy_count=_i(doc, "unhealthy_count"), warm=_oi(doc, "warm") or 0)


@dataclass(frozen=True, slots=True)
class BootBucket:
    """Provisions whose boot took at most `le_ms` (None: the rest), not cumulative."""

    le_ms: int | None
    count: int


@dataclass(frozen=True, slots=True)
class FleetMetrics:
    """Rolling-hour figures; `boot_buckets` only from the admin per-product metrics."""

    provisions_1h: int
    crashes_1h: int
    restarts_1h: int
    avg_boot_ms: float | None
    total_provisions: int
    total_destroys: int
    boot_buckets: tuple[BootBucket, ...] = ()

    @classmethod
    def parse(cls, raw: object) -> FleetMetrics:
        doc = _obj(raw)
        avg = doc.get("avg_boot_ms")
        buckets: list[BootBucket] = []
        boot = doc.get("boot_ms")
        if isinstance(boot, dict) and isinstance(boot.get("buckets"), list):
            for b in boot["buckets"]:
                if isinstance(b, dict):
                    buckets.append(BootBucket(le_ms=_oi(b, "le"), count=_i(b, "count")))
        return cls(provisions_1h=_i(doc, "provisions_1h"), crashes_1h=_i(doc, "crashes_1h"),
                   restarts_1h=_i(doc, "restarts_1h"),
                   avg_boot_ms=float(avg) if isinstance(avg, int | float) else None,
                   total_provisions=_i(doc, "total_provisions"), total_destroys=_i(doc, "total_destroys"),
                   boot_buckets=tuple(buckets))


@dataclass(frozen=True, slots=True)
class RegisteredProduct:
    """A new product; its platform key is shown once."""

    product_id: str
    slug: str
    platform_api_key: str = field(repr=False)

    @classmethod
    def parse(cls, raw: object) -> RegisteredProduct:
        doc = _obj(raw)
        return cls(_s(doc, "product_id"), _s(doc, "slug"), _s(doc, "platform_api_key"))


@dataclass(frozen=True, slots=True)
class Product:
    """A product. From the admin listing (`products`): its engines counted by state (`by_status`,
    `total`), `engines` None. From `get_product`: `engines`, the count of its engines (warm pool
    included), and `total` the same number (`by_status` is empty there)."""

    product_id: str
    slug: str
    display_name: str
    policy: Mapping[str, object]
    created_at: datetime | None
    by_status: Mapping[str, int]
    total: int
    engines: int | None = None

    @classmethod
    def parse(cls, raw: object) -> Product:
        doc = _obj(raw)
        policy = doc.get("policy")
        engines = _oi(doc, "engines")
        total = _oi(doc, "total")
        return cls(product_id=_s(doc, "product_id"), slug=_s(doc, "slug"), display_name=_s(doc, "display_name"),
                   policy=dict(policy) if isinstance(policy, dict) else {}, created_at=_ts(doc, "created_at"),
                   by_status=_counts(doc.get("by_status")), total=total if total is not None else engines or 0,
                   engines=engines)


@dataclass(frozen=True, slots=True)
class ProductDeletion:
    """The answer of delete_product: the product and every engine of it are gone (`status` "deleted")."""

    product_id: str
    status: str
    engines_destroyed: int

    @classmethod
    def parse(cls, raw: object) -> ProductDeletion:
        doc = _obj(raw)
        return cls(product_id=_s(doc, "product_id"), status=_s(doc, "status"),
                   engines_destroyed=_i(doc, "engines_destroyed"))


@dataclass(frozen=True, slots=True)
class PlatformKey:
    """The answer of rotate_platform_key: the product and its new platform key, shown once
    (`product_id, key = ...` unpacks it; the key stays out of `repr`)."""

    product_id: str
    platform_api_key: str = field(repr=False)

    def __iter__(self) -> Iterator[str]:
        return iter((self.product_id, self.platform_api_key))

    @classmethod
    def parse(cls, raw: object) -> PlatformKey:
        doc = _obj(raw)
        return cls(_s(doc, "product_id"), _s(doc, "platform_api_key"))


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """An audit row. `product_id` is set in the admin view (`audit`) only; a product's own rows
    (`iter_audit`, `audit_page`) are all its own."""

    id: int
    timestamp: datetime | None
    product_id: str | None
    user_id: str | None
    engine_id: str | None
    action: str
    actor: str
    metadata: Mapping[str, object]
    duration_ms: int | None

    @classmethod
    def parse(cls, raw: object) -> AuditEvent:
        doc = _obj(raw)
        return cls(id=_i(doc, "id"), timestamp=_ts(doc, "timestamp"), product_id=_os(doc, "product_id"),
                   user_id=_os(doc, "user_id"), engine_id=_os(doc, "engine_id"), action=_s(doc, "action"),
                   actor=_s(doc, "actor"), metadata=_meta(doc), duration_ms=_oi(doc, "duration_ms"))


@dataclass(frozen=True, slots=True)
class AuditPage:
    """One page of a product's audit rows, newest first; `next_cursor` continues it (None: the last page)."""

    events: tuple[AuditEvent, ...]
    next_cursor: str | None

    @classmethod
    def parse(cls, raw: object) -> AuditPage:
        doc = _obj(raw)
        items = doc.get("events")
        events = tuple(AuditEvent.parse(e) for e in items) if isinstance(items, list) else ()
        return cls(events=events, next_cursor=_os(doc, "next_cursor"))


@dataclass(frozen=True, slots=True)
class Event:
    """A lifecycle event of `events()`: one audit row of the product (not `health_check` nor
    `admit_denied`); `id` is the audit id, increasing, what a stream resumes after."""

    id: int
    timestamp: datetime | None
    action: str
    user_id: str | None
    engine_id: str | None
    actor: str
    metadata: Mapping[str, object]

    @classmethod
    def parse(cls, raw: object) -> Event:
        doc = _obj(raw)
        return cls(id=_i(doc, "id"), timestamp=_ts(doc, "timestamp"), action=_s(doc, "action"),
                   user_id=_os(doc, "user_id"), engine_id=_os(doc, "engine_id"), actor=_s(doc, "actor"),
                   metadata=_meta(doc))


@dataclass(frozen=True, slots=True)
class UsageTotals:
    """Whole seconds spent running, sleeping and stopped in the window, and the counts of provisions
    (pool claims included), wakes and restarts."""

    running_s: int
    sleeping_s: int
    stopped_s: int
    provisions: int
    wakes: int
    restarts: int

    @classmethod
    def parse(cls, raw: object) -> UsageTotals:
        doc = _obj(raw)
        return cls(running_s=_i(doc, "running_s"), sleeping_s=_i(doc, "sleeping_s"), stopped_s=_i(doc, "stopped_s"),
                   provisions=_i(doc, "provisions"), wakes=_i(doc, "wakes"), restarts=_i(doc, "restarts"))


@dataclass(frozen=True, slots=True)
class UserUsage:
    """One user's figures in the window (as `UsageTotals`)."""

    user_id: str
    running_s: int
    sleeping_s: int
    stopped_s: int
    provisions: int
    wakes: int
    restarts: int

    @classmethod
    def parse(cls, raw: object) -> UserUsage:
        doc = _obj(raw)
        t = UsageTotals.parse(doc)
        return cls(user_id=_s(doc, "user_id"), running_s=t.running_s, sleeping_s=t.sleeping_s,
                   stopped_s=t.stopped_s, provisions=t.provisions, wakes=t.wakes, restarts=t.restarts)


@dataclass(frozen=True, slots=True)
class Usage:
    """The product's usage in [since, until): per user, and the totals (the sums of the users)."""

    since: datetime | None
    until: datetime | None
    users: tuple[UserUsage, ...]
    totals: UsageTotals

    @classmethod
    def parse(cls, raw: object) -> Usage:
        doc = _obj(raw)
        items = doc.get("users")
        users = tuple(UserUsage.parse(u) for u in items) if isinstance(items, list) else ()
        return cls(since=_ts(doc, "since"), until=_ts(doc, "until"), users=users,
                   totals=UsageTotals.parse(doc.get("totals")))


@dataclass(frozen=True, slots=True)
class Webhook:
    """A product's webhook and its delivery state (never its secret): `pending` events not yet
    acknowledged (counted up to 10000), the HTTP status and time of the last delivery attempt."""

    url: str
    pending: int
    last_status: int | None
    last_delivery_at: datetime | None

    @classmethod
    def parse(cls, raw: object) -> Webhook:
        doc = _obj(raw)
        return cls(url=_s(doc, "url"), pending=_i(doc, "pending"), last_status=_oi(doc, "last_status"),
                   last_delivery_at=_ts(doc, "last_delivery_at"))


@dataclass(frozen=True, slots=True)
class WebhookSecret:
    """The answer of set_webhook: the URL and its signing secret, shown once (`url, secret = ...`
    unpacks it; the secret stays out of `repr`)."""

    url: str
    secret: str = field(repr=False)

    def __iter__(self) -> Iterator[str]:
        return iter((self.url, self.secret))

    @classmethod
    def parse(cls, raw: object) -> WebhookSecret:
        doc = _obj(raw)
        return cls(_s(doc, "url"), _s(doc, "secret"))
