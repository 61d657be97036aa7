"""The ops CLI (typer + rich) against a running server, through typer's CliRunner.

Besides the commands themselves: every table fits 80 columns (no line longer, no "…"), --wide shows
full ids, --json prints one JSON document on stdout, and the exit codes are 0 / 1 (API error or no
server, `bap-engine: CODE: message` on stderr) / 2 (usage, missing key, invalid ORCH_* setting).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from rich.cells import cell_len
from typer.testing import CliRunner, Result

from bap_engine.cli import app, render
from bap_engine.client import AuditEvent, Engine, FleetMetrics, FleetStatus, Product
from tests.conftest import unique_slug
from tests.e2e.conftest import free_port
from tests.ops.conftest import OpsProduct, OpsServer


def invoke(server: OpsServer, *args: str, platform_key: str | None = None, admin: bool = True,
           input: str | None = None, columns: int = 200, url: str | None = None,
           env: dict[str, str] | None = None) -> Result:
    base = {"BAP_URL": url or server.url, "BAP_ADMIN_KEY": server.admin_key if admin else "",
            "BAP_PLATFORM_KEY": platform_key or "", "BAP_PRODUCT": "", "COLUMNS": str(columns)}
    return CliRunner().invoke(app, list(args), env={**base, **(env or {})}, input=input)


def run(server: OpsServer, *args: str, platform_key: str | None = None, admin: bool = True,
        input: str | None = None) -> tuple[int, str]:
    result = invoke(server, *args, platform_key=platform_key, admin=admin, input=input)
    return result.exit_code, result.output


def assert_fits_80(result: Result, *, own_ellipses: bool = False) -> None:
    """No line wider than 80 cells, no "…" (unless a value shown holds one: `own_ellipses`), no
    control character (values from the API, e.g. a fuzzed product name, are made safe)."""
    assert result.exit_code == 0, result.output
    assert own_ellipses or "…" not in result.stdout, result.stdout
    assert not any(c in result.stdout for c in map(chr, [*range(0x20), *range(0x7F, 0xA0)]) if c != "\n")
    too_long = [line for line in result.stdout.splitlines() if cell_len(line) > 80]
    assert too_long == [], result.stdout


def test_engines_status_products_audit(ops_server: OpsServer, product: OpsProduct) -> None:
    pk = product.platform_key
    code, out = run(ops_server, "engines", "provision", "cli-a", "cli-b", platform_key=pk)
    assert code == 0 and "2 done, 0 failed" in out, out

    code, out = run(ops_server, "engines", "list", "--json", platform_key=pk)
    page = json.loads(out)
    assert code == 0 and page["total"] == 2 and {e["user_id"] for e in page["engines"]} == {"cli-a", "cli-b"}
    code, out = run(ops_server, "engines", "list", "--product", product.product_id, admin=True)
    assert code == 0 and "cli-a" in out and "2 of 2 engines" in out, out

    code, out = run(ops_server, "engines", "show", "cli-a", platform_key=pk)
    assert code == 0 and "cli-a" in out and "sk-sept-" not in out and "hidden" in out, out
    code, out = run(ops_server, "engines", "show", "cli-a", "--json", "--show-key", platform_key=pk)
    shown = json.loads(out)
    assert shown["api_key"].startswith("sk-sept-")
    ops_server.secrets.append(shown["api_key"])

    code, out = run(ops_server, "engines", "stop", "cli-a", platform_key=pk)
    assert code == 0 and "cli-a: stopped" in out, out
    code, out = run(ops_server, "engines", "stop", "cli-a", platform_key=pk)
    assert code == 1 and "ENGINE_NOT_RUNNING" in out, out
    code, out = run(ops_server, "engines", "start", "cli-a", "--product", product.product_id)
    assert code == 0 and "cli-a: running" in out, out
    code, out = run(ops_server, "engines", "rotate-key", "cli-a", platform_key=pk)
    assert code == 0 and "key rotated" in out and "sk-sept-" not in out, out
    code, out = run(ops_server, "engines", "rotate-key", "cli-b", "--product", product.product_id)
    assert code == 0 and "key rotated" in out, out

    code, out = run(ops_server, "status", "--json", platform_key=pk)
    doc = json.loads(out)
    assert code == 0 and doc["status"]["by_status"]["running"] == 2 and doc["metrics"]["provisions_1h"] == 2
    code, out = run(ops_server, "status", platform_key=pk)
    assert code == 0 and "health ok" in out, out
    code, out = run(ops_server, "status")
    assert code == 0 and product.slug in out, out

    code, out = run(ops_server, "audit", "tail", "--product", product.product_id, "--limit", "3")
    assert code == 0 and out.splitlines()[-1].split()[2] == "rotate_key", out
    code, out = run(ops_server, "audit", "tail", "--product", product.product_id, "--limit", "1", "--follow",
                    "--interval", "0.05", "--polls", "2")
    assert code == 0 and len(out.splitlines()) == 1, out

    code, out = run(ops_server, "engines", "destroy", "--all", platform_key=pk, input="n\n")
    assert code == 1 and "Aborted" in out, out
    code, out = run(ops_server, "engines", "destroy", "--all", "--yes", "--product", product.product_id)
    assert code == 0 and "2 done, 0 failed" in out, out
    code, out = run(ops_server, "engines", "list", "--json", platform_key=pk)
    assert json.loads(out)["total"] == 0


def test_products_commands(ops_server: OpsServer) -> None:
    slug = unique_slug("cli")
    code, out = run(ops_server, "products", "register", "--remote", "--slug", slug, "--display-name", "CLI",
                    "--policy", '{"max_engines": 3}')
    assert code == 0, out
    reg = json.loads(out)
    ops_server.secrets.append(reg["platform_api_key"])
    code, out = run(ops_server, "products", "list", "--json")
    assert code == 0 and slug in {p["slug"] for p in json.loads(out)}
    code, out = run(ops_server, "products", "policy", reg["product_id"])
    assert code == 0 and json.loads(out) == {"max_engines": 3}
    code, out = run(ops_server, "products", "policy", reg["product_id"], "--set", '{"rate_limit_rpm": 100}')
    assert code == 0 and json.loads(out) == {"rate_limit_rpm": 100}
    code, out = run(ops_server, "products", "policy", slug)  # a slug names the product too
    assert code == 0 and json.loads(out) == {"rate_limit_rpm": 100}
    code, out = run(ops_server, "products", "policy", reg["product_id"], "--set", '{"bogus": 1}')
    assert code == 1 and "VALIDATION_ERROR" in out
    code, out = run(ops_server, "products", "list", admin=False)
    assert code == 2 and "admin key" in out
    code, out = run(ops_server, "engines", "list")
    assert code == 2 and "platform key" in out


def test_tables_fit_80_columns(ops_server: OpsServer, product: OpsProduct) -> None:
    pk = product.platform_key
    assert invoke(ops_server, "engines", "provision", "alice", "bob.smith-42", platform_key=pk).exit_code == 0
    assert invoke(ops_server, "engines", "stop", "bob.smith-42", platform_key=pk).exit_code == 0
    short = product.product_id[:8]

    engines = invoke(ops_server, "engines", "list", platform_key=pk, columns=80)
    assert_fits_80(engines)
    assert "alice" in engines.stdout and "bob.smith-42" in engines.stdout and "refengine:0.1.0" in engines.stdout
    header = engines.stdout.splitlines()[1].split()
    assert header == ["USER", "STATUS", "URL", "VERSION", "CREATED"], engines.stdout
    assert_fits_80(invoke(ops_server, "engines", "list", "--product", short, columns=80))

    fleet = invoke(ops_server, "status", platform_key=pk, columns=80)
    assert_fits_80(fleet)
    assert "health ok" in fleet.stdout and "PROVISIONING" in fleet.stdout and "AVG BOOT MS" in fleet.stdout

    # every product of the test database is listed: other suites' names may be long, or hold a "…"
    listed = json.loads(invoke(ops_server, "products", "list", "--json").stdout)
    own_ellipses = any("…" in p["display_name"] or "…" in p["slug"] for p in listed)
    for args in (["status"], ["products", "list"]):
        products = invoke(ops_server, *args, columns=80)
        assert_fits_80(products, own_ellipses=own_ellipses)
        assert products.stdout.splitlines()[1].split() == ["SLUG", "NAME", "ENGINES", "ID"], products.stdout
        assert short in products.stdout and product.product_id not in products.stdout, products.stdout

    audit = invoke(ops_server, "audit", "tail", "--product", product.slug, "--limit", "20", columns=80)
    assert_fits_80(audit)
    assert "provision alice by" in audit.stdout and "stop bob.smith-42 by" in audit.stdout, audit.stdout

    wide = invoke(ops_server, "products", "list", "--wide", columns=80)
    assert wide.exit_code == 0 and product.product_id in wide.stdout
    engine_id = json.loads(invoke(ops_server, "engines", "show", "alice", "--json", platform_key=pk).stdout)
    wide = invoke(ops_server, "engines", "list", "--wide", platform_key=pk, columns=80)
    assert wide.exit_code == 0 and engine_id["engine_id"] in wide.stdout and "bap-engine/refengine" in wide.stdout
    assert len(wide.stdout.splitlines()) == 4, wide.stdout  # title, header, two rows: never wrapped
    assert invoke(ops_server, "engines", "destroy", "--all", "--yes", platform_key=pk).exit_code == 0


def test_json_everywhere(ops_server: OpsServer, product: OpsProduct) -> None:
    """Each command's --json is one JSON document on stdout, whatever goes to stderr."""
    pk = product.platform_key

    def doc(*args: str, admin_call: bool = False, code: int = 0) -> Any:
        result = invoke(ops_server, *args, "--json", platform_key=None if admin_call else pk)
        assert result.exit_code == code, result.output
        return json.loads(result.stdout)

    made = doc("engines", "provision", "j-a", "j-b")
    assert made["done"] == 2 and made["failed"] == 0
    assert [r["result"]["api_key"] for r in made["results"]] == [None, None]  # no key without --show-key
    assert isinstance(doc("engines", "list"), dict)
    assert doc("engines", "show", "j-a")["user_id"] == "j-a"
    stopped = doc("engines", "stop", "j-a")
    assert stopped["results"][0]["result"]["status"] == "stopped"
    again = doc("engines", "stop", "j-a", "j-b", code=1)  # j-a is stopped already: one failure, exit 1
    assert again["done"] == 1 and again["results"][0]["error"]["code"] == "ENGINE_NOT_RUNNING"
    assert doc("engines", "start", "j-a", "--product", product.slug, admin_call=True)["done"] == 1
    rotated = doc("engines", "rotate-key", "j-a")
    assert rotated["api_key"] is None and rotated["user_id"] == "j-a"
    assert set(doc("status")) == {"status", "metrics"}
    assert isinstance(doc("status", admin_call=True), list)
    assert isinstance(doc("products", "list", admin_call=True), list)
    assert doc("products", "policy", product.product_id, admin_call=True) == {}
    events = doc("audit", "tail", "--product", product.product_id, admin_call=True)
    assert isinstance(events, list) and {e["action"] for e in events} >= {"provision", "stop", "rotate_key"}

    follow = invoke(ops_server, "audit", "tail", "--product", product.product_id, "--limit", "3", "--json",
                    "--follow", "--interval", "0.05", "--polls", "1")
    assert follow.exit_code == 0 and [json.loads(line)["action"] for line in follow.stdout.splitlines()][-1] == (
        "rotate_key"), follow.output
    gone = doc("engines", "destroy", "--all", "--yes")
    assert gone["done"] == 2 and gone["failed"] == 0
    assert doc("engines", "destroy", "--all", "--yes") == {"done": 0, "failed": 0, "results": []}


def test_exit_codes(ops_server: OpsServer, product: OpsProduct) -> None:
    pk = product.platform_key
    missing = invoke(ops_server, "engines", "show", "nobody", platform_key=pk)  # 1: the API's error, its code
    assert missing.exit_code == 1 and missing.stdout == "", missing.output
    assert missing.stderr.startswith("bap-engine: ENGINE_NOT_FOUND: "), missing.stderr
    unknown = invoke(ops_server, "engines", "list", "--product", "no-such-product")
    assert unknown.exit_code == 1 and "PRODUCT_NOT_FOUND" in unknown.stderr, unknown.output

    down = invoke(ops_server, "status", url=f"http://127.0.0.1:{free_port()}")  # 1: no server there
    assert down.exit_code == 1 and "CONNECTION_ERROR" in down.stderr and "cannot reach" in down.stderr, down.output
    assert "Traceback" not in down.output

    usage = [  # 2: usage errors, before any request
        ["engines", "list", "--status", "bogus"], ["engines", "list", "--limit", "0"],
        ["audit", "tail", "--action", "bogus"], ["status", "--url", "ftp://example.org"],
        ["products", "policy", product.product_id, "--set", "[1]"], ["products", "policy", product.product_id,
                                                                   "--set", "{"],
        ["products", "register", "--slug", "x", "--display-name", "X", "--policy", "[]"], ["engines", "frobnicate"],
    ]
    for args in usage:
        result = invoke(ops_server, *args, platform_key=pk)
        assert result.exit_code == 2, (args, result.output)
    no_key = invoke(ops_server, "products", "list", admin=False)
    assert no_key.exit_code == 2 and "BAP_ADMIN_KEY" in no_key.stderr, no_key.output

    for name, value in (("ORCH_PORT_MIN", "99999"), ("ORCH_ENGINE_BACKEND", "bogus")):
        bad = invoke(ops_server, "migrate", env={name: value})  # 2: an invalid setting, named
        assert bad.exit_code == 2 and name in bad.stderr, bad.output


def _bap_engine(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    exe = str(Path(sys.executable).with_name("bap-engine"))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "BAP_"))}
    return subprocess.run([exe, *args], env={**base, **env}, capture_output=True, text=True, timeout=120,
                          check=False)


def test_migrate_json_and_config_error_exit_code(ops_server: OpsServer) -> None:
    """Through the installed entry point (main()), not CliRunner."""
    s = ops_server.settings
    env = {"ORCH_DATABASE_URL": s.database_url or "", "ORCH_MASTER_KEY": s.master_key or "",
           "ORCH_ADMIN_KEY": ops_server.admin_key, "ORCH_DATA_DIR": str(s.data_dir)}
    done = _bap_engine("migrate", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["migrated"] is True
    bad = _bap_engine("migrate", env={**env, "ORCH_PORT_MIN": "70000"})
    assert bad.returncode == 2 and "ORCH_PORT_MIN" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_typical_values_render_one_row_per_line_at_80_columns(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Rendering alone (no server): typical ids, slugs, names and URLs fit a row on one 80-column line."""
    monkeypatch.setenv("COLUMNS", "80")
    at = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)
    engines = [Engine(engine_id=str(uuid.uuid4()), user_id=user, status=state, url=f"http://127.0.0.1:{29990 + i}",
                      engine_version="bap-engine/refengine:0.1.0", created_at=at, last_health_at=at)
               for i, (user, state) in enumerate(zip(("alice", "bob.smith-42", "user-0042", "carol", "dave", "eve"),
                                                     render.STATES, strict=True))]
    products = [Product(product_id=str(uuid.uuid4()), slug=slug, display_name=name, policy={}, created_at=at,
                        by_status={"running": 3, "sleeping": 2}, total=5)
                for slug, name in (("ops-0123456789ab", "Ops test product"), ("assistant-backend", "Assistant"))]
    fleet = FleetStatus(total=6, by_status=dict.fromkeys(render.STATES, 1), health="degraded", unhealthy_count=1)
    figures = FleetMetrics(provisions_1h=120, crashes_1h=3, restarts_1h=2, avg_boot_ms=1234.5, total_provisions=9000,
                           total_destroys=8000)
    events = [AuditEvent(id=123456, timestamp=at, product_id=products[0].product_id, user_id="bob.smith-42",
                         engine_id=engines[1].engine_id, action="auto_restart_gave_up", actor="ops-0123456789ab",
                         metadata={"engine_version": "bap-engine/refengine:0.1.0", "port": 29991, "attempts": 8},
                         duration_ms=15234)]
    cases = [(render.engine_table(engines, "6 of 6 engines", False), 2 + len(engines)),
             (render.product_table(products, False), 2 + len(products)), *((t, 3) for t in render.fleet_tables(
                 fleet, figures)), (render.audit_grid(events, False), None)]
    for table, lines in cases:
        render.show(table)
        shown = capsys.readouterr().out
        assert "…" not in shown and max(len(line) for line in shown.splitlines()) <= 80, shown
        assert lines is None or len(shown.splitlines()) == lines, shown
    render.show(render.audit_grid(events, True), wide=True)  # --wide: one line per event, however long
    assert len(capsys.readouterr().out.splitlines()) == 1
