"""How the CLI shows results: rich tables that fit an 80-column terminal, and JSON for scripts.

Narrow by default: ids cut to their first 8 characters, times to the date or the second, images to
their last path part, the columns that matter first and the slug before the id. `--wide` shows every
value in full. Cells are `Text` (never markup: a user id may hold "[") and fold instead of being cut
into "…", so an unusually long value wraps onto another line rather than losing characters.
`--json` prints one JSON document (the same values, always in full) on stdout.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from bap_engine.client import AuditEvent, Engine, Event, FleetMetrics, FleetStatus, Product, Usage, Webhook

__all__ = ["STATES", "SHORT_ID", "out", "err", "show", "plain", "emit_json", "emit_json_line", "short_id", "when",
           "safe", "duration", "engine_table", "engine_detail", "product_table", "fleet_tables", "audit_grid",
           "event_grid", "usage_table", "webhook_detail", "product_detail"]

STATES = ("provisioning", "running", "sleeping", "stopped", "failed", "destroying")
SHORT_ID = 8


def out() -> Console:
    """stdout; its width is the terminal's, COLUMNS when set, else 80."""
    return Console(highlight=False)


def err() -> Console:
    return Console(stderr=True, highlight=False)


def _print(console: Console, table: Table) -> None:
    with console.capture() as captured:
        console.print(table)
    typer.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))  # no padding at line ends


def show(*tables: Table, wide: bool = False) -> None:
    """Print tables on stdout: fitted to the terminal, or with `wide` as wide as their content
    (never wrapped: a wide table is for a wide terminal, a pager or a file)."""
    console = out()
    for table in tables:
        needed = Measurement.get(console, console.options.update(max_width=10_000), table).maximum
        _print(Console(highlight=False, width=needed) if wide and needed > console.width else console, table)


def plain(value: object) -> object:
    """A result as JSON-ready values (dataclasses as objects, datetimes as ISO 8601 with Z)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    return value


def emit_json(value: object) -> None:
    """One JSON document on stdout."""
    typer.echo(json.dumps(plain(value), indent=2, sort_keys=True))


def emit_json_line(value: object) -> None:
    """One JSON document on one line (what --follow prints per event)."""
    typer.echo(json.dumps(plain(value), sort_keys=True))


def short_id(value: str | None, wide: bool) -> str:
    if not value:
        return "-"
    return value if wide else value[:SHORT_ID]


def when(value: datetime | None, wide: bool, *, seconds: bool = False) -> str:
    """UTC: the date (or date and time with `seconds`) when narrow, ISO 8601 when wide."""
    if value is None:
        return "-"
    if wide:
        return str(plain(value))
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d")


def _image(version: str | None, wide: bool) -> str:
    if not version:
        return "-"
    return version if wide else version.rsplit("/", 1)[-1]


def _table(title: str | None, columns: Sequence[str], *, fixed: Sequence[str] = (),
           right: Sequence[str] = ()) -> Table:
    """No borders (2 spaces between columns), upper-case headers; `fixed` columns never wrap."""
    table = Table(title=title, box=None, title_justify="left", title_style="bold", header_style="bold",
                  pad_edge=False)
    for name in columns:
        table.add_column(name.upper(), no_wrap=name in fixed, overflow="fold",
                         justify="right" if name in right else "left")
    return table


# C0/C1 controls (and DEL) from API values must not reach the terminal: they could move the cursor
# or hide text. They are shown as U+FFFD.
_CONTROLS = dict.fromkeys([*range(0x00, 0x20), *range(0x7F, 0xA0)], "\ufffd")


def safe(value: str) -> str:
    """A value fit for a terminal cell (controls replaced)."""
    return value.translate(_CONTROLS)


def _row(table: Table, *cells: str) -> None:
    table.add_row(*(Text(safe(c)) for c in cells))


def engine_table(engines: Sequence[Engine], title: str, wide: bool) -> Table:
    """user, status, url, version, created; --wide adds the last health check, idle sleep and the engine id."""
    cols = ["user", "status", "url", "version", "created"] + (["last health", "idle sleep", "id"] if wide else [])
    table = _table(title, cols, fixed=("status", "url", "created", "id"))
    for e in engines:
        cells = [e.user_id, e.status, e.url or "-", _image(e.engine_version, wide), when(e.created_at, wide)]
        if wide:
            cells += [when(e.last_health_at, wide), e.idle_sleep or "-", e.engine_id]
        _row(table, *cells)
    return table


def engine_detail(doc: Mapping[str, object], key_shown: str) -> Table:
    """One engine, a field per line, every value in full."""
    table = _table(None, ["field", "value"], fixed=("field",))
    table.show_header = False
    for k, v in doc.items():
        _row(table, k, key_shown if k == "api_key" else str(v if v is not None else "-"))
    return table


def _engines_cell(p: Product) -> str:
    counts = [f"{p.by_status[s]} {s}" for s in STATES if p.by_status.get(s)]
    return f"{p.total} ({', '.join(counts)})" if counts else str(p.total)


def product_table(products: Sequence[Product], wide: bool) -> Table:
    if not wide:
        table = _table(f"{len(products)} products", ["slug", "name", "engines", "id"], fixed=("id",))
        for p in products:
            _row(table, p.slug, p.display_name, _engines_cell(p), short_id(p.product_id, False))
        return table
    table = _table(f"{len(products)} products", ["slug", "name", "total", *STATES, "created", "id"],
                   fixed=("id",), right=("total", *STATES))
    for p in products:
        _row(table, p.slug, p.display_name, str(p.total), *(str(p.by_status.get(s, 0)) for s in STATES),
             when(p.created_at, True), p.product_id)
    return table


def fleet_tables(fleet: FleetStatus, figures: FleetMetrics) -> tuple[Table, Table]:
    """The product's engines by state, and the last hour's figures."""
    warm = f", {fleet.warm} warm in the pool" if fleet.warm else ""
    states = _table(f"fleet: {fleet.total} engines, health {fleet.health}{warm}", STATES, right=STATES)
    _row(states, *(str(fleet.by_status.get(s, 0)) for s in STATES))
    cols = ("provisions", "crashes", "restarts", "avg boot ms", "unhealthy")
    hour = _table("last hour", cols, right=cols)
    avg = "-" if figures.avg_boot_ms is None else f"{figures.avg_boot_ms:.0f}"
    _row(hour, str(figures.provisions_1h), str(figures.crashes_1h), str(figures.restarts_1h), avg,
         str(fleet.unhealthy_count))
    return states, hour


def _meta(metadata: Mapping[str, object]) -> str:
    return " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v, sort_keys=True)}"
                    for k, v in sorted(metadata.items()))


def _event_text(e: AuditEvent | Event, wide: bool) -> str:
    parts = [e.action]
    if e.user_id:
        parts.append(e.user_id)
    parts.append(f"by {e.actor}")
    duration_ms = e.duration_ms if isinstance(e, AuditEvent) else None
    if duration_ms is not None:
        parts.append(f"{duration_ms}ms")
    if e.metadata:
        parts.append(_meta(e.metadata))
    if wide:
        if isinstance(e, AuditEvent):  # (an Event's id has a column of its own)
            parts += [f"#{e.id}", f"product={e.product_id or '-'}"]
        parts.append(f"engine={e.engine_id or '-'}")
    return " ".join(parts)


def audit_grid(events: Sequence[AuditEvent | Event], wide: bool) -> Table:
    """One event per row: its time, then what happened (wrapped under itself, never cut)."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for e in events:
        grid.add_row(Text(when(e.timestamp, wide, seconds=True)), Text(safe(_event_text(e, wide))))
    return grid


def event_grid(events: Sequence[Event], wide: bool) -> Table:
    """Lifecycle events as the audit grid shows rows: time, then `action user by actor meta`; the
    event id (what --after takes) first."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True, justify="right")
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for e in events:
        grid.add_row(Text(str(e.id)), Text(when(e.timestamp, wide, seconds=True)), Text(safe(_event_text(e, wide))))
    return grid


def duration(seconds: int) -> str:
    """Whole seconds for a person: 42s, 12m 05s, 3h 07m, 2d 04h (two units at most, rounded down)."""
    s = max(0, seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


_USAGE_COLS = ("user", "running", "sleeping", "stopped", "provisions", "wakes", "restarts")


def usage_table(report: Usage, wide: bool) -> Table:
    """A row per user, then the totals; durations for a person (--wide: exact seconds too)."""
    window = f"{when(report.since, wide, seconds=True)} to {when(report.until, wide, seconds=True)}"
    table = _table(f"usage {window}{'' if wide else ' UTC'}", _USAGE_COLS, fixed=_USAGE_COLS[1:],
                   right=_USAGE_COLS[1:])

    def spent(s: int) -> str:
        return f"{duration(s)} ({s}s)" if wide and s >= 60 else duration(s)

    for u in report.users:
        _row(table, u.user_id, spent(u.running_s), spent(u.sleeping_s), spent(u.stopped_s), str(u.provisions),
             str(u.wakes), str(u.restarts))
    t = report.totals
    count = len(report.users)
    # a user id holds neither a space nor a parenthesis: this row cannot be mistaken for a user's
    table.add_row(*(Text(safe(c), style="bold") for c in (
        f"total ({count} user{'' if count == 1 else 's'})", spent(t.running_s), spent(t.sleeping_s),
        spent(t.stopped_s), str(t.provisions), str(t.wakes), str(t.restarts))))
    return table


def webhook_detail(product: str, hook: Webhook, wide: bool) -> Table:
    """A product's webhook, a field per line (never its secret)."""
    table = _table(None, ["field", "value"], fixed=("field",))
    table.show_header = False
    for k, v in (("product", product), ("url", hook.url), ("pending", str(hook.pending)),
                 ("last status", "-" if hook.last_status is None else str(hook.last_status)),
                 ("last delivery", when(hook.last_delivery_at, wide, seconds=True))):
        _row(table, k, v)
    return table


def product_detail(p: Product, wide: bool) -> Table:
    """One product (`products show`), a field per line; the policy as compact JSON, folded."""
    table = _table(None, ["field", "value"], fixed=("field",))
    table.show_header = False
    engines = p.engines if p.engines is not None else p.total
    for k, v in (("product", short_id(p.product_id, wide)), ("slug", p.slug), ("name", p.display_name),
                 ("engines", str(engines)), ("created", when(p.created_at, wide, seconds=True)),
                 ("policy", json.dumps(p.policy, sort_keys=True, separators=(", ", ": ")))):
        _row(table, k, v)
    return table
