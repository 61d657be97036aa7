"""The ops CLI (typer + rich) against a running server, through typer's CliRunner."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from bap_engine.cli import app
from tests.conftest import unique_slug
from tests.ops.conftest import OpsProduct, OpsServer


def run(server: OpsServer, *args: str, platform_key: str | None = None, admin: bool = True,
        input: str | None = None) -> tuple[int, str]:
    env = {"BAP_URL": server.url, "BAP_ADMIN_KEY": server.admin_key if admin else "",
           "BAP_PLATFORM_KEY": platform_key or "", "BAP_PRODUCT": "", "COLUMNS": "200"}
    result = CliRunner().invoke(app, list(args), env=env, input=input)
    return result.exit_code, result.output


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
    code, out = run(ops_server, "products", "policy", reg["product_id"], "--set", '{"bogus": 1}')
    assert code == 1 and "VALIDATION_ERROR" in out
    code, out = run(ops_server, "products", "list", admin=False)
    assert code == 2 and "admin key" in out
    code, out = run(ops_server, "engines", "list")
    assert code == 2 and "platform key" in out
