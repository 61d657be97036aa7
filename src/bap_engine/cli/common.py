"""What the commands that talk to a server share: their flags, the client, exit codes, product references.

Exit codes scripts can rely on:

    0  done
    1  the server answered an error (`bap-engine: CODE: message` on stderr), or could not be reached
       (`bap-engine: CONNECTION_ERROR: cannot reach URL ...`)
    2  usage: a bad flag or value, a missing key, an invalid ORCH_* setting

A product is named by its id, by a unique prefix of it (what the tables show), or by its slug. A
time (--since, --until) is ISO 8601 (`2025-03-14T09:00:00Z`; one without an offset is UTC, as the
tables show times) or an age: `90s`, `30m`, `24h`, `7d`, `2w` ago.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, NoReturn

import typer

from bap_engine.client import BapClient, BapClientError, ConnectionFailed, MissingKey, ProductNotFound

__all__ = ["EXIT_API", "EXIT_USAGE", "Url", "PlatformKey", "AdminKey", "ProductRef", "AsJson", "Wide", "ShowKey",
           "Since", "Until", "parse_instant", "fail", "client", "resolve_product"]

EXIT_API = 1
EXIT_USAGE = 2
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)


def _check_url(value: str) -> str:
    if not re.match(r"^https?://[^/\s]+", value):
        raise typer.BadParameter(f"{value!r} is not an http:// or https:// URL")
    return value


Url = Annotated[str, typer.Option("--url", envvar="BAP_URL", callback=_check_url, help="server URL (BAP_URL)")]
PlatformKey = Annotated[str | None, typer.Option("--platform-key", envvar="BAP_PLATFORM_KEY", show_default=False,
                                                 help="a product's platform key (BAP_PLATFORM_KEY)")]
AdminKey = Annotated[str | None, typer.Option("--admin-key", envvar="BAP_ADMIN_KEY", show_default=False,
                                              help="the admin key (BAP_ADMIN_KEY)")]
ProductRef = Annotated[str | None, typer.Option("--product", "-p", envvar="BAP_PRODUCT", show_default=False,
                                                help="act as the admin on this product's engines (id, id prefix "
                                                     "or slug)")]
AsJson = Annotated[bool, typer.Option("--json", help="print one JSON document (machine-readable)")]
Wide = Annotated[bool, typer.Option("--wide", "-w", help="full ids, times and images (wider than 80 columns)")]
ShowKey = Annotated[bool, typer.Option("--show-key", help="print the engine key")]


_AGE = re.compile(r"^(\d{1,7})([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_instant(value: str, now: datetime | None = None) -> datetime:
    """`value` as an aware UTC datetime: ISO 8601 (no offset: UTC) or an age (`24h`: 24 hours before
    `now`). Raises ValueError."""
    text = value.strip()
    age = _AGE.match(text.lower())
    if age:
        return (now or datetime.now(UTC)) - timedelta(seconds=int(age.group(1)) * _UNIT_S[age.group(2)])
    ts = datetime.fromisoformat(text)  # ValueError when it is not ISO 8601
    return (ts if ts.utcoffset() is not None else ts.replace(tzinfo=UTC)).astimezone(UTC)


def _check_instant(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return parse_instant(value).isoformat().replace("+00:00", "Z")
    except (ValueError, OverflowError):
        raise typer.BadParameter(f"{value!r} is neither an ISO 8601 time (2025-03-14T09:00:00Z) nor an age "
                                 "(90s, 30m, 24h, 7d, 2w)") from None


Since = Annotated[str | None, typer.Option("--since", callback=_check_instant, show_default=False,
                                           help="from this time: ISO 8601 (UTC unless an offset is given) or an "
                                                "age such as 24h, 7d")]
Until = Annotated[str | None, typer.Option("--until", callback=_check_instant, show_default=False,
                                           help="up to this time (excluded): ISO 8601 or an age")]


def fail(message: str, code: int = EXIT_API) -> NoReturn:
    """`bap-engine: message` on stderr, then exit with `code`."""
    typer.echo(f"bap-engine: {message}", err=True)
    raise typer.Exit(code)


def _missing_key_hint(message: str) -> str:
    if "admin" in message:
        return "this command needs the admin key: pass --admin-key or set BAP_ADMIN_KEY"
    if "platform" in message:
        return ("this command needs a platform key: pass --platform-key or set BAP_PLATFORM_KEY "
                "(or name a product with --product and use the admin key)")
    return f"{message} (set BAP_PLATFORM_KEY / BAP_ADMIN_KEY or pass the flag)"


@contextlib.contextmanager
def client(url: str, platform_key: str | None = None, admin_key: str | None = None) -> Iterator[BapClient]:
    """A client whose errors become one line on stderr: exit 1 (API, connection), 2 (missing key)."""
    try:
        with BapClient(url, platform_key=platform_key, admin_key=admin_key) as c:
            yield c
    except MissingKey as e:
        fail(_missing_key_hint(e.message), EXIT_USAGE)
    except ConnectionFailed as e:
        fail(f"{e.code}: {e.message} (is `bap-engine serve` running there? set --url or BAP_URL)")
    except BapClientError as e:
        fail(f"{e.code}: {e.message}")


def resolve_product(c: BapClient, ref: str | None) -> str | None:
    """The product id `ref` names (an id, a unique id prefix or a slug); None when no product is given.

    Raises ProductNotFound (exit 1); an ambiguous prefix is a usage error (exit 2)."""
    if not ref or _UUID.match(ref):
        return ref or None
    products = c.products()
    found = [p for p in products if p.slug == ref] or [p for p in products if p.product_id.startswith(ref.lower())]
    if len(found) > 1:
        fail(f"{ref!r} matches {len(found)} products; give more of the id", EXIT_USAGE)
    if not found:
        raise ProductNotFound(f"no product with the id, id prefix or slug {ref!r}")
    return found[0].product_id
