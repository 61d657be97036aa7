"""The server-side commands: `bap-engine serve | migrate | products register`."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Annotated

import typer

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
        raise typer.Exit(2) from None


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
    # log_config=None: uvicorn's own records (a request's traceback) go through the JSON handler
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning",
                access_log=False, loop="uvloop", http="httptools", timeout_graceful_shutdown=10, log_config=None)


@app.command()
def migrate() -> None:
    """Apply database migrations (alembic upgrade head)."""
    from bap_engine.app import database

    settings = _settings()

    async def run() -> None:
        from bap_engine.db import migrate as m

        async with database(settings) as dsn:
            await m.upgrade(dsn)

    asyncio.run(run())
    typer.echo("migrations applied")


@products_app.command("register")
def register(
    slug: Annotated[str, typer.Option(help="product slug, ^[a-z0-9][a-z0-9-]{0,62}$")],
    display_name: Annotated[str, typer.Option(help="human name")],
    policy: Annotated[str, typer.Option(help="policy JSON")] = "{}",
    remote: Annotated[bool, typer.Option("--remote", help="register through a running server (BAP_URL, "
                                                         "BAP_ADMIN_KEY) instead of the database")] = False,
    url: Annotated[str, typer.Option("--url", envvar="BAP_URL", help="server URL, with --remote")] = DEFAULT_URL,
    admin_key: Annotated[str | None, typer.Option("--admin-key", envvar="BAP_ADMIN_KEY", show_default=False,
                                                  help="admin key, with --remote")] = None,
) -> None:
    """Register a product and print its platform key (shown once)."""
    from bap_engine.app import register_product
    from bap_engine.errors import BapError

    try:
        doc = json.loads(policy)
    except json.JSONDecodeError:
        typer.echo("bap-engine: --policy is not valid JSON", err=True)
        raise typer.Exit(2) from None
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


register_ops(app, products_app)  # engines, status, audit, products list|policy (over HTTP, via the client)


def main() -> None:
    try:
        app()
    except ConfigError as err:
        print(f"bap-engine: {err}", file=sys.stderr)  # noqa: T201
        sys.exit(2)
