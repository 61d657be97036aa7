"""`bap-engine doctor` through the installed entry point, configured like `serve` by ORCH_* variables.

The healthy setup is the test Postgres and the `settings` fixture of tests/conftest.py (passed as
ORCH_* the way tests/e2e/conftest.py does); each failure case breaks one thing of it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bap_engine.config import Settings
from tests.conftest import next_port_range
from tests.e2e.conftest import free_port

EXE = str(Path(sys.executable).with_name("bap-engine"))
NAMES = ["settings", "secrets", "data dir", "ports", "database", "migrations", "backend"]


def _env(settings: Settings | None, **orch: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "BAP_"))}
    env["COLUMNS"] = "80"
    if settings is not None:
        env.update({"ORCH_DATABASE_URL": settings.database_url or "", "ORCH_MASTER_KEY": settings.master_key or "",
                    "ORCH_ADMIN_KEY": settings.admin_key or "", "ORCH_DATA_DIR": str(settings.data_dir),
                    "ORCH_PORT_MIN": str(settings.port_min), "ORCH_PORT_MAX": str(settings.port_max),
                    "ORCH_DEPLOYMENT": settings.deployment})
    env.update({f"ORCH_{k.upper()}": v for k, v in orch.items()})
    return {k: v for k, v in env.items() if v != "-"}  # "-": unset it


def doctor(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, "doctor", *args], env=env, capture_output=True, text=True, timeout=120, check=False)


def checks(env: dict[str, str]) -> tuple[int, dict[str, dict[str, str]]]:
    """Exit status and the checks by name, from --json (which must be one JSON document)."""
    ran = doctor(env, "--json")
    doc = json.loads(ran.stdout)
    assert [c["name"] for c in doc["checks"]] == NAMES, doc
    assert ran.returncode in (0, 1) and doc["ok"] is (ran.returncode == 0) is (doc["counts"]["FAIL"] == 0), doc
    return ran.returncode, {c["name"]: c for c in doc["checks"]}


def assert_no_secret(text: str, settings: Settings) -> None:
    for secret in (settings.admin_key, settings.master_key):
        assert secret and secret not in text


def test_healthy_setup_is_all_ok(settings: Settings) -> None:
    env = _env(settings)
    code, found = checks(env)
    low_disk = shutil.disk_usage(settings.data_dir).free < 500 * 2**20  # a WARN, not this test's business
    assert code == 0, found
    assert {n: c["status"] for n, c in found.items()} == {n: "WARN" if n == "data dir" and low_disk else "OK"
                                                          for n in NAMES}, found
    assert "schema at head" in found["migrations"]["detail"]
    assert f"{settings.port_min}..{settings.port_max}" in found["ports"]["detail"]

    shown = doctor(env)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "…" not in shown.stdout and max(len(line) for line in shown.stdout.splitlines()) <= 80, shown.stdout
    assert shown.stdout.splitlines()[-1] == ("doctor: 6 OK, 1 WARN, 0 FAIL" if low_disk else
                                             "doctor: 7 OK, 0 WARN, 0 FAIL"), shown.stdout
    assert_no_secret(shown.stdout + shown.stderr, settings)
    assert [p.name for p in settings.data_dir.iterdir() if p.name.startswith(".bap-doctor")] == []


def test_bad_database_url_fails_naming_the_database(settings: Settings) -> None:
    env = _env(settings, database_url=f"postgresql://bap:s3cret-pw@127.0.0.1:{free_port()}/bap")
    code, found = checks(env)
    assert code == 1
    assert found["database"]["status"] == "FAIL" and "127.0.0.1" in found["database"]["detail"], found
    assert "ORCH_DATABASE_URL" in found["database"]["fix"] and found["migrations"]["status"] == "SKIP"
    assert all(found[n]["status"] == "OK" for n in ("settings", "secrets", "data dir", "ports", "backend")), found
    shown = doctor(env)
    assert shown.returncode == 1 and "database" in shown.stdout and "FAIL" in shown.stdout
    assert "s3cret-pw" not in shown.stdout + shown.stderr + json.dumps(found)
    assert_no_secret(shown.stdout + shown.stderr, settings)


def test_unusable_data_dir_fails(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    broken = [tmp_path / "a-file" / "data", tmp_path / "missing" / "data", tmp_path / "a-file"]
    if os.geteuid() != 0:  # root writes anywhere: only a path through a file stops it
        (tmp_path / "read-only").mkdir(mode=0o500)
        broken.append(tmp_path / "read-only")
    for data_dir in broken:
        code, found = checks(_env(settings, data_dir=str(data_dir)))
        assert code == 1 and found["data dir"]["status"] == "FAIL", (data_dir, found)
        assert str(data_dir.parent) in found["data dir"]["detail"] and found["data dir"]["fix"], found
        assert found["backend"]["status"] == "SKIP" and found["database"]["status"] == "OK", found
    assert not (tmp_path / "missing").exists()  # doctor made nothing


def test_invalid_and_unknown_settings(settings: Settings) -> None:
    code, found = checks(_env(settings, port_min="5000", port_max="4000"))
    assert code == 1 and found["settings"]["status"] == "FAIL" and "ORCH_PORT_MIN" in found["settings"]["detail"]
    assert {found[n]["status"] for n in NAMES[1:]} == {"SKIP"}, found
    code, found = checks(_env(settings, databse_url="postgresql://typo"))
    assert code == 0 and found["settings"]["status"] == "WARN" and "ORCH_DATABSE_URL" in found["settings"]["detail"]
    code, found = checks(_env(settings, master_key="-"))
    assert code == 1 and found["secrets"]["status"] == "FAIL" and "ORCH_MASTER_KEY" in found["secrets"]["detail"]
    code, found = checks(_env(settings, engine_command="/nonexistent/engine --flag"))
    assert code == 1 and found["backend"]["status"] == "FAIL" and "/nonexistent/engine" in found["backend"]["detail"]
    code, found = checks(_env(settings, port=str(settings.port_min)))
    assert code == 0 and found["ports"]["status"] == "WARN" and "ORCH_PORT" in found["ports"]["detail"], found


def test_embedded_database_is_started_then_stopped() -> None:
    """No ORCH_DATABASE_URL: doctor starts the embedded Postgres like `migrate` and stops it after.

    The data dir is outside pytest's tmp root: as root, pgserver runs Postgres as another user."""
    base = Path(tempfile.mkdtemp(prefix="bap-doctor-"))
    try:
        low, high = next_port_range()
        env = _env(None, data_dir=str(base / "data"), port_min=str(low), port_max=str(high))
        code, found = checks(env)
        assert code == 0, found
        assert found["database"]["status"] == "OK" and "embedded" in found["database"]["detail"], found
        assert found["migrations"]["status"] == "WARN" and "bap-engine migrate" in found["migrations"]["fix"]
        assert found["secrets"]["status"] == "OK" and "generated" in found["secrets"]["detail"]
        assert not (base / "data" / "admin.key").exists() and not (base / "data" / "master.key").exists()
        assert not (base / "data" / "pg" / "postmaster.pid").exists()  # stopped again: nobody else used it
    finally:
        shutil.rmtree(base, ignore_errors=True)
