"""JSON request logs: one line per request with method, path, status, duration and request id; the
request id is returned as X-Request-ID; no header value ever reaches a log line."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from bap_engine.logs import JsonFormatter
from tests.conftest import ADMIN_KEY, pk, register_product


async def test_one_json_line_per_request(client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    product_id, key = await register_product(client)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="bap_engine.access"):
        r1 = await client.get("/status", headers=pk(key))
        r2 = await client.get(f"/products/{product_id}/engines?status=bogus", headers={"X-Admin-Key": ADMIN_KEY,
                                                                                       "X-Request-ID": "mine"})
        r3 = await client.post("/engines/provision", content=b"x" * 70_000, headers=pk(key))
    lines = [json.loads(JsonFormatter().format(rec)) for rec in caplog.records if rec.name == "bap_engine.access"]
    assert [(line["method"], line["path"], line["status"]) for line in lines] == [
        ("GET", "/status", 200), ("GET", f"/products/{product_id}/engines", 400), ("POST", "/engines/provision", 413)]
    ids = [r.headers["x-request-id"] for r in (r1, r2, r3)]
    assert [line["request_id"] for line in lines] == ids and len(set(ids)) == 3 and "mine" not in ids
    for line in lines:
        assert set(line) >= {"method", "path", "status", "duration_ms", "request_id"}
        assert isinstance(line["duration_ms"], float) and line["level"] == "info"
        text = json.dumps(line)
        assert key not in text and ADMIN_KEY not in text and "bogus" not in text  # no header, no query string
