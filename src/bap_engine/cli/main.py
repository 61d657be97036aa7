"""The server-side commands: `bap-engine serve | migrate | doctor | products register`.

The commands over HTTP are in remote.py and engines.py, the checks of `doctor` in doctor.py and
checks.py. Exit codes: 0 ok, 1 an error of the server or the database, 2 usage (a bad flag, an
invalid ORCH_* setting); `doctor` exits 1 when a check fails.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from typing import Annotated

import typer

from bap_engine.cli.common import EXIT_USAGE, AsJson, Url
from bap_engine.cli.doctor import doctor
from bap_engine.cli.remote import register_ops, register_remote
from bap_engine.client import DEFAULT_URL
from bap_engine.config import ConfigError, Settings, ensure_secrets, load_settings

__all__ = ["main", "app"]

app = typer.Typer(add_completion=False, no_args_is_help=True, help="bap-engine: one AI-agent engine per user.")
products_app = typer.Typer(no_args_is_help=True, help="Products (tenants).")
app.add_typer(products_app, name="products")


def _settings(**overrides: object) -> Settings:
    try:
        return ensure_secrets(load_settings(**{k: v for k, v in overrides.items() if v is not None}))
    except ConfigError as err:
        typer.echo(f"bap-engine: {err}", err=True)
        raise typer.Exit(EXIT_USAGE) from None


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="listen address (ORCH_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="listen port (ORCH_PORT)")] = None,
) -> None:
    """Serve the HTTP API (and, when elected leader, the workers)."""
    import uvicorn

    from bap_engine.app import create_app
    from bap_engine.logs import configure_logging

    settings = _settings(host=host, port=port)
    configure_logging(settings.log_level, settings.admin_key, settings.master_key)
    if settings.embedded:
        where = (settings.data_dir / "admin.key").resolve()
        typer.echo(f"bap-engine: embedded Postgres under {(settings.data_dir / 'pg').resolve()}", err=True)
        # ensure_secrets uses the file only when ORCH_ADMIN_KEY is unset: name it only if the key is in it
        if where.is_file() and where.read_text().strip() == settings.admin_key:
            typer.echo(f"bap-engine: admin key in {where}", err=True)
        typer.echo("bap-engine: register a product with: bap-engine products register --slug my-app "
                   "--display-name 'My App'", err=True)
    typer.echo(f"bap-engine: serving on http://{settings.host}:{settings.port}", err=True)
    application = create_app(settings)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # An open GET /events stream never ends by itself: uvicorn would wait the whole graceful
            # timeout for it. End the streams first (clients resume elsewhere with Last-Event-ID).
            services = getattr(application.state, "services", None)
            if services is not None and services.events is not None:
                await services.events.aclose()
            await super().shutdown(sockets)

    # log_config=None: uvicorn's own records (a request's traceback) go through the JSON handler
    Server(uvicorn.Config(application, host=settings.host, port=settings.port, log_level="warning",
                         access_log=False, loop="uvloop", http="httptools", timeout_graceful_shutdown=10,
                         log_config=None)).run()


@app.command()
def migrate(as_json: AsJson = False) -> None:
    """Apply database migrations (alembic upgrade head)."""
    from bap_engine.app import database
    from bap_engine.db import migrate as m

    settings = _settings()

    async def run() -> None:
        async with database(settings) as dsn:
            await m.upgrade(dsn)

    asyncio.run(run())
    head = m.head_revision()
    typer.echo(json.dumps({"migrated": True, "head": head}) if as_json else f"migrations applied (head {head})")


@products_app.command("register")
def register(
    slug: Annotated[str, typer.Option(help="product slug, ^[a-z0-9][a-z0-9-]{0,62}$")],
    display_name: Annotated[str, typer.Option(help="human name")],
    policy: Annotated[str, typer.Option(help="policy JSON")] = "{}",
    remote: Annotated[bool, typer.Option("--remote", help="register through a running server (BAP_URL, "
                                                         "BAP_ADMIN_KEY) instead of the database")] = False,
    url: Url = DEFAULT_URL,
    admin_key: Annotated[str | None, typer.Option("--admin-key", envvar="BAP_ADMIN_KEY", show_default=False,
                                                  help="admin key, with --remote")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="accepted for symmetry: the output is always JSON")] = False,
) -> None:
    """Register a product and print its platform key (shown once), as JSON."""
    from bap_engine.app import register_product
    from bap_engine.errors import BapError

    try:
        doc = json.loads(policy)
    except json.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict):
        typer.echo("bap-engine: --policy is not a JSON object", err=True)
        raise typer.Exit(EXIT_USAGE)
    if remote:
        register_remote(url, admin_key, slug, display_name, doc)
        return
    settings = _settings()
    try:
        product_id, key = asyncio.run(register_product(settings, slug, display_name, doc))
    except BapError as err:
        typer.echo(f"bap-engine: {err.code}: {err.message}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps({"product_id": product_id, "slug": slug, "platform_api_key": key}))


register_ops(app, products_app)  # engines, status, audit, events, usage, webhook, products list|policy (HTTP)
app.command("doctor")(doctor)


def main() -> None:
    try:
        app()
    except ConfigError as err:
        print(f"bap-engine: {err}", file=sys.stderr)  # noqa: T201
        sys.exit(EXIT_USAGE)
