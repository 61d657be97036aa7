"""The ops dashboard end to end in headless Chromium (Debian's /usr/bin/chromium driven by Python
playwright): the page loads, asks for the admin key, shows the fleet the test provisioned, and a stop
clicked in the page (confirm accepted) stops the engine. Skips when Chromium or playwright is missing,
unless BAP_REQUIRE_BROWSER=1."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from bap_engine.client import BapClient
from tests.ops.conftest import OpsProduct, OpsServer

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _require_browser() -> None:
    missing = []
    if not (os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        missing.append(f"{CHROMIUM} (apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("python playwright (pip install playwright; never `playwright install`)")
    if missing:
        message = "dashboard browser test needs " + " and ".join(missing)
        if os.environ.get("BAP_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)


def _wait(predicate: object, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def test_dashboard_stop_in_browser(ops_server: OpsServer, bap: BapClient, product: OpsProduct,
                                   tmp_path: Path) -> None:
    _require_browser()
    from playwright.sync_api import Dialog, expect, sync_playwright

    bap.provision("dash-1")
    bap.provision("dash-2")
    dialogs: list[str] = []

    def accept(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("dialog", accept)
            page.goto(f"{ops_server.url}/dashboard?interval=1000#product={product.product_id}")

            page.fill("#admin-key", "wrong-key")
            page.click("#login-submit")
            page.wait_for_selector("#login:not([hidden])")
            assert "rejected" in page.inner_text("#error")
            page.fill("#admin-key", ops_server.admin_key)
            page.click("#login-submit")

            row = page.locator(f'#products tr[data-product="{product.product_id}"]')
            row.locator('td[data-state="running"]').filter(has_text="2").wait_for()
            page.locator("#product:not([hidden])").wait_for()
            page.locator('#engines tr[data-user="dash-1"] [data-status="running"]').wait_for()
            assert page.inner_text("#m-provisions") == "2"
            assert page.locator('#boot .bar').count() == 8
            assert page.locator('#audit tr[data-action="provision"]').count() == 2

            page.select_option("#status-filter", "running")
            page.click('#engines tr[data-user="dash-1"] button[data-action="stop"]')
            _wait(lambda: bap.get("dash-1").status == "stopped")
            page.select_option("#status-filter", "")
            page.locator('#engines tr[data-user="dash-1"] [data-status="stopped"]').wait_for()
            assert page.locator('#engines tr[data-user="dash-2"] [data-status="running"]').count() == 1
            page.select_option("#status-filter", "stopped")
            expect(page.locator("#engines tbody tr")).to_have_count(1)  # the filter applies (CSP forbids eval)
            assert page.locator('#audit tr[data-action="stop"]').count() == 1

            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert not errors, errors
        finally:
            browser.close()
    assert dialogs and "dash-1" in dialogs[0] and product.slug in dialogs[0]
    assert bap.get("dash-2").status == "running"
    assert shot.stat().st_size > 10_000
    kept = Path(os.environ.get("BAP_SCREENSHOT_DIR", tmp_path))
    if kept != tmp_path:
        kept.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, kept / shot.name)
    print(f"dashboard screenshot: {shot}")  # noqa: T201
    for user in ("dash-1", "dash-2"):
        bap.destroy(user)
