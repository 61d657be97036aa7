"""HTTP methods around the routes: HEAD answered as GET without a body, and the `Allow` header of a 405.

Health checkers and load balancers probe with HEAD, and RFC 9110 wants HEAD wherever GET is served;
FastAPI's routes answer only the methods they declare. `HeadAsGet` runs a HEAD request as a GET (the
same auth, status and headers, Content-Length included) and drops the body, so every GET route,
present or future, answers HEAD with nothing to declare per route.

Starlette's 405 names the methods of the first route whose path matched; `allowed_methods` collects
them over every route matching the path (`GET /engines/{user_id}` and `DELETE /engines/{user_id}`
are two routes), plus HEAD where GET is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi.routing import iter_route_contexts
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["HeadAsGet", "allowed_methods"]


class HeadAsGet:
    """Pure ASGI middleware: HEAD → GET for the app, body dropped on the way out."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        finished = False

        async def send_headers_only(message: Message) -> None:
            nonlocal finished
            if message["type"] == "http.response.body":
                if finished:  # a streamed body goes on: nothing more to send
                    return
                finished = True
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        # a copy: the server keeps reading its own scope, whose method stays HEAD
        await self.app({**scope, "method": "GET"}, receive, send_headers_only)


def allowed_methods(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The Allow header for a request whose path some route matches but not with this method."""
    probe = {**scope, "method": "\x00"}  # matches no route's methods: every path match is PARTIAL
    methods: set[str] = set()
    for route in iter_route_contexts(routes):
        match, _ = route.matches(probe)
        if match is not Match.NONE:
            methods |= set(route.methods or ())
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))
