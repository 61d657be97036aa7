"""`bap-engine products show|delete|rotate-key` against a running server. Same conventions as
test_cli.py: tables fit 80 columns, --json is one document, exit codes 0 / 1 / 2, no control
character from the API on the terminal, a key printed once and only by the command that shows it."""

from __future__ import annotations

import json
import uuid

import pytest

from bap_engine.cli import products as products_cli
from bap_engine.client import BapClient, InvalidPlatformKey
from tests.conftest import unique_slug
from tests.ops.conftest import OpsProduct, OpsServer
from tests.ops.test_cli import assert_fits_80, invoke


def test_products_show(ops_server: OpsServer, admin: BapClient, product: OpsProduct) -> None:
    for ref in (product.slug, product.product_id, product.product_id[:8]):
        shown = invoke(ops_server, "products", "show", ref, columns=80)
        assert_fits_80(shown)
        assert product.slug in shown.stdout and "Ops test product" in shown.stdout, shown.stdout
        assert product.platform_key not in shown.output and "pk-sept-" not in shown.output
    fields = [line.split()[0] for line in invoke(ops_server, "products", "show", product.slug).stdout.splitlines()]
    assert fields[:6] == ["product", "slug", "name", "engines", "created", "policy"], fields
    doc = json.loads(invoke(ops_server, "products", "show", product.slug, "--json").stdout)
    assert doc["product_id"] == product.product_id and doc["engines"] == 0 and doc["slug"] == product.slug
    assert set(doc) == {"product_id", "slug", "display_name", "policy", "created_at", "engines"}
    wide = invoke(ops_server, "products", "show", product.slug, "--wide")
    assert wide.exit_code == 0 and product.product_id in wide.stdout, wide.output

    missing = invoke(ops_server, "products", "show", str(uuid.uuid4()))
    assert missing.exit_code == 1 and "PRODUCT_NOT_FOUND" in missing.stderr, missing.output
    assert invoke(ops_server, "products", "show", "no-such-slug-here").exit_code == 1
    assert invoke(ops_server, "products", "show", product.slug, admin=False).exit_code == 2  # no admin key


def test_products_show_makes_api_values_safe(ops_server: OpsServer, admin: BapClient) -> None:
    reg = admin.register_product(unique_slug("opsctl"), "evil\x1b[2J name " + "x" * 120)
    ops_server.secrets.append(reg.platform_api_key)
    shown = invoke(ops_server, "products", "show", reg.slug, columns=80)
    assert_fits_80(shown)
    assert "\x1b" not in shown.stdout and "x" * 40 in shown.stdout.replace("\n", "").replace(" ", "")
    admin.delete_product(reg.product_id)


def test_products_delete_needs_yes_without_a_terminal(ops_server: OpsServer, admin: BapClient,
                                                      product: OpsProduct) -> None:
    refused = invoke(ops_server, "products", "delete", product.slug)
    assert refused.exit_code == 2 and "--yes" in refused.stderr, refused.output
    assert admin.get_product(product.product_id).slug == product.slug  # nothing deleted


def test_products_delete_with_an_engine(ops_server: OpsServer, admin: BapClient, product: OpsProduct,
                                        bap: BapClient) -> None:
    bap.provision("cpd-a")
    gone = invoke(ops_server, "products", "delete", product.slug, "--yes")
    assert gone.exit_code == 0, gone.output
    assert gone.stdout.strip() == f"product {product.slug} deleted (1 engine destroyed)", gone.stdout
    with pytest.raises(InvalidPlatformKey):
        bap.status()
    again = invoke(ops_server, "products", "delete", product.product_id, "--yes")
    assert again.exit_code == 1 and "PRODUCT_NOT_FOUND" in again.stderr, again.output
    assert invoke(ops_server, "products", "delete", product.slug, "--yes").exit_code == 1  # slug gone too


def test_products_delete_json_and_confirmation(ops_server: OpsServer, admin: BapClient,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(products_cli, "_interactive", lambda: True)
    reg = admin.register_product(unique_slug("opsctl"), "To delete")
    ops_server.secrets.append(reg.platform_api_key)
    declined = invoke(ops_server, "products", "delete", reg.slug, input="n\n")
    assert declined.exit_code == 1 and "Delete product" in declined.stderr, declined.output
    assert admin.get_product(reg.product_id).slug == reg.slug
    done = invoke(ops_server, "products", "delete", reg.slug, "--json", input="y\n")
    assert done.exit_code == 0, done.output
    body = done.stdout[done.stdout.index("{"):]  # (CliRunner echoes the typed answer on stdout)
    assert json.loads(body) == {"product_id": reg.product_id, "status": "deleted", "engines_destroyed": 0}


def test_products_rotate_key_prints_it_once(ops_server: OpsServer, product: OpsProduct) -> None:
    rotated = invoke(ops_server, "products", "rotate-key", product.slug, columns=80)
    assert_fits_80(rotated)
    assert rotated.stdout.splitlines()[0] == f"platform key of {product.slug} rotated", rotated.stdout
    key = rotated.stdout.split("new key: ", 1)[1].strip()
    ops_server.secrets.append(key)
    assert key.startswith("pk-sept-") and key != product.platform_key and rotated.output.count(key) == 1
    assert "shown only once" in rotated.stderr and key not in rotated.stderr
    with BapClient(ops_server.url, platform_key=product.platform_key) as old, pytest.raises(InvalidPlatformKey):
        old.status()
    with BapClient(ops_server.url, platform_key=key) as new:
        assert new.status().total == 0

    doc = json.loads(invoke(ops_server, "products", "rotate-key", product.product_id[:8], "--overlap", "300",
                            "--json").stdout)
    ops_server.secrets.append(doc["platform_api_key"])
    assert set(doc) == {"product_id", "platform_api_key"} and doc["product_id"] == product.product_id
    for k in (key, doc["platform_api_key"]):  # the replaced key works for the overlap
        with BapClient(ops_server.url, platform_key=k) as b:
            assert b.status().total == 0
    shown = invoke(ops_server, "products", "show", product.slug, "--json")
    assert doc["platform_api_key"] not in shown.output and key not in shown.output

    assert invoke(ops_server, "products", "rotate-key", product.slug, "--overlap", "86401").exit_code == 2
    assert invoke(ops_server, "products", "rotate-key", product.slug, "--overlap", "-1").exit_code == 2
    missing = invoke(ops_server, "products", "rotate-key", str(uuid.uuid4()))
    assert missing.exit_code == 1 and "PRODUCT_NOT_FOUND" in missing.stderr, missing.output
