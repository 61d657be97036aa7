"""The server-side commands: `bap-engine serve | migrate | rotate-master-key | doctor | products register`.

The commands over HTTP are in remote.py and engines.py, the checks of `doctor` in doctor.py and
checks.py. Exit codes: 0 ok, 1 an error of the server or the database, 2 usage (a bad flag, an
invalid ORCH_* setting); `doctor` exits 1 when a check fails.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from bap_engine.cli.common import EXIT_USAGE, AsJson, Url
from bap_engine.cli.doctor import doctor
from bap_engine.cli.remote import register_ops, register_remote
from bap_engine.client import DEFAULT_URL
from bap_engine.config import ConfigError, Settings, ensure_secrets, load_settings

if TYPE_CHECKING:
    from bap_engine.rekey import RekeyReport

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
    configure_logging(settings.log_level, settings.admin_key, settings.master_key, settings.master_key_previous)
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


@app.command("rotate-master-key")
def rotate_master_key(
    batch_size: Annotated[int, typer.Option(min=1, max=100_000, help="rows read and written per batch "
                                                                    "(one short transaction each)")] = 500,
    pause: Annotated[float, typer.Option(min=0, help="seconds to wait between batches (spreads the load)")] = 0.0,
    retry_for: Annotated[float, typer.Option(min=0, help="seconds rows changed concurrently (an op in flight) "
                                                         "are retried before they are left for the next run")] = 30.0,
    as_json: AsJson = False,
) -> None:
    """Re-encrypt every stored engine key and webhook secret under ORCH_MASTER_KEY (the old key in
    ORCH_MASTER_KEY_PREVIOUS). Safe while the API serves; re-run it if interrupted."""
    from bap_engine.logs import redact, register_secrets

    settings = _settings()
    register_secrets(settings.admin_key, settings.master_key, settings.master_key_previous,
                     *_db_password(settings.database_url))  # an error line below is redacted of them all
    if not settings.master_key_previous:
        typer.echo("bap-engine: ORCH_MASTER_KEY_PREVIOUS is not set: set it to the old master key and "
                   "ORCH_MASTER_KEY to the new one", err=True)
        raise typer.Exit(EXIT_USAGE)
    if settings.master_key_previous == settings.master_key:
        typer.echo("bap-engine: ORCH_MASTER_KEY_PREVIOUS equals ORCH_MASTER_KEY: set ORCH_MASTER_KEY to the new "
                   "master key", err=True)
        raise typer.Exit(EXIT_USAGE)
    try:
        report = asyncio.run(_rotate_master_key(settings, batch_size, pause, retry_for))
    except Exception as err:  # noqa: BLE001 - one clean line, never a traceback with its locals
        from bap_engine.rekey import RekeyError

        text = str(err).strip().splitlines()
        why = (f"{err}" if isinstance(err, RekeyError) else
               f"{type(err).__name__}: {text[0] if text else 'failed'} (nothing is lost: run it again)")
        typer.echo(redact(f"bap-engine: rotate-master-key: {why}"), err=True)
        raise typer.Exit(1) from None
    for table, row_id in report.unreadable:
        typer.echo(f"bap-engine: {table} {row_id}: a value opens with neither ORCH_MASTER_KEY nor "
                   "ORCH_MASTER_KEY_PREVIOUS (left as it is)", err=True)
    if report.left:
        typer.echo(f"bap-engine: {len(report.left)} row(s) kept changing (an op in flight): run the command again "
                   "before removing ORCH_MASTER_KEY_PREVIOUS: "
                   + ", ".join(f"{t} {i}" for t, i in report.left), err=True)
    if as_json:
        typer.echo(json.dumps(report.as_dict()))
    else:
        state = "done" if report.complete else "incomplete"
        typer.echo(f"master key rotation {state}: {report.reencrypted} re-encrypted, {report.current} already "
                   f"current, {report.changed} changed concurrently ({len(report.left)} left for the next run), "
                   f"{len(report.unreadable)} unreadable")
    raise typer.Exit(1 if report.unreadable else 0)


def _db_password(dsn: str | None) -> tuple[str, ...]:
    from urllib.parse import unquote, urlsplit

    try:
        password = urlsplit(dsn).password if dsn else None
    except ValueError:
        return ()
    return (password, unquote(password)) if password else ()


async def _rotate_master_key(settings: Settings, batch_size: int, pause_s: float, retry_s: float) -> RekeyReport:
    from bap_engine.app import database
    from bap_engine.db.pool import create_pool
    from bap_engine.keys import KeySealer
    from bap_engine.rekey import TableReport, rekey

    assert settings.master_key and settings.master_key_previous

    def progress(t: TableReport) -> None:
        typer.echo(f"rotate-master-key: {t.table}: {t.read} read, {t.reencrypted} re-encrypted, {t.current} "
                   f"already current, {t.changed} changed concurrently, {len(t.unreadable)} unreadable", err=True)

    sealer = KeySealer(settings.master_key, settings.master_key_previous)
    async with database(settings) as dsn:
        pool = await create_pool(dsn, max_size=2)
        try:
            return await rekey(pool, sealer, batch_size=batch_size, pause_s=pause_s, retry_s=retry_s,
                               on_batch=progress)
        finally:
            await pool.close()


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
