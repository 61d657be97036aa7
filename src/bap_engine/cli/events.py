"""`bap-engine events [--follow] [--after ID]`: the product's lifecycle events (platform key).

Without --follow it prints the events that exist now and exits: it reads them from GET /audit (the
product's audit rows, newest first, page by page) and leaves out the rows that are not events
(`health_check`, `admit_denied`), exactly what GET /events streams. This is deterministic (it ends
at the newest row of the moment, however busy the product) where reading the stream until it went
quiet would not be. With `--after ID`: every event after that id; without: the newest `--limit`
(default 20). Oldest first.

With --follow it then reads GET /events from the newest audit id it saw, so nothing is missed nor
printed twice between the two, and keeps printing until Ctrl-C (exit 0); the client reconnects by
itself (with Last-Event-ID) when the connection drops or the server ends the stream.

Each event is one line: its id (what --after takes), its time (UTC) and what happened; `--json`
prints a JSON array, or with --follow one JSON object per line.
"""

from __future__ import annotations

from typing import Annotated

import typer

from bap_engine.cli import render
from bap_engine.cli.common import PlatformKey, Url, Wide, client
from bap_engine.client import DEFAULT_URL, AuditEvent, BapClient, Event
from bap_engine.events import HIDDEN_ACTIONS

__all__ = ["events", "history", "DEFAULT_LIMIT"]

DEFAULT_LIMIT = 20
_HIDDEN = frozenset(HIDDEN_ACTIONS)


def _event(row: AuditEvent) -> Event:
    return Event(id=row.id, timestamp=row.timestamp, action=row.action, user_id=row.user_id,
                 engine_id=row.engine_id, actor=row.actor, metadata=row.metadata)


def history(c: BapClient, after: int | None, limit: int | None) -> tuple[list[Event], int | None]:
    """The events after `after` (None: all), at most the newest `limit`, oldest first; and the newest
    audit id seen (of any row, an event or not: where a stream resumes), None when there is none."""
    found: list[Event] = []
    newest: int | None = None
    for row in c.iter_audit(page_size=100 if limit is None else min(100, max(limit, 10))):
        newest = row.id if newest is None else newest
        if after is not None and row.id <= after:
            break
        if row.action in _HIDDEN:
            continue
        found.append(_event(row))
        if limit is not None and len(found) >= limit:
            break
    found.reverse()
    return found, newest


def _print(events: list[Event], as_json: bool, wide: bool) -> None:
    if as_json:
        for e in events:
            render.emit_json_line(e)
    elif events:
        render.show(render.event_grid(events, wide), wide=wide)


def events(url: Url = DEFAULT_URL, platform_key: PlatformKey = None,
           after: Annotated[int | None, typer.Option("--after", min=0, show_default=False,
                                                     help="every event after this id")] = None,
           limit: Annotated[int | None, typer.Option(min=1, show_default=False,
                                                     help=f"at most the newest N (default {DEFAULT_LIMIT}, "
                                                          "without --after)")] = None,
           follow: Annotated[bool, typer.Option("--follow", "-f", help="then keep printing new events until "
                                                                       "Ctrl-C")] = False,
           as_json: Annotated[bool, typer.Option("--json", help="a JSON array; with --follow one JSON object per "
                                                                "line")] = False,
           wide: Wide = False) -> None:
    """The product's lifecycle events, oldest first; --follow keeps printing them live (platform key)."""
    cap = limit if limit is not None else (None if after is not None else DEFAULT_LIMIT)
    with client(url, platform_key) as c:
        try:
            past, newest = history(c, after, cap)
            if not follow:
                if as_json:
                    render.emit_json(past)
                else:
                    _print(past, False, wide)
                return
            _print(past, as_json, wide)
            resume = max((i for i in (newest, after) if i is not None), default=0)
            for event in c.events(after_id=resume):
                _print([event], as_json, wide)
        except KeyboardInterrupt:
            return  # Ctrl-C ends --follow: a normal end, exit 0
