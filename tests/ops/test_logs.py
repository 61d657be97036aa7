"""The real server's JSON logs: one line per request, and never a key, through provision, admit and
rotate (and every other call the ops tests made on the same server)."""

from __future__ import annotations

import json

from bap_engine.client import BapClient
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
