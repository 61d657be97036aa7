"""The client's error codes are the server's: a code added to (or dropped from) one side fails here.

The server's codes are every `BapError` subclass's `code` in bap_engine.errors, plus the few the HTTP
layer answers itself (unknown route, wrong method: the code literals of `envelope(...)` calls in
bap_engine/api/errors.py). The client maps each to one exception class (`ERRORS_BY_CODE`).
"""

from __future__ import annotations

import ast
import inspect

from bap_engine_client import ERRORS_BY_CODE, BapClientError, RetryPolicy
from bap_engine_client import __all__ as client_names

from bap_engine import errors
from bap_engine.api import errors as api_errors

# Codes the client makes up itself (no server answer carries them).
CLIENT_ONLY = {"CLIENT_ERROR", "NOT_ADMITTED", "MISSING_KEY", "CONNECTION_ERROR", "TRANSPORT_ERROR", "BAD_RESPONSE"}


def _domain_codes() -> set[str]:
    found: set[str] = set()
    todo: list[type[errors.BapError]] = [errors.BapError]
    while todo:
        cls = todo.pop()
        found.add(cls.code)
        todo += cls.__subclasses__()
    return found


def _http_layer_codes() -> set[str]:
    """The string constants given as the `code` (second) argument of each `envelope(...)` call."""
    tree = ast.parse(inspect.getsource(api_errors))
    codes: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "envelope":
            if len(node.args) >= 2:
                codes |= {c.value for c in ast.walk(node.args[1])
                          if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    return codes


def test_server_codes_are_found() -> None:
    assert {"ENGINE_NOT_FOUND", "RATE_LIMITED", "INTERNAL_ERROR"} <= _domain_codes()
    assert {"NOT_FOUND", "METHOD_NOT_ALLOWED"} <= _http_layer_codes()


def test_client_and_server_error_codes_are_the_same() -> None:
    server = _domain_codes() | _http_layer_codes()
    client = set(ERRORS_BY_CODE)
    assert not server - client, f"server codes without a client exception: {sorted(server - client)}"
    assert not client - server, f"client exceptions for codes the server never sends: {sorted(client - server)}"


def test_one_exported_exception_class_per_code() -> None:
    classes = list(ERRORS_BY_CODE.values())
    assert len(set(classes)) == len(classes), "two codes share an exception class"
    for code, cls in ERRORS_BY_CODE.items():
        assert issubclass(cls, BapClientError) and cls is not BapClientError, code
        assert cls.code == code, (code, cls)
        assert cls.__name__ in client_names, f"{cls.__name__} is not exported by bap_engine_client"


def test_client_only_codes_are_not_server_codes() -> None:
    assert not CLIENT_ONLY & (_domain_codes() | _http_layer_codes())


def test_retried_codes_exist() -> None:
    known = set(ERRORS_BY_CODE) | CLIENT_ONLY
    assert RetryPolicy().retry_codes <= known, sorted(RetryPolicy().retry_codes - known)
