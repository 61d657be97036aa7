"""Webhooks: each product may register one receiver, which is POSTed the product's lifecycle events.

The service of the admin routes (PUT/GET/DELETE /products/{product_id}/webhook), the data access of
the delivery worker (workers/webhooks.py), and the signature scheme. The API only writes audit rows;
the worker, on the leader, reads them and does the HTTP.

What is sent: every audit row of the product that GET /events shows (every action but `health_check`
and `admit_denied`), in id order, as the JSON body `{"id", "timestamp", "action", "user_id",
"engine_id", "actor", "metadata"}` signed with the product's secret:

    X-Bap-Timestamp: <unix seconds>
    X-Bap-Signature: v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>

The secret (`whsec_` + 32 random bytes, URL-safe base64) is shown once by the PUT that makes it. At
rest it is sealed with the master key (`keys.KeySealer`); whenever this process holds it in plaintext
it is registered with `logs.register_secrets`, so no log line can carry it; it never goes into an
audit row nor an error message.

`cursor_id` is the last audit id acknowledged (or given up): the head of a product's queue is the
first deliverable row after it. A new webhook starts at the largest audit id of its creation; a new
PUT on an existing one replaces URL and secret, keeps the cursor, and clears the backoff. A webhook
belongs to the deployment whose API served its PUT: that deployment's leader delivers it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import asyncpg

from bap_engine.audit import NOT_EVENTS, event_json, iso_z
from bap_engine.errors import ProductNotFound, ValidationFailed, WebhookNotFound
from bap_engine.keys import KeySealer
from bap_engine.logs import register_secrets

__all__ = [
    "Webhooks", "WebhookCreated", "WebhookStatus", "Event", "Head", "Due", "Horizon", "SECRET_PREFIX", "MAX_URL",
    "URL_PATTERN", "PENDING_CAP", "HIDDEN_ACTIONS", "SIGNATURE_VERSION", "new_secret", "sign", "check_url", "iso_z",
]

SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"
MAX_URL = 2000
PENDING_CAP = 10_000  # GET reports "at least" this many pending events beyond it
# What GET /events leaves out (and the NOTIFY trigger of migration 0004 too): never delivered.
HIDDEN_ACTIONS = NOT_EVENTS  # the same events as GET /events
_HIDDEN = list(HIDDEN_ACTIONS)
# A receiver's URL, written so that JSON Schema (ECMA-262), pydantic (Rust regex) and Python's `re` read
# it alike (as api/models.py's patterns): the document says exactly what the server accepts. A host is a
# name or an IPv4 address (ASCII: an internationalised name goes in its xn-- form) or a bracketed IPv6
# address; whitespace is C0, space, DEL and Unicode's White_Space characters, listed.
_WS = r"\x00-\x20\x7f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_PORT = r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"
URL_PATTERN = (rf"^[Hh][Tt][Tt][Pp][Ss]?://([^{_WS}/?#@\[\]]*@)?"
               rf"([A-Za-z0-9._~!$&'()*+,;=%-]+|\[[0-9A-Fa-f:.]+\])(:{_PORT})?([/?#][^{_WS}]*)?$")
_URL = re.compile(URL_PATTERN)
_MAX_CACHED_SECRETS = 10_000


class Horizon(Protocol):
    """How far the audit log can be read: every audit row with id <= `safe_id` has committed (ids can
    commit out of order, so a row above it may still be followed by an earlier id). One per process
    (`bap_engine.events.EventHub`)."""

    @property
    def safe_id(self) -> int: ...

    async def wait_past(self, after_id: int, timeout: float) -> bool:
        """True as soon as safe_id > after_id; False after `timeout` seconds."""
        ...


# ---- signing ---------------------------------------------------------------------------------
def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The X-Bap-Signature value: `v1=` + hex HMAC-SHA256 keyed with the whole secret string (UTF-8),
    over `timestamp + "." + body`."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"{SIGNATURE_VERSION}={mac.hexdigest()}"


def check_url(url: str) -> str:
    """The URL if it matches URL_PATTERN (http or https, a host, an optional port up to 65535, no
    whitespace nor control character) and has at most MAX_URL characters. Raises ValidationFailed
    (whose message never repeats the URL: it may hold credentials)."""
    if len(url) > MAX_URL:
        raise ValidationFailed(f"url: at most {MAX_URL} characters")
    if _URL.fullmatch(url) is None:
        raise ValidationFailed("url: must be an http:// or https:// URL with a host, without whitespace")
    return url


# ---- what the worker reads -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Event:
    """One deliverable audit row."""

    id: int
    timestamp: datetime
    action: str
    user_id: str | None
    engine_id: str | None
    actor: str
    metadata: dict[str, object]

    def body(self) -> bytes:
        """The exact bytes POSTed (and signed)."""
        return event_json(self.id, self.timestamp, self.action, self.user_id, self.engine_id, self.actor,
                          self.metadata)


@dataclass(frozen=True, slots=True)
class Head:
    """A product's webhook and the first deliverable event after its cursor (None: caught up)."""

    product_id: str
    url: str
    secret_enc: str
    cursor_id: int
    attempts: int
    next_attempt_at: datetime | None
    first_failure_at: datetime | None
    event: Event | None


@dataclass(frozen=True, slots=True)
class Due:
    """A webhook with an event to send, and when it may be tried (None: now)."""

    product_id: str
    next_attempt_at: datetime | None


# ---- what the API answers --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class WebhookCreated:
    url: str
    secret: str  # shown once

    def __repr__(self) -> str:  # never the secret, whatever prints it
        return f"WebhookCreated(url={self.url!r}, secret=[redacted])"


@dataclass(frozen=True, slots=True)
class WebhookStatus:
    url: str
    pending: int  # capped at PENDING_CAP ("at least")
    last_status: int | None
    last_delivery_at: datetime | None


_ROW = "a.id, a.timestamp, a.action, a.user_id, a.engine_id::text AS engine_id, a.actor, a.metadata"
_DELIVERABLE = "a.product_id = w.product_id AND a.id > w.cursor_id AND a.action <> ALL($2::text[])"


class Webhooks:
    def __init__(self, pool: asyncpg.Pool, sealer: KeySealer, deployment: str = "default") -> None:
        self._pool = pool
        self._sealer = sealer
        self._deployment = deployment  # whose leader delivers the webhooks this service sets
        self._opened: dict[str, str] = {}  # secret_enc → secret (registered with the log scrubber)

    # ---- admin API ---------------------------------------------------------------------------
    async def put(self, product_id: str, url: str) -> WebhookCreated:
        """Create or replace the product's webhook with a new secret. Raises ProductNotFound,
        ValidationFailed."""
        url = check_url(url)
        secret = new_secret()
        register_secrets(secret)
        try:
            row = await self._pool.fetchrow(
                "INSERT INTO webhooks (product_id, url, secret_enc, deployment, cursor_id) "
                "SELECT p.id, $2, $3, $4, coalesce((SELECT max(id) FROM audit_log), 0) FROM products p WHERE p.id = $1 "
                "ON CONFLICT (product_id) DO UPDATE SET url = EXCLUDED.url, secret_enc = EXCLUDED.secret_enc, "
                "deployment = EXCLUDED.deployment, updated_at = now(), attempts = 0, next_attempt_at = NULL, "
                "first_failure_at = NULL RETURNING product_id",
                product_id, url, self._sealer.seal(secret), self._deployment,
            )
        except asyncpg.ForeignKeyViolationError:  # the product went meanwhile
            raise ProductNotFound() from None
        if row is None:
            raise ProductNotFound()
        return WebhookCreated(url, secret)

    async def status(self, product_id: str) -> WebhookStatus:
        """Raises ProductNotFound, WebhookNotFound."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT w.url, w.last_status, w.last_delivery_at, (SELECT count(*) FROM (SELECT 1 FROM audit_log a "
                f"WHERE {_DELIVERABLE} LIMIT {PENDING_CAP}) s) AS pending FROM webhooks w WHERE w.product_id = $1",
                product_id, _HIDDEN,
            )
            if row is None:
                raise await self._missing(conn, product_id)
        return WebhookStatus(row["url"], int(row["pending"]), row["last_status"], row["last_delivery_at"])

    async def delete(self, product_id: str) -> None:
        """Raises ProductNotFound, WebhookNotFound."""
        async with self._pool.acquire() as conn:
            if await conn.fetchval("DELETE FROM webhooks WHERE product_id = $1 RETURNING 1", product_id) is None:
                raise await self._missing(conn, product_id)

    @staticmethod
    async def _missing(conn: asyncpg.Connection, product_id: str) -> Exception:
        if await conn.fetchval("SELECT 1 FROM products WHERE id = $1", product_id) is None:
            return ProductNotFound()
        return WebhookNotFound()

    # ---- delivery (the worker) ---------------------------------------------------------------
    def open_secret(self, secret_enc: str) -> str | None:
        """The plaintext secret (cached, and registered with the log scrubber when first opened); None
        when the master key cannot decrypt it (it was sealed under another one)."""
        secret = self._opened.get(secret_enc)
        if secret is None:
            try:
                secret = self._sealer.open(secret_enc)
            except ValueError:
                return None
            register_secrets(secret)
            if len(self._opened) >= _MAX_CACHED_SECRETS:
                self._opened.clear()
            self._opened[secret_enc] = secret
        return secret

    async def due(self, safe_id: int, since_id: int | None = None) -> list[Due]:
        """The webhooks of this deployment with an event to send among the rows up to `safe_id`; with
        `since_id`, only those of the products that have a row in (since_id, safe_id] (a cheap look
        after new rows, instead of one at every webhook)."""
        ready = f"w.deployment = $3 AND EXISTS (SELECT 1 FROM audit_log a WHERE {_DELIVERABLE} AND a.id <= $1)"
        if since_id is None:
            rows = await self._pool.fetch(f"SELECT w.product_id, w.next_attempt_at FROM webhooks w WHERE {ready}",
                                          safe_id, _HIDDEN, self._deployment)
        else:
            rows = await self._pool.fetch(
                "SELECT w.product_id, w.next_attempt_at FROM webhooks w WHERE w.product_id IN "
                f"(SELECT n.product_id FROM audit_log n WHERE n.id > $4 AND n.id <= $1) AND {ready}",
                safe_id, _HIDDEN, self._deployment, since_id)
        return [Due(r["product_id"], r["next_attempt_at"]) for r in rows]

    async def head(self, product_id: str, safe_id: int) -> Head | None:
        """The product's webhook and its head event among the rows up to `safe_id` (None: no webhook)."""
        r = await self._pool.fetchrow(
            f"SELECT w.url, w.secret_enc, w.cursor_id, w.attempts, w.next_attempt_at, w.first_failure_at, {_ROW} "
            f"FROM webhooks w LEFT JOIN LATERAL (SELECT * FROM audit_log a WHERE {_DELIVERABLE} AND a.id <= $1 "
            "ORDER BY a.id LIMIT 1) a ON true WHERE w.product_id = $3 AND w.deployment = $4",
            safe_id, _HIDDEN, product_id, self._deployment,
        )
        if r is None:
            return None
        event = None if r["id"] is None else Event(r["id"], r["timestamp"], r["action"], r["user_id"],
                                                   r["engine_id"], r["actor"], r["metadata"])
        return Head(product_id, r["url"], r["secret_enc"], int(r["cursor_id"]), int(r["attempts"]),
                    r["next_attempt_at"], r["first_failure_at"], event)

    async def acknowledged(self, head: Head, event_id: int, status: int | None, at: datetime,
                           error: str | None = None) -> bool:
        """Move the cursor past `event_id` (a 2xx, or given up: `error` says why) and clear the backoff.
        False when the webhook changed meanwhile (deleted, or a PUT gave it a new secret: the event
        is sent again, to the new receiver)."""
        done = await self._pool.fetchval(
            "UPDATE webhooks SET cursor_id = $3, attempts = 0, next_attempt_at = NULL, first_failure_at = NULL, "
            "last_status = $4, last_delivery_at = $5, last_error = $6 "
            "WHERE product_id = $1 AND cursor_id = $2 AND secret_enc = $7 RETURNING 1",
            head.product_id, head.cursor_id, event_id, status, at, error, head.secret_enc,
        )
        return done is not None

    async def failed(self, head: Head, status: int | None, error: str, at: datetime, first_failure_at: datetime,
                     next_attempt_at: datetime) -> bool:
        """Record a failed attempt at the head and when to try again (False: the webhook changed)."""
        done = await self._pool.fetchval(
            "UPDATE webhooks SET attempts = attempts + 1, first_failure_at = $3, next_attempt_at = $4, "
            "last_status = $5, last_delivery_at = $6, last_error = $7 "
            "WHERE product_id = $1 AND cursor_id = $2 AND secret_enc = $8 RETURNING 1",
            head.product_id, head.cursor_id, first_failure_at, next_attempt_at, status, at, error[:200],
            head.secret_enc,
        )
        return done is not None

