"""The second wave of CLI commands against a running server: events, usage, webhook, audit list,
engines idle-sleep. Same conventions as test_cli.py: tables fit 80 columns, --json is one document,
exit codes 0 / 1 / 2, no control character from the API on the terminal."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bap_engine.cli import render
from bap_engine.cli.common import parse_instant
from bap_engine.client import BapClient, Usage, UsageTotals, UserUsage
from tests.ops.conftest import OpsProduct, OpsServer
from tests.ops.test_cli import assert_fits_80, invoke


def test_events_lists_and_filters(ops_server: OpsServer, product: OpsProduct, bap: BapClient) -> None:
    pk = product.platform_key
    bap.provision("ce-a")
    bap.stop("ce-a")

    listed = invoke(ops_server, "events", platform_key=pk, columns=80)
    assert_fits_80(listed)
    lines = listed.stdout.splitlines()
    assert any("provision ce-a by" in line for line in lines) and "stop ce-a by" in lines[-1], listed.stdout

    doc = json.loads(invoke(ops_server, "events", "--json", platform_key=pk).stdout)
    assert [e["action"] for e in doc if e["user_id"] == "ce-a"] == ["provision", "stop"]
    assert set(doc[0]) == {"id", "timestamp", "action", "user_id", "engine_id", "actor", "metadata"}
    provision = next(e for e in doc if e["action"] == "provision")

    after = json.loads(invoke(ops_server, "events", "--after", str(provision["id"]), "--json", platform_key=pk).stdout)
    assert [e["action"] for e in after] == ["stop"]
    assert json.loads(invoke(ops_server, "events", "--limit", "1", "--json", platform_key=pk).stdout)[0][
        "action"] == "stop"
    assert invoke(ops_server, "events", "--after", "-1", platform_key=pk).exit_code == 2
    no_key = invoke(ops_server, "events")
    assert no_key.exit_code == 2 and "platform key" in no_key.stderr, no_key.output
    bad = invoke(ops_server, "events", platform_key="pk-sept-wrong")
    assert bad.exit_code == 1 and "INVALID_PLATFORM_KEY" in bad.stderr, bad.output
    bap.destroy("ce-a")


def _read_until(proc: subprocess.Popen[bytes], wanted: str, timeout: float) -> list[str]:
    """The lines the process prints, until one holds `wanted` (read from the pipe's fd: a buffered
    readline could hold lines select() no longer reports)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    lines: list[str] = []
    pending = b""
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sel.select(timeout=0.2):
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        pending += chunk
        *done, pending = pending.split(b"\n")
        lines += [line.decode() for line in done]
        if any(wanted in line for line in lines):
            return lines
    raise AssertionError(f"{wanted!r} not printed within {timeout}s: {lines}")


def test_events_follow_prints_live_events_and_exits_0_on_sigint(ops_server: OpsServer, product: OpsProduct,
                                                               bap: BapClient) -> None:
    exe = str(Path(sys.executable).with_name("bap-engine"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "BAP_"))}
    env.update({"BAP_URL": ops_server.url, "BAP_PLATFORM_KEY": product.platform_key, "COLUMNS": "80"})
    proc = subprocess.Popen([exe, "events", "--follow", "--json"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        time.sleep(1.5)  # the command reads the history, then opens the stream: events after that are live
        assert proc.poll() is None
        bap.provision("cf-a")
        bap.stop("cf-a")
        lines = _read_until(proc, '"action": "stop"', 30)
        actions = [json.loads(line)["action"] for line in lines if '"cf-a"' in line]
        assert actions == ["provision", "stop"], lines
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert b"Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    bap.destroy("cf-a")


def test_usage_table_and_json(ops_server: OpsServer, product: OpsProduct, bap: BapClient) -> None:
    pk = product.platform_key
    bap.provision("cu-a")
    bap.provision("cu-b.with-a-longer-user-id-42")
    bap.stop("cu-a")
    table = invoke(ops_server, "usage", platform_key=pk, columns=80)
    assert_fits_80(table)
    header = table.stdout.splitlines()[1].split()
    assert header == ["USER", "RUNNING", "SLEEPING", "STOPPED", "PROVISIONS", "WAKES", "RESTARTS"], table.stdout
    assert "cu-a" in table.stdout and "total (2 users)" in table.stdout and " UTC" in table.stdout.splitlines()[0]

    doc = json.loads(invoke(ops_server, "usage", "--json", "--since", "1h", platform_key=pk).stdout)
    assert {u["user_id"] for u in doc["users"]} == {"cu-a", "cu-b.with-a-longer-user-id-42"}
    assert doc["totals"]["provisions"] == 2 and set(doc) == {"since", "until", "users", "totals"}
    naive = (datetime.now(UTC) - timedelta(hours=1)).replace(tzinfo=None).isoformat()  # no offset: UTC
    one = json.loads(invoke(ops_server, "usage", "--json", "--user", "cu-a", "--since", naive, "--until", "0s",
                            platform_key=pk).stdout)
    assert [u["user_id"] for u in one["users"]] == ["cu-a"]
    assert invoke(ops_server, "usage", "--wide", platform_key=pk).exit_code == 0
    assert invoke(ops_server, "usage", "--since", "yesterday", platform_key=pk).exit_code == 2
    late = invoke(ops_server, "usage", "--since", "0s", "--until", "1h", platform_key=pk)
    assert late.exit_code == 1 and "VALIDATION_ERROR" in late.stderr, late.output  # since after until
    for user in ("cu-a", "cu-b.with-a-longer-user-id-42"):
        bap.destroy(user)


def test_webhook_set_prints_the_secret_once_and_show_never(ops_server: OpsServer, product: OpsProduct) -> None:
    made = invoke(ops_server, "webhook", "set", product.slug, "https://example.org/hooks/bap")
    assert made.exit_code == 0, made.output
    secret = made.stdout.split("secret: ", 1)[1].split()[0]
    ops_server.secrets.append(secret)
    assert secret.startswith("whsec_") and made.output.count(secret) == 1
    assert "shown only once" in made.stderr

    for args in (["webhook", "show", product.slug], ["webhook", "show", product.product_id[:8], "--json"],
                 ["webhook", "show", product.slug, "--wide"]):
        shown = invoke(ops_server, *args, columns=80)
        assert shown.exit_code == 0 and secret not in shown.output and "whsec_" not in shown.output, shown.output
        assert "https://example.org/hooks/bap" in shown.stdout
    assert_fits_80(invoke(ops_server, "webhook", "show", product.slug, columns=80))
    doc = json.loads(invoke(ops_server, "webhook", "show", product.slug, "--json").stdout)
    assert doc["product_id"] == product.product_id and doc["pending"] >= 0 and doc["last_status"] is None

    as_json = invoke(ops_server, "webhook", "set", product.slug, "https://example.org/2", "--json")
    again = json.loads(as_json.stdout)
    ops_server.secrets.append(again["secret"])
    assert again["secret"] != secret and again["url"] == "https://example.org/2"

    gone = invoke(ops_server, "webhook", "delete", product.slug)
    assert gone.exit_code == 0 and "deleted" in gone.stdout, gone.output
    missing = invoke(ops_server, "webhook", "show", product.slug)
    assert missing.exit_code == 1 and "WEBHOOK_NOT_FOUND" in missing.stderr, missing.output
    assert invoke(ops_server, "webhook", "set", product.slug, "ftp://nope").exit_code == 1  # VALIDATION_ERROR
    assert invoke(ops_server, "webhook", "show", product.slug, admin=False).exit_code == 2  # no admin key


def test_idle_sleep_audit_list_and_tail(ops_server: OpsServer, product: OpsProduct, bap: BapClient) -> None:
    pk = product.platform_key
    bap.provision("ci-a")
    out = invoke(ops_server, "engines", "idle-sleep", "ci-a", "never", platform_key=pk)
    assert out.exit_code == 0 and out.stdout.strip() == "ci-a: idle sleep never (running)", out.output
    shown = json.loads(invoke(ops_server, "engines", "show", "ci-a", "--json", platform_key=pk).stdout)
    assert shown["idle_sleep"] == "never"
    back = json.loads(invoke(ops_server, "engines", "idle-sleep", "ci-a", "auto", "--json", platform_key=pk).stdout)
    assert back["idle_sleep"] == "auto" and back["api_key"] is None
    assert invoke(ops_server, "engines", "idle-sleep", "ci-a", "sometimes", platform_key=pk).exit_code == 2
    assert invoke(ops_server, "engines", "idle-sleep", "nobody", "never", platform_key=pk).exit_code == 1
    wide = invoke(ops_server, "engines", "list", "--wide", platform_key=pk)
    assert "IDLE SLEEP" in wide.stdout and "auto" in wide.stdout, wide.stdout
    bap.stop("ci-a")

    rows = json.loads(invoke(ops_server, "audit", "list", "--page-size", "2", "--all", "--json",
                             platform_key=pk).stdout)
    ids = [r["id"] for r in rows]
    assert len(ids) >= 5 and ids == sorted(set(ids), reverse=True)  # every page, each row once
    assert [r.id for r in bap.iter_audit()] == ids
    stops = json.loads(invoke(ops_server, "audit", "list", "--user", "ci-a", "--action", "stop", "--json",
                              platform_key=pk).stdout)
    assert [r["action"] for r in stops] == ["stop"]
    assert len(json.loads(invoke(ops_server, "audit", "list", "--limit", "3", "--page-size", "2", "--json",
                                 platform_key=pk).stdout)) == 3
    listed = invoke(ops_server, "audit", "list", "--since", "10m", platform_key=pk, columns=80)
    assert_fits_80(listed)
    assert "settings_update ci-a by" in listed.stdout, listed.stdout

    tail = invoke(ops_server, "audit", "tail", "--limit", "2", platform_key=pk, admin=False, columns=80)
    assert_fits_80(tail)
    assert tail.stdout.splitlines()[-1].split()[2] == "stop", tail.stdout
    followed = invoke(ops_server, "audit", "tail", "--limit", "1", "--json", "--follow", "--interval", "0.05",
                      "--polls", "2", platform_key=pk, admin=False)
    assert followed.exit_code == 0 and [json.loads(x)["action"] for x in followed.stdout.splitlines()] == ["stop"]
    assert invoke(ops_server, "audit", "list", "--since", "soon", platform_key=pk).exit_code == 2

    status = json.loads(invoke(ops_server, "status", "--json", platform_key=pk).stdout)
    assert status["status"]["warm"] == 0
    bap.destroy("ci-a")


def test_usage_rendering_fits_80_columns(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Rendering alone (no server): large figures and a control character in a user id."""
    monkeypatch.setenv("COLUMNS", "80")
    at = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)
    users = tuple(UserUsage(user_id=u, running_s=3 * 86400 + 7, sleeping_s=86399, stopped_s=59, provisions=12345,
                            wakes=99999, restarts=1000)
                  for u in ("alice", "bob.smith-42", "user-0042@example.org", "evil\x1b[2Jname"))
    report = Usage(since=at, until=at, users=users, totals=UsageTotals(running_s=4 * 3 * 86400, sleeping_s=3600,
                                                                       stopped_s=0, provisions=49380,
                                                                       wakes=399996, restarts=4000))
    render.show(render.usage_table(report, False))
    shown = capsys.readouterr().out
    assert "\x1b" not in shown and max(len(line) for line in shown.splitlines()) <= 80, shown
    assert len(shown.splitlines()) == 2 + len(users) + 1 and "3d 00h" in shown and "23h 59m" in shown, shown
    assert [render.duration(s) for s in (0, 59, 60, 3599, 3600, 86400)] == ["0s", "59s", "1m 00s", "59m 59s",
                                                                            "1h 00m", "1d 00h"]
    assert parse_instant("24h", now=at) == datetime(2025, 3, 13, 9, 26, 53, tzinfo=UTC)
    assert parse_instant("2025-03-14T10:26:53+01:00") == at == parse_instant("2025-03-14 09:26:53")
