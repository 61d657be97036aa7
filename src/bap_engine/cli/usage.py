"""`bap-engine usage [--since] [--until] [--user]`: what the product's users' engines used (platform key).

A row per user: the time their engine spent running, sleeping and stopped in the window (for a
person: 42s, 12m 05s, 3h 07m, 2d 04h; --wide adds the exact seconds), its provisions, wakes and
restarts; then the totals. The window defaults to the last 24 hours (the server's default); --json
prints the server's figures (whole seconds) as one document.
"""

from __future__ import annotations

from typing import Annotated

import typer

from bap_engine.cli import render
from bap_engine.cli.common import AsJson, PlatformKey, Since, Until, Url, Wide, client
from bap_engine.client import DEFAULT_URL

__all__ = ["usage"]


def usage(url: Url = DEFAULT_URL, platform_key: PlatformKey = None, since: Since = None, until: Until = None,
          user: Annotated[str | None, typer.Option("--user", show_default=False, help="only this user")] = None,
          as_json: AsJson = False, wide: Wide = False) -> None:
    """Time running, sleeping and stopped, provisions, wakes and restarts per user (default: the last 24 h)."""
    with client(url, platform_key) as c:
        report = c.usage(since=since, until=until, user_id=user)
    if as_json:
        render.emit_json(report)
        return
    render.show(render.usage_table(report, wide), wide=wide)
