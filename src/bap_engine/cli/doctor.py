"""`bap-engine doctor`: can this machine serve with this configuration? (the checks are in checks.py)

It reads the same ORCH_* settings as `serve` and checks, in order: the settings, the secrets, the
data directory, the engine port range, the database and its migrations, the engine backend. Each
prints OK, WARN, FAIL (or SKIP when an earlier failure makes it meaningless) with what it found and,
unless OK, what to fix. Exit 0 when nothing FAILs, 1 otherwise; `--json` prints
`{"ok", "counts", "checks": [{"name", "status", "detail", "fix"}]}`. No key or password is printed.

With no ORCH_DATABASE_URL the embedded Postgres under ORCH_DATA_DIR/pg is started (or joined, when a
serve runs) exactly as `bap-engine migrate` does, and stopped again unless another process uses it:
a stopped embedded database is not a fault, a database that cannot start is. Doctor creates nothing
serve would not (ORCH_DATA_DIR/pg when embedded, ORCH_DATA_DIR/engines by the subprocess backend's
ping); it generates no key file, and the write test of the data directory removes its file.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from bap_engine.cli import render
from bap_engine.cli.checks import (
    FAIL,
    SKIP,
    Check,
    check_backend,
    check_data_dir,
    check_database,
    check_ports,
    check_secrets,
    check_settings,
)
from bap_engine.cli.common import AsJson

__all__ = ["doctor", "run_checks"]

LATER = ("secrets", "data dir", "ports", "database", "migrations", "backend")
_STYLES = {"OK": "green", "WARN": "yellow", "FAIL": "bold red", "SKIP": "dim"}


async def run_checks(environ: Mapping[str, str], min_free_mb: int, timeout: float) -> list[Check]:
    """Every check, in order; those an earlier FAIL makes meaningless are SKIP."""
    first, settings = check_settings(environ)
    if settings is None:
        return [first, *(Check(name, SKIP, "needs valid settings") for name in LATER)]
    data_dir = check_data_dir(settings, min_free_mb)
    checks = [first, check_secrets(settings), data_dir, check_ports(settings)]
    data_dir_ok = data_dir.status != FAIL
    if settings.embedded and not data_dir_ok:
        checks += [Check("database", SKIP, "the embedded Postgres needs the data directory"),
                   Check("migrations", SKIP, "needs the database")]
    else:
        checks += await check_database(settings, timeout)
    checks.append(await check_backend(settings, timeout, data_dir_ok))
    return checks


def _counts(checks: Sequence[Check]) -> dict[str, int]:
    return {s: sum(c.status == s for c in checks) for s in ("OK", "WARN", "FAIL", "SKIP")}


def _table(checks: Sequence[Check]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("CHECK", no_wrap=True)
    table.add_column("STATUS", no_wrap=True)
    table.add_column("DETAIL", overflow="fold")
    for c in checks:
        detail = Text(c.detail)
        if c.fix:
            detail.append(f"\nfix: {c.fix}", style="italic")
        table.add_row(Text(c.name), Text(c.status, style=_STYLES[c.status]), detail)
    return table


def doctor(
    as_json: AsJson = False,
    min_free_mb: Annotated[int, typer.Option(min=0, help="WARN when the data directory has less free space")] = 500,
    timeout: Annotated[float, typer.Option(min=0.1, help="seconds for each network check")] = 10.0,
) -> None:
    """Check the configuration, data directory, ports, database and backend; say what to fix."""
    logging.getLogger("pgserver").setLevel(logging.CRITICAL)  # its own start-up chatter is not ours to show
    checks = asyncio.run(run_checks(os.environ, min_free_mb, timeout))
    counts = _counts(checks)
    if as_json:
        render.emit_json({"ok": counts[FAIL] == 0, "counts": counts, "checks": checks})
    else:
        render.show(_table(checks))
        skipped = f", {counts[SKIP]} skipped" if counts[SKIP] else ""
        typer.echo(f"doctor: {counts['OK']} OK, {counts['WARN']} WARN, {counts[FAIL]} FAIL{skipped}")
    raise typer.Exit(1 if counts[FAIL] else 0)
