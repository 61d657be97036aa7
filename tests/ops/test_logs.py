"""JSON logs: the real server's lines (one per request, never a key, through provision, admit and
rotate and every other call the ops tests made on the same server), and the formatter itself:
tracebacks and stacks on one JSON line, every secret shape and registered value scrubbed."""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Iterator

import pytest
from cryptography.fernet import Fernet

from bap_engine.client import BapClient
from bap_engine.keys import new_engine_key, new_platform_key
from bap_engine.logs import REDACTED, JsonFormatter, register_secrets
from tests.ops.conftest import OpsProduct, OpsServer


def test_server_logs_are_json_and_keyless(ops_server: OpsServer, bap: BapClient, product: OpsProduct) -> None:
    engine = bap.provision("logged")
    admission = bap.admit("logged")
    rotated = bap.rotate_key("logged")
    assert bap.call_engine("logged", "GET", "/history").status_code == 200
    bap.destroy("logged")
    keys = [k for k in (engine.api_key, admission.api_key, rotated.api_key) if k]
    ops_server.secrets.extend(keys)

    lines = [line for line in ops_server.logs().splitlines() if line.startswith("{")]
    docs = [json.loads(line) for line in lines]
    requests = [d for d in docs if d.get("logger") == "bap_engine.access"]
    mine = [(d["method"], d["path"], d["status"]) for d in requests if "/logged" in d["path"]]
    assert ("POST", "/engines/logged/admit", 200) in mine and ("POST", "/engines/logged/rotate-key", 200) in mine
    for d in requests:
        assert {"method", "path", "status", "duration_ms", "request_id", "ts", "level"} <= set(d)
    text = ops_server.logs()
    for secret in [*ops_server.secrets, product.platform_key, *keys]:
        assert secret and secret not in text, "a key reached the server log"


@pytest.fixture
def emitted() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A real logger writing JSON lines into a buffer (not propagated: the lines are this test's)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(f"tests.logs.{uuid.uuid4().hex[:8]}")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, out
    logger.removeHandler(handler)


def _one_line(out: io.StringIO) -> dict[str, object]:
    text = out.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1, text
    doc = json.loads(text)
    assert isinstance(doc, dict)
    return doc


def test_exception_is_one_json_line_with_traceback_and_no_secret(
    emitted: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = emitted
    master = Fernet.generate_key().decode()
    admin = "adm-unit-" + uuid.uuid4().hex  # a configured admin key: any string, known only by value
    register_secrets(admin, master)
    secrets = [new_platform_key(), new_engine_key(), Fernet(master).encrypt(b"engine key").decode(), admin, master]
    try:
        raise RuntimeError("boom " + " ".join(secrets))
    except RuntimeError:
        logger.exception("admit failed for %s", secrets[0], extra={"detail": {"keys": secrets[1:3]}})

    doc = _one_line(out)
    assert doc["error"] == "RuntimeError" and str(doc["error_message"]).startswith("boom ")
    traceback = str(doc["traceback"])
    assert traceback.startswith("Traceback (most recent call last):") and "RuntimeError: boom" in traceback
    assert doc["msg"] == f"admit failed for {REDACTED}" and doc["detail"] == {"keys": [REDACTED, REDACTED]}
    text = out.getvalue()
    for secret in secrets:
        assert secret not in text
    assert text.count(REDACTED) == 2 * len(secrets) + 3  # error_message and traceback, msg, detail


def test_stack_info_and_odd_registered_values(emitted: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = emitted
    odd = f'adm "quoted\\ {uuid.uuid4().hex}\n'  # JSON escapes it: still found, line still valid
    register_secrets(odd, None)
    logger.warning("odd %s key", odd, stack_info=True, extra={"webhook": "whsec_" + uuid.uuid4().hex})

    doc = _one_line(out)
    assert doc["msg"] == f"odd {REDACTED} key" and doc["webhook"] == REDACTED
    assert str(doc["stack"]).startswith("Stack (most recent call last):") and "error" not in doc
    assert odd not in json.dumps(doc)


def test_a_line_without_secrets_is_unchanged(emitted: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = emitted
    register_secrets("short")  # too short to tell from words: not registered
    logger.info("request", extra={"method": "POST", "path": "/engines/u1/admit", "status": 200,
                                  "eq": "a=b", "pk": "pk-sept-", "word": "short"})
    doc = _one_line(out)
    assert (doc["msg"], doc["path"], doc["status"], doc["eq"], doc["pk"], doc["word"]) == (
        "request", "/engines/u1/admit", 200, "a=b", "pk-sept-", "short")
