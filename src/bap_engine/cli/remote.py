"""Ops commands of the CLI: talk to a running server through `bap_engine.client` (never to the database).

    bap-engine engines list|show|provision|stop|start|destroy|rotate-key
    bap-engine status
    bap-engine audit tail [--follow]
    bap-engine products list|policy        (products register lives in cli.py; --remote uses this module)

The server URL and keys come from flags or the environment: BAP_URL (default http://127.0.0.1:8000),
BAP_PLATFORM_KEY (a product's own calls) and BAP_ADMIN_KEY (admin calls; with --product/BAP_PRODUCT the
engine commands act on that product's engines as the admin). Keys are never printed unless asked
(--show-key). Long operations show a spinner or a progress bar on stderr; --json prints machine output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from bap_engine.client import (
    DEFAULT_URL,
    AuditEvent,
    BapClient,
    BapClientError,
    Engine,
    EngineAction,
    EnginePage,
    MissingKey,
)

__all__ = ["register_ops", "register_remote", "engines_app", "audit_app"]

T = TypeVar("T")
STATES = ("provisioning", "running", "sleeping", "stopped", "failed", "destroying")

engines_app = typer.Typer(no_args_is_help=True, help="A product's engines (platform key), or any product's "
                                                     "with --product and the admin key.")
audit_app = typer.Typer(no_args_is_help=True, help="The audit trail (admin key).")

Url = Annotated[str, typer.Option("--url", envvar="BAP_URL", help="server URL (BAP_URL)")]
PlatformKey = Annotated[str | None, typer.Option("--platform-key", envvar="BAP_PLATFORM_KEY", show_default=False,
                                                 help="a product's platform key (BAP_PLATFORM_KEY)")]
AdminKey = Annotated[str | None, typer.Option("--admin-key", envvar="BAP_ADMIN_KEY", show_default=False,
                                              help="the admin key (BAP_ADMIN_KEY)")]
ProductId = Annotated[str | None, typer.Option("--product", "-p", envvar="BAP_PRODUCT", show_default=False,
                                               help="act as the admin on this product id's engines")]
AsJson = Annotated[bool, typer.Option("--json", help="print JSON")]
ShowKey = Annotated[bool, typer.Option("--show-key", help="print the engine key")]
Users = Annotated[list[str], typer.Argument(help="user ids", show_default=False)]


def _out() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _err() -> Console:
    return Console(stderr=True, highlight=False)


def _plain(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _json(value: object) -> None:
    typer.echo(json.dumps(_plain(value), indent=2, sort_keys=True))


@contextlib.contextmanager
def _client(url: str, platform_key: str | None = None, admin_key: str | None = None) -> Iterator[BapClient]:
    """A client; a BapClientError becomes one line on stderr and exit status 1 (2 for a missing key)."""
    try:
        with BapClient(url, platform_key=platform_key, admin_key=admin_key) as client:
            yield client
    except MissingKey as err:
        typer.echo(f"bap-engine: {err.message} (set BAP_PLATFORM_KEY / BAP_ADMIN_KEY or pass the flag)", err=True)
        raise typer.Exit(2) from None
    except BapClientError as err:
        typer.echo(f"bap-engine: {err.code}: {err.message}", err=True)
        raise typer.Exit(1) from None


def _spin(message: str, fn: Callable[[], T]) -> T:
    with _err().status(message):
        return fn()


def _each(label: str, users: Sequence[str], fn: Callable[[str], object]) -> list[tuple[str, str]]:
    """Run fn per user with a progress bar; returns (user, "ok" | error) and never stops half-way."""
    results: list[tuple[str, str]] = []
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=_err(), transient=False) as progress:
        task = progress.add_task(label, total=len(users))
        for user in users:
            progress.update(task, description=f"{label} {user}")
            try:
                fn(user)
                results.append((user, "ok"))
            except BapClientError as err:
                results.append((user, f"{err.code}: {err.message}"))
            progress.advance(task)
    return results


def _report(results: list[tuple[str, str]]) -> None:
    failed = [(u, r) for u, r in results if r != "ok"]
    for user, reason in failed:
        typer.echo(f"bap-engine: {user}: {reason}", err=True)
    typer.echo(f"{len(results) - len(failed)} done, {len(failed)} failed")
    if failed:
        raise typer.Exit(1)


def _engine_table(engines: Sequence[Engine], title: str) -> Table:
    table = Table(title=title)
    for col in ("user", "status", "url", "version", "created", "last health"):
        table.add_column(col)
    for e in engines:
        table.add_row(e.user_id, e.status, e.url or "-", e.engine_version or "-", str(_plain(e.created_at) or "-"),
                      str(_plain(e.last_health_at) or "-"))
    return table


def _mask(key: str | None, show: bool) -> str:
    if not key:
        return "-"
    return key if show else "(hidden; --show-key prints it)"


# --- engines ---------------------------------------------------------------------------------------
@engines_app.command("list")
def engines_list(url: Url = DEFAULT_URL, platform_key: PlatformKey = None, admin_key: AdminKey = None,
                 product: ProductId = None, status: Annotated[str | None, typer.Option(help="filter by state")] = None,
                 limit: int = 100, offset: int = 0, as_json: AsJson = False) -> None:
    """List engines, oldest first (never with keys)."""
    with _client(url, platform_key, admin_key) as c:
        page: EnginePage = (c.product_engines(product, status, limit, offset) if product
                            else c.list_engines(status, limit, offset))
    if as_json:
        _json(page)
        return
    _out().print(_engine_table(page.engines, f"{len(page.engines)} of {page.total} engines"))


@engines_app.command("show")
def engines_show(user_id: str, url: Url = DEFAULT_URL, platform_key: PlatformKey = None, admin_key: AdminKey = None,
                 product: ProductId = None, show_key: ShowKey = False, as_json: AsJson = False) -> None:
    """One engine (its key only with --show-key, and only with the platform key)."""
    with _client(url, platform_key, admin_key) as c:
        engine = c.product_engine(product, user_id) if product else c.get(user_id)
    doc = _plain(engine)
    assert isinstance(doc, dict)
    doc["api_key"] = engine.api_key if show_key else None
    if as_json:
        _json(doc)
        return
    table = Table(show_header=False)
    for k, v in doc.items():
        table.add_row(k, _mask(engine.api_key, show_key) if k == "api_key" else str(v if v is not None else "-"))
    _out().print(table)


@engines_app.command("provision")
def engines_provision(users: Users, url: Url = DEFAULT_URL, platform_key: PlatformKey = None,
                      engine_version: Annotated[str | None, typer.Option(help="image/version override")] = None
                      ) -> None:
    """Provision engines for one or more users (platform key), with a progress bar."""
    with _client(url, platform_key) as c:
        _report(_each("provisioning", users, lambda u: c.provision(u, engine_version)))


def _act(verb: str, url: str, platform_key: str | None, admin_key: str | None, product: str | None,
         users: Sequence[str]) -> None:
    with _client(url, platform_key, admin_key) as c:
        calls: dict[str, Callable[[str], EngineAction]] = {
            "stop": (lambda u: c.admin_stop(product, u)) if product else c.stop,
            "start": (lambda u: c.admin_start(product, u)) if product else c.start,
            "destroy": (lambda u: c.admin_destroy(product, u)) if product else c.destroy,
        }
        fn = calls[verb]
        if len(users) == 1:
            result = _spin(f"{verb} {users[0]}…", lambda: fn(users[0]))
            typer.echo(f"{users[0]}: {result.status}")
            return
        _report(_each(verb, users, fn))


@engines_app.command("stop")
def engines_stop(users: Users, url: Url = DEFAULT_URL, platform_key: PlatformKey = None, admin_key: AdminKey = None,
                 product: ProductId = None) -> None:
    """Stop engines (SIGTERM, grace, SIGKILL; data kept)."""
    _act("stop", url, platform_key, admin_key, product, users)


@engines_app.command("start")
def engines_start(users: Users, url: Url = DEFAULT_URL, platform_key: PlatformKey = None,
                  admin_key: AdminKey = None, product: ProductId = None) -> None:
    """Start stopped, sleeping or failed engines and wait until healthy."""
    _act("start", url, platform_key, admin_key, product, users)


@engines_app.command("destroy")
def engines_destroy(users: Annotated[list[str] | None, typer.Argument(help="user ids", show_default=False)] = None,
                    url: Url = DEFAULT_URL, platform_key: PlatformKey = None, admin_key: AdminKey = None,
                    product: ProductId = None,
                    all_: Annotated[bool, typer.Option("--all", help="every engine")] = False,
                    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False) -> None:
    """Destroy engines and their data (--all: every engine of the product), with a progress bar."""
    targets = list(users or [])
    if all_:
        with _client(url, platform_key, admin_key) as c:
            targets = _spin("listing engines…", lambda: _all_users(c, product))
    if not targets:
        typer.echo("nothing to destroy")
        return
    if not yes:
        typer.confirm(f"Destroy {len(targets)} engine(s) and their data?", abort=True)
    if len(targets) == 1 and not all_:
        _act("destroy", url, platform_key, admin_key, product, targets)
        return
    with _client(url, platform_key, admin_key) as c:
        _report(_each("destroying", targets,
                      (lambda u: c.admin_destroy(product, u)) if product else c.destroy))


def _all_users(c: BapClient, product: str | None) -> list[str]:
    users: list[str] = []
    while True:
        page = c.product_engines(product, None, 1000, len(users)) if product else c.list_engines(None, 1000, len(users))
        users += [e.user_id for e in page.engines]
        if not page.engines or len(users) >= page.total:
            return users


@engines_app.command("rotate-key")
def engines_rotate_key(user_id: str, url: Url = DEFAULT_URL, platform_key: PlatformKey = None,
                       admin_key: AdminKey = None, product: ProductId = None, show_key: ShowKey = False) -> None:
    """Give a running engine a new key (the old one works for the overlap window)."""
    with _client(url, platform_key, admin_key) as c:
        if product:
            result = _spin(f"rotating the key of {user_id}…", lambda: c.admin_rotate_key(product, user_id))
            typer.echo(f"{user_id}: key rotated ({result.status}); the product gets it from admit")
            return
        engine = _spin(f"rotating the key of {user_id}…", lambda: c.rotate_key(user_id))
    typer.echo(f"{user_id}: key rotated; new key: {_mask(engine.api_key, show_key)}")


# --- status, products -------------------------------------------------------------------------------
def status(url: Url = DEFAULT_URL, platform_key: PlatformKey = None, admin_key: AdminKey = None,
           as_json: AsJson = False) -> None:
    """The fleet: the product's status and metrics (platform key), or every product (admin key)."""
    with _client(url, platform_key, admin_key) as c:
        if platform_key:
            fleet, figures = c.status(), c.metrics()
            if as_json:
                _json({"status": fleet, "metrics": figures})
                return
            table = Table(title=f"fleet: {fleet.total} engines, health {fleet.health}")
            for col in (*STATES, "provisions 1h", "crashes 1h", "restarts 1h", "avg boot ms"):
                table.add_column(col, justify="right")
            avg = "-" if figures.avg_boot_ms is None else f"{figures.avg_boot_ms:.0f}"
            table.add_row(*(str(fleet.by_status.get(s, 0)) for s in STATES), str(figures.provisions_1h),
                          str(figures.crashes_1h), str(figures.restarts_1h), avg)
            _out().print(table)
            return
        _products(c, as_json)


def _products(c: BapClient, as_json: bool) -> None:
    products = c.products()
    if as_json:
        _json(products)
        return
    table = Table(title=f"{len(products)} products")
    table.add_column("product id", no_wrap=True, min_width=36)  # never cut: it is what --product takes
    for col in ("slug", "name", "total", *STATES):
        table.add_column(col)
    for p in products:
        table.add_row(p.product_id, p.slug, p.display_name, str(p.total), *(str(p.by_status.get(s, 0)) for s in STATES))
    _out().print(table)


def products_list(url: Url = DEFAULT_URL, admin_key: AdminKey = None, as_json: AsJson = False) -> None:
    """Every product with its engines by state (admin key)."""
    with _client(url, None, admin_key) as c:
        _products(c, as_json)



def products_policy(product_id: str, url: Url = DEFAULT_URL, admin_key: AdminKey = None,
                    set_: Annotated[str | None, typer.Option("--set", help="replace the whole policy with this JSON",
                                                             show_default=False)] = None) -> None:
    """Show a product's policy, or replace it with --set '{"max_engines": 50}'."""
    with _client(url, None, admin_key) as c:
        if set_ is None:
            found = [p for p in c.products() if p.product_id == product_id]
            if not found:
                typer.echo("bap-engine: PRODUCT_NOT_FOUND: product not found", err=True)
                raise typer.Exit(1)
            _json(found[0].policy)
            return
        try:
            doc = json.loads(set_)
        except json.JSONDecodeError:
            typer.echo("bap-engine: --set is not valid JSON", err=True)
            raise typer.Exit(2) from None
        if not isinstance(doc, dict):
            typer.echo("bap-engine: --set must be a JSON object", err=True)
            raise typer.Exit(2)
        _json(c.set_policy(product_id, doc))


def register_remote(url: str, admin_key: str | None, slug: str, display_name: str, policy: dict[str, object]) -> None:
    """`products register --remote`: register through the server's admin API; same output as the local one."""
    with _client(url, None, admin_key) as c:
        reg = c.register_product(slug, display_name, policy)
    typer.echo(json.dumps({"product_id": reg.product_id, "slug": reg.slug, "platform_api_key": reg.platform_api_key}))


# --- audit --------------------------------------------------------------------------------------------
def _event_line(e: AuditEvent) -> str:
    meta = json.dumps(dict(e.metadata), sort_keys=True) if e.metadata else ""
    took = f" {e.duration_ms}ms" if e.duration_ms is not None else ""
    return f"{_plain(e.timestamp)} #{e.id} {e.action} user={e.user_id or '-'} actor={e.actor}{took} {meta}".rstrip()


@audit_app.command("tail")
def audit_tail(url: Url = DEFAULT_URL, admin_key: AdminKey = None, product: ProductId = None,
               limit: Annotated[int, typer.Option(help="events shown first")] = 20,
               action: Annotated[str | None, typer.Option(help="only this action")] = None,
               follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new events")] = False,
               interval: Annotated[float, typer.Option(help="seconds between polls with --follow")] = 2.0,
               polls: Annotated[int | None, typer.Option(hidden=True)] = None) -> None:
    """The latest audit events, oldest first; --follow polls for new ones until interrupted."""
    with _client(url, None, admin_key) as c:
        events = list(reversed(c.audit(product, limit, 0, action)))
        for e in events:
            typer.echo(_event_line(e))
        last = events[-1].id if events else max((e.id for e in c.audit(product, 1, 0, None)), default=0)
        done = 0
        while follow and (polls is None or done < polls):
            try:
                time.sleep(interval)
            except KeyboardInterrupt:
                return
            for e in c.audit(product, 1000, last, action):
                typer.echo(_event_line(e))
                last = max(last, e.id)
            done += 1


def register_ops(app: typer.Typer, products_app: typer.Typer) -> None:
    """Add the ops commands to the CLI (called by cli.py)."""
    app.add_typer(engines_app, name="engines")
    app.add_typer(audit_app, name="audit")
    app.command("status")(status)
    products_app.command("list")(products_list)
    products_app.command("policy")(products_policy)
