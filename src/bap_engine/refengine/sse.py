"""Server-sent events: the ``text/event-stream`` framing of ``POST /execute``.

Owns the byte format only: ``event: <name>\\ndata: <compact json>\\n\\n``. The JSON is ASCII-escaped,
so a payload never contains a raw newline that would split the ``data:`` line.
"""

from __future__ import annotations

from enum import StrEnum

from .wire import json_bytes

__all__ = ["CONTENT_TYPE", "Event", "encode_event"]

CONTENT_TYPE = "text/event-stream"


class Event(StrEnum):
    """The event names an engine emits on ``/execute``."""

    THREAD_LIFECYCLE = "thread_lifecycle"
    TEXT_DELTA = "text_delta"
    DONE = "done"


def encode_event(name: Event, data: dict[str, object]) -> bytes:
    """One SSE event, terminated by the blank line."""
    return b"event: " + name.value.encode() + b"\ndata: " + json_bytes(data) + b"\n\n"
