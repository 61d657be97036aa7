"""GET /events (X-Platform-Key): the calling product's lifecycle events as Server-Sent Events.

One event per audit row but `health_check` and `admit_denied`, oldest first, then live:

    id: <audit id>
    event: <action>
    data: {"id", "timestamp", "action", "user_id", "engine_id", "actor", "metadata"}

`Last-Event-ID: <id>` (what EventSource sends when it reconnects) or `?after_id=<id>` resumes strictly
after that id, so a consumer that reconnects misses nothing and sees nothing twice; the header wins
when both are given (EventSource reconnects to the same URL, query included). Without either, the
stream starts with the events after the moment of connection. The stream opens with `: connected`
and a `retry:` hint, and carries `: keep-alive` whenever nothing was sent for `events_keepalive_s`.

The events come from the process's EventHub (events.py): one listener and one reader per replica,
never a query per consumer per event; a history read (resuming) is the only query of a consumer.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated, get_args

from fastapi import APIRouter, Header, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from bap_engine.api.deps import EventsDep, ProductDep
from bap_engine.api.params import MAX_QUERY_INT, QueryInt
from bap_engine.events import Event, EventHub, Subscription

__all__ = ["router", "EventStream", "sse_frame", "EventsQuery", "EventId"]

router = APIRouter(tags=["events"])

CONNECTED = b": connected\nretry: 2000\n\n"
KEEPALIVE = b": keep-alive\n\n"
_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_FRAMING = (
    "One event per audit row (not `health_check` nor `admit_denied`): `id: <audit id>`, `event: <action>`, "
    '`data: {"id", "timestamp", "action", "user_id", "engine_id", "actor", "metadata"}`; comments '
    "`: connected` first and `: keep-alive` when idle."
)


# an audit id, digits only as every query integer (params.QueryInt's validator); the bounds come first, so
# that on `EventId | None` they stay the integer's own (documented as minimum/maximum)
EventId = Annotated[int, Field(ge=0, le=MAX_QUERY_INT), *get_args(QueryInt)[1:]]


class EventsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    after_id: EventId | None = Field(default=None, description="resume strictly after this audit id "
                                                               "(Last-Event-ID wins)")


def sse_frame(event: Event) -> bytes:
    """The event's SSE frame, encoded once however many consumers receive it."""
    if event.frame is None:
        data = event.json()
        name = event.action.replace("\r", " ").replace("\n", " ").encode()
        event.frame = b"id: %d\nevent: %s\ndata: %s\n\n" % (event.id, name, data)
    return event.frame


class EventStream(StreamingResponse):
    """A text/event-stream response that releases its subscription however the stream ends
    (client gone, hub closed, server shutting down)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], subscription: Subscription) -> None:
        super().__init__(content, headers=_HEADERS, media_type=self.media_type)
        self._subscription = subscription
        self._content = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._subscription.close()
            aclose = getattr(self._content, "aclose", None)
            if aclose is not None:
                await aclose()


async def _stream(request: Request, hub: EventHub, sub: Subscription, after_id: int | None,
                  keepalive_s: float) -> AsyncIterator[bytes]:
    try:
        yield CONNECTED
        sent_at = time.monotonic()
        last = sub.start_id
        if after_id is not None:
            async for page in hub.history(sub, after_id):
                yield b"".join(sse_frame(e) for e in page)
                sent_at = time.monotonic()
            if sub.closed:  # during the history (the hub closing, the queue overflowing, the database
                return  # failing): end here, the client resumes after the last row it got
            last = max(after_id, sub.start_id)
        while True:
            batch = await sub.next_batch(max(0.0, keepalive_s - (time.monotonic() - sent_at)))
            if batch is None:
                return  # closed: the hub shut down, or this consumer fell too far behind
            chunk = b"".join(sse_frame(e) for e in batch if e.id > last)
            if batch:
                last = max(last, batch[-1].id)
            if chunk:
                yield chunk
                sent_at = time.monotonic()
            elif time.monotonic() - sent_at >= keepalive_s:
                yield KEEPALIVE
                sent_at = time.monotonic()
                if await request.is_disconnected():  # a server on ASGI 2.4 tells only here
                    return
    finally:
        sub.close()


@router.get(
    "/events", response_class=EventStream, status_code=200,
    responses={200: {"description": "the product's lifecycle events, then live. " + _FRAMING,
                     "content": {"text/event-stream": {"schema": {"type": "string"}}}}},
)
async def events(
    request: Request, product: ProductDep, hub: EventsDep, query: Annotated[EventsQuery, Query()],
    last_event_id: Annotated[EventId | None, Header(alias="Last-Event-ID",
                                                    description="resume strictly after this audit id")] = None,
) -> EventStream:
    """The calling product's lifecycle events as Server-Sent Events, oldest first, then live."""
    after_id = last_event_id if last_event_id is not None else query.after_id
    sub = hub.subscribe(product.id)  # now: live events past this moment queue up from here on
    keepalive_s = float(request.app.state.settings.events_keepalive_s)
    return EventStream(_stream(request, hub, sub, after_id, keepalive_s), sub)
