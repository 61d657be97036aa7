"""One chat turn: store the user message, stream a deterministic echo reply, store the reply.

Owns the reply "model" (``"echo: " + message``) and the order of events of ``POST /execute``:
``thread_lifecycle`` (started), one ``text_delta`` per word, then ``done`` carrying the id of the
stored reply. Concatenating the deltas gives exactly the stored reply.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator

from .sse import Event, encode_event
from .store import MessageStore, Role

__all__ = ["echo_reply", "run_turn", "split_words"]

_WORD = re.compile(r"\S+\s*")


def echo_reply(message: str) -> str:
    """The deterministic reply to ``message``."""
    return "echo: " + message


def split_words(text: str) -> list[str]:
    """Each word with the whitespace that follows it (so the last has none unless the text ends in it)."""
    return _WORD.findall(text)


async def run_turn(
    store: MessageStore, thread_id: str, message: str, delta_delay: float = 0.0
) -> AsyncGenerator[bytes, None]:
    """Yield the SSE bytes of one turn, persisting the user message first and the reply before ``done``.

    If the client goes away mid-stream the generator is closed and the reply is not stored: the
    turn did not complete, exactly as with a real model.
    """
    store.append(thread_id, Role.USER, message)
    yield encode_event(Event.THREAD_LIFECYCLE, {"thread_id": thread_id, "state": "started"})
    reply = echo_reply(message)
    for word in split_words(reply):
        if delta_delay:
            await asyncio.sleep(delta_delay)
        yield encode_event(Event.TEXT_DELTA, {"delta": word})
    stored = store.append(thread_id, Role.ASSISTANT, reply)
    yield encode_event(Event.DONE, {"thread_id": thread_id, "message_id": stored.id})
