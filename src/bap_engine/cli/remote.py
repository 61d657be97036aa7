"""Ops commands of the CLI: talk to a running server through `bap_engine.client` (never to the database).

    bap-engine engines list|show|provision|stop|start|destroy|rotate-key|idle-sleep   (cli/engines.py)
    bap-engine status
    bap-engine audit tail [--follow]       (the admin's view with --product; a product's own with its key)
    bap-engine audit list [--user --engine --action --since --until]   (platform key, every page)
    bap-engine events [--follow] [--after ID]                          (cli/events.py)
    bap-engine usage [--since] [--until] [--user]                      (cli/usage.py)
    bap-engine webhook set|show|delete PRODUCT                         (cli/webhooks.py, admin key)
    bap-engine products list|policy        (products register lives in main.py; --remote uses this module)
    bap-engine products show|delete|rotate-key PRODUCT                 (cli/products.py, admin key)

The server URL and keys come from flags or the environment: BAP_URL (default http://127.0.0.1:8000),
BAP_PLATFORM_KEY (a product's own calls) and BAP_ADMIN_KEY (admin calls; with --product/BAP_PRODUCT the
engine commands act on that product's engines as the admin). Keys are never printed unless asked
(--show-key). Tables fit 80 columns (--wide: every id and time in full; see cli/render.py); --json
prints one JSON document; exit codes are in cli/common.py. Long operations show a spinner or a
progress bar on stderr.
"""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer

from bap_engine.cli import render
from bap_engine.cli.common import (
    EXIT_USAGE,
    AdminKey,
    AsJson,
    PlatformKey,
    ProductRef,
    Since,
    Until,
    Url,
    Wide,
    client,
    fail,
    resolve_product,
)
from bap_engine.cli.engines import engines_app
from bap_engine.cli.events import events
from bap_engine.cli.products import products_delete, products_rotate_key, products_show
from bap_engine.cli.usage import usage
from bap_engine.cli.webhooks import webhook_app
from bap_engine.client import DEFAULT_URL, AuditEvent, BapClient, ProductNotFound
from bap_engine.states import AuditAction

__all__ = ["register_ops", "register_remote", "engines_app", "audit_app", "webhook_app"]

audit_app = typer.Typer(no_args_is_help=True, help="The audit trail: any product's (admin key, --product) or a "
                                                     "product's own (platform key).")


# --- status, products -------------------------------------------------------------------------------
def status(url: Url = DEFAULT_URL, platform_key: PlatformKey = None, admin_key: AdminKey = None,
           as_json: AsJson = False, wide: Wide = False) -> None:
    """The fleet: the product's status and metrics (platform key), or every product (admin key)."""
    with client(url, platform_key, admin_key) as c:
        if not platform_key:
            _products(c, as_json, wide)
            return
        fleet, figures = c.status(), c.metrics()
    if as_json:
        render.emit_json({"status": fleet, "metrics": figures})
        return
    render.show(*render.fleet_tables(fleet, figures))


def _products(c: BapClient, as_json: bool, wide: bool) -> None:
    products = c.products()
    if as_json:
        render.emit_json(products)
        return
    render.show(render.product_table(products, wide), wide=wide)


def products_list(url: Url = DEFAULT_URL, admin_key: AdminKey = None, as_json: AsJson = False,
                  wide: Wide = False) -> None:
    """Every product with its engines by state (admin key)."""
    with client(url, None, admin_key) as c:
        _products(c, as_json, wide)


def products_policy(product: Annotated[str, typer.Argument(metavar="PRODUCT", help="id, id prefix or slug")],
                    url: Url = DEFAULT_URL, admin_key: AdminKey = None,
                    set_: Annotated[str | None, typer.Option("--set", help="replace the whole policy with this JSON",
                                                             show_default=False)] = None,
                    as_json: AsJson = False) -> None:
    """Show a product's policy, or replace it with --set '{"max_engines": 50}' (always printed as JSON)."""
    doc: object = None
    if set_ is not None:
        try:
            doc = json.loads(set_)
        except json.JSONDecodeError:
            fail("--set is not valid JSON", EXIT_USAGE)
        if not isinstance(doc, dict):
            fail("--set must be a JSON object", EXIT_USAGE)
    with client(url, None, admin_key) as c:
        pid = resolve_product(c, product)
        if isinstance(doc, dict):
            render.emit_json(c.set_policy(pid or product, doc))
            return
        found = [p for p in c.products() if p.product_id == pid]
        if not found:
            raise ProductNotFound("product not found")
        render.emit_json(found[0].policy)


def register_remote(url: str, admin_key: str | None, slug: str, display_name: str, policy: dict[str, object]) -> None:
    """`products register --remote`: register through the server's admin API; same output as the local one."""
    with client(url, None, admin_key) as c:
        reg = c.register_product(slug, display_name, policy)
    typer.echo(json.dumps({"product_id": reg.product_id, "slug": reg.slug, "platform_api_key": reg.platform_api_key}))


# --- audit --------------------------------------------------------------------------------------------
def _show(events: list[AuditEvent], as_json: bool, follow: bool, wide: bool) -> None:
    if not events:
        return
    if as_json and follow:
        for e in events:
            render.emit_json_line(e)
    elif as_json:
        render.emit_json(events)
    else:
        render.show(render.audit_grid(events, wide), wide=wide)


Action = Annotated[AuditAction | None, typer.Option(help="only this action", show_default=False)]


def _platform_since(c: BapClient, last: int, action: str | None) -> list[AuditEvent]:
    """A product's rows after `last`, oldest first (the platform view pages newest first)."""
    fresh: list[AuditEvent] = []
    for row in c.iter_audit(action=action, page_size=200):
        if row.id <= last:
            break
        fresh.append(row)
    fresh.reverse()
    return fresh


@audit_app.command("tail")
def audit_tail(url: Url = DEFAULT_URL, platform_key: PlatformKey = None, admin_key: AdminKey = None,
               product: ProductRef = None,
               limit: Annotated[int, typer.Option(min=1, max=1000, help="events shown first")] = 20,
               action: Action = None,
               follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new events")] = False,
               interval: Annotated[float, typer.Option(min=0.01, help="seconds between polls with --follow")] = 2.0,
               polls: Annotated[int | None, typer.Option(hidden=True)] = None,
               as_json: Annotated[bool, typer.Option("--json", help="a JSON array; with --follow one JSON "
                                                                    "object per line")] = False,
               wide: Wide = False) -> None:
    """The latest audit events, oldest first; --follow polls for new ones until interrupted.

    With the admin key: every product's, or --product's. With a platform key (and no --product): that
    product's own rows."""
    only = action.value if action else None
    own = bool(platform_key) and not product
    with client(url, platform_key if own else None, None if own else admin_key) as c:
        pid = None if own else resolve_product(c, product)
        if own:
            events = list(reversed(c.audit_page(limit=limit, action=only).events))
        else:
            events = list(reversed(c.audit(pid, limit, 0, only)))
        if as_json and not follow:
            render.emit_json(events)
            return
        _show(events, as_json, follow, wide)
        if events:
            last = events[-1].id
        elif own:
            last = max((e.id for e in c.audit_page(limit=1).events), default=0)
        else:
            last = max((e.id for e in c.audit(pid, 1, 0, None)), default=0)
        done = 0
        while follow and (polls is None or done < polls):
            try:
                time.sleep(interval)
            except KeyboardInterrupt:
                return
            fresh = _platform_since(c, last, only) if own else c.audit(pid, 1000, last, only)
            _show(fresh, as_json, follow, wide)
            last = max([last, *(e.id for e in fresh)])
            done += 1


@audit_app.command("list")
def audit_list(url: Url = DEFAULT_URL, platform_key: PlatformKey = None,
               user: Annotated[str | None, typer.Option("--user", show_default=False, help="only this user's")] = None,
               engine: Annotated[str | None, typer.Option("--engine", show_default=False,
                                                          help="only this engine's (its id)")] = None,
               action: Action = None, since: Since = None, until: Until = None,
               limit: Annotated[int, typer.Option(min=1, help="at most this many (the newest)")] = 100,
               all_: Annotated[bool, typer.Option("--all", help="every matching row (no --limit)")] = False,
               page_size: Annotated[int, typer.Option(min=1, max=1000, help="rows per request")] = 100,
               as_json: AsJson = False, wide: Wide = False) -> None:
    """The product's audit rows matching the filters, newest first, following the pages (platform key).

    Health checks and denied admits are rows too (`--action admit_denied`)."""
    rows: list[AuditEvent] = []
    with client(url, platform_key) as c:
        size = page_size if all_ else min(page_size, limit)
        for row in c.iter_audit(user_id=user, engine_id=engine, action=action.value if action else None,
                                since=since, until=until, page_size=size):
            rows.append(row)
            if not all_ and len(rows) >= limit:
                break
    if as_json:
        render.emit_json(rows)
        return
    render.show(render.audit_grid(rows, wide), wide=wide)


def register_ops(app: typer.Typer, products_app: typer.Typer) -> None:
    """Add the ops commands to the CLI (called by main.py)."""
    app.add_typer(engines_app, name="engines")
    app.add_typer(audit_app, name="audit")
    app.add_typer(webhook_app, name="webhook")
    app.command("status")(status)
    app.command("events")(events)
    app.command("usage")(usage)
    products_app.command("list")(products_list)
    products_app.command("policy")(products_policy)
    products_app.command("show")(products_show)
    products_app.command("delete")(products_delete)
    products_app.command("rotate-key")(products_rotate_key)
