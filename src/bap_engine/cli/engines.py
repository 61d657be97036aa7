"""`bap-engine engines list|show|provision|stop|start|destroy|rotate-key|idle-sleep`, over HTTP through the client.

With the platform key they act on that product's engines; with `--product` (id, id prefix or slug)
and the admin key, on any product's. Batches (several users, `destroy --all`) show a progress bar on
stderr, go on after a failure and end with `N done, M failed` (exit 1 when M > 0); with `--json` they
print `{"done", "failed", "results": [{"user_id", "ok", "result", "error"}]}` instead, without the bar.
Keys are printed only with --show-key. `idle-sleep USER never` keeps an engine awake (platform key).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, TypeVar

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from bap_engine.cli import render
from bap_engine.cli.common import (
    AdminKey,
    AsJson,
    PlatformKey,
    ProductRef,
    ShowKey,
    Url,
    Wide,
    client,
    resolve_product,
)
from bap_engine.client import DEFAULT_URL, BapClient, BapClientError, Engine, EngineAction, EnginePage, MissingKey
from bap_engine.states import EngineState

__all__ = ["engines_app"]

T = TypeVar("T")

engines_app = typer.Typer(no_args_is_help=True, help="A product's engines (platform key), or any product's "
                                                     "with --product and the admin key.")
Users = Annotated[list[str], typer.Argument(help="user ids", show_default=False)]
Status = Annotated[EngineState | None, typer.Option(help="only engines in this state", show_default=False)]


@dataclass(frozen=True, slots=True)
class Outcome:
    user_id: str
    result: object = None
    error: BapClientError | None = None


def _spin(message: str, fn: Callable[[], T], quiet: bool) -> T:
    if quiet:
        return fn()
    with render.err().status(message):
        return fn()


def _each(label: str, users: Sequence[str], fn: Callable[[str], object], quiet: bool) -> list[Outcome]:
    """Run fn per user (with a progress bar unless quiet); never stops half-way (but for a missing key)."""
    outcomes: list[Outcome] = []
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=render.err(), transient=False, disable=quiet) as progress:
        task = progress.add_task(label, total=len(users))
        for user in users:
            progress.update(task, description=f"{label} {user}")
            try:
                outcomes.append(Outcome(user, fn(user)))
            except MissingKey:
                raise
            except BapClientError as e:
                outcomes.append(Outcome(user, error=e))
            progress.advance(task)
    return outcomes


def _doc(result: object, show_key: bool) -> object:
    doc = render.plain(result)
    if isinstance(result, Engine) and isinstance(doc, dict):
        doc["api_key"] = result.api_key if show_key else None
    return doc


def _report(outcomes: Sequence[Outcome], as_json: bool, show_key: bool = False) -> None:
    failed = [o for o in outcomes if o.error is not None]
    for o in failed:
        assert o.error is not None
        typer.echo(f"bap-engine: {o.user_id}: {o.error.code}: {o.error.message}", err=True)
    if as_json:
        render.emit_json({"done": len(outcomes) - len(failed), "failed": len(failed), "results": [
            {"user_id": o.user_id, "ok": o.error is None, "result": _doc(o.result, show_key),
             "error": None if o.error is None else {"code": o.error.code, "message": o.error.message}}
            for o in outcomes]})
    else:
        typer.echo(f"{len(outcomes) - len(failed)} done, {len(failed)} failed")
    if failed:
        raise typer.Exit(1)


def _mask(key: str | None, show: bool) -> str:
    if not key:
        return "-"
    return key if show else "(hidden; --show-key prints it)"


@engines_app.command("list")
def engines_list(url: Url = DEFAULT_URL, platform_key: PlatformKey = None, admin_key: AdminKey = None,
                 product: ProductRef = None, status: Status = None,
                 limit: Annotated[int, typer.Option(min=1, max=1000, help="at most this many")] = 100,
                 offset: Annotated[int, typer.Option(min=0, help="skip this many")] = 0,
                 as_json: AsJson = False, wide: Wide = False) -> None:
    """List engines, oldest first (never with keys)."""
    state = status.value if status else None
    with client(url, platform_key, admin_key) as c:
        pid = resolve_product(c, product)
        page: EnginePage = c.product_engines(pid, state, limit, offset) if pid else c.list_engines(state, limit, offset)
    if as_json:
        render.emit_json(page)
        return
    render.show(render.engine_table(page.engines, f"{len(page.engines)} of {page.total} engines", wide), wide=wide)


@engines_app.command("show")
def engines_show(user_id: str, url: Url = DEFAULT_URL, platform_key: PlatformKey = None, admin_key: AdminKey = None,
                 product: ProductRef = None, show_key: ShowKey = False, as_json: AsJson = False) -> None:
    """One engine (its key only with --show-key, and only with the platform key)."""
    with client(url, platform_key, admin_key) as c:
        pid = resolve_product(c, product)
        engine = c.product_engine(pid, user_id) if pid else c.get(user_id)
    doc = _doc(engine, show_key)
    assert isinstance(doc, dict)
    if as_json:
        render.emit_json(doc)
        return
    render.show(render.engine_detail(doc, _mask(engine.api_key, show_key)))


@engines_app.command("provision")
def engines_provision(users: Users, url: Url = DEFAULT_URL, platform_key: PlatformKey = None,
                      engine_version: Annotated[str | None, typer.Option(help="image/version override")] = None,
                      show_key: ShowKey = False, as_json: AsJson = False) -> None:
    """Provision engines for one or more users (platform key), with a progress bar."""
    with client(url, platform_key) as c:
        _report(_each("provisioning", users, lambda u: c.provision(u, engine_version), as_json), as_json, show_key)


def _action(c: BapClient, verb: str, product: str | None) -> Callable[[str], EngineAction]:
    pid = resolve_product(c, product)
    if pid:
        admin = {"stop": c.admin_stop, "start": c.admin_start, "destroy": c.admin_destroy}[verb]
        return lambda u: admin(pid, u)
    return {"stop": c.stop, "start": c.start, "destroy": c.destroy}[verb]


def _act(verb: str, url: str, platform_key: str | None, admin_key: str | None, product: str | None,
         users: Sequence[str], as_json: bool, batch: bool = False) -> None:
    """One user: a spinner and `user: status`; several (or `batch`, or --json): `_each` and `_report`."""
    with client(url, platform_key, admin_key) as c:
        fn = _action(c, verb, product)
        if len(users) == 1 and not (as_json or batch):
            result = _spin(f"{verb} {users[0]}…", lambda: fn(users[0]), False)
            typer.echo(f"{users[0]}: {result.status}")
            return
        _report(_each(verb, users, fn, as_json), as_json)


@engines_app.command("stop")
def engines_stop(users: Users, url: Url = DEFAULT_URL, platform_key: PlatformKey = None, admin_key: AdminKey = None,
                 product: ProductRef = None, as_json: AsJson = False) -> None:
    """Stop engines (SIGTERM, grace, SIGKILL; data kept)."""
    _act("stop", url, platform_key, admin_key, product, users, as_json)


@engines_app.command("start")
def engines_start(users: Users, url: Url = DEFAULT_URL, platform_key: PlatformKey = None,
                  admin_key: AdminKey = None, product: ProductRef = None, as_json: AsJson = False) -> None:
    """Start stopped, sleeping or failed engines and wait until healthy."""
    _act("start", url, platform_key, admin_key, product, users, as_json)


@engines_app.command("destroy")
def engines_destroy(users: Annotated[list[str] | None, typer.Argument(help="user ids", show_default=False)] = None,
                    url: Url = DEFAULT_URL, platform_key: PlatformKey = None, admin_key: AdminKey = None,
                    product: ProductRef = None,
                    all_: Annotated[bool, typer.Option("--all", help="every engine")] = False,
                    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False,
                    as_json: AsJson = False) -> None:
    """Destroy engines and their data (--all: every engine of the product), with a progress bar."""
    targets = list(users or [])
    with client(url, platform_key, admin_key) as c:
        pid = resolve_product(c, product)
        if all_:
            targets = _spin("listing engines…", lambda: _all_users(c, pid), as_json)
        if not targets:
            if as_json:
                _report([], True)
            else:
                typer.echo("nothing to destroy")
            return
        if not yes:
            typer.confirm(f"Destroy {len(targets)} engine(s) and their data?", abort=True, err=True)
    _act("destroy", url, platform_key, admin_key, pid, targets, as_json, batch=all_)


def _all_users(c: BapClient, product_id: str | None) -> list[str]:
    users: list[str] = []
    while True:
        page = (c.product_engines(product_id, None, 1000, len(users)) if product_id
                else c.list_engines(None, 1000, len(users)))
        users += [e.user_id for e in page.engines]
        if not page.engines or len(users) >= page.total:
            return users


class IdleSleepMode(enum.StrEnum):
    auto = "auto"
    never = "never"


@engines_app.command("idle-sleep")
def engines_idle_sleep(user_id: str,
                       mode: Annotated[IdleSleepMode, typer.Argument(help="never: keep the engine awake; auto: "
                                                                          "let it sleep when idle", metavar="MODE")],
                       url: Url = DEFAULT_URL, platform_key: PlatformKey = None, as_json: AsJson = False) -> None:
    """Keep an engine awake (never) or let it sleep when idle again (auto); no state change."""
    with client(url, platform_key) as c:
        engine = c.set_idle_sleep(user_id, "never" if mode is IdleSleepMode.never else "auto")
    if as_json:
        render.emit_json(_doc(engine, False))
        return
    typer.echo(f"{render.safe(engine.user_id)}: idle sleep {render.safe(engine.idle_sleep or mode.value)} "
               f"({render.safe(engine.status)})")


@engines_app.command("rotate-key")
def engines_rotate_key(user_id: str, url: Url = DEFAULT_URL, platform_key: PlatformKey = None,
                       admin_key: AdminKey = None, product: ProductRef = None, show_key: ShowKey = False,
                       as_json: AsJson = False) -> None:
    """Give a running engine a new key (the old one works for the overlap window)."""
    with client(url, platform_key, admin_key) as c:
        pid = resolve_product(c, product)
        if pid:
            result = _spin(f"rotating the key of {user_id}…", lambda: c.admin_rotate_key(pid, user_id), as_json)
            if as_json:
                render.emit_json(result)
            else:
                typer.echo(f"{user_id}: key rotated ({result.status}); the product gets it from admit")
            return
        engine = _spin(f"rotating the key of {user_id}…", lambda: c.rotate_key(user_id), as_json)
    if as_json:
        render.emit_json(_doc(engine, show_key))
        return
    typer.echo(f"{user_id}: key rotated; new key: {_mask(engine.api_key, show_key)}")
