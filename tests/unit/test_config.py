"""Settings: defaults, validation into one ConfigError line, and the secrets of embedded mode."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from bap_engine.config import ConfigError, ensure_secrets, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("ORCH_"):
            monkeypatch.delenv(name)


def test_defaults_match_the_spec() -> None:
    s = load_settings()
    assert (s.port_min, s.port_max, s.engine_backend, s.host, s.port) == (9001, 9999, "subprocess", "127.0.0.1", 8000)
    assert (s.health_check_interval_s, s.health_check_timeout_s, s.health_max_failures) == (30, 10, 3)
    assert (s.restart_backoff_base_s, s.restart_backoff_max_s, s.restart_max_attempts, s.boot_timeout_s) == (
        5, 300, 8, 60)
    assert (s.idle_sleep_after_s, s.idle_stop_after_s, s.sleep_mode, s.key_rotation_overlap_s) == (
        900, 86400, "pause", 300)
    assert s.database_url is None and s.embedded and s.deployment == "default"
    assert s.data_dir == Path("./.bap-engine")
    assert s.engine_argv == (sys.executable, "-m", "bap_engine.refengine")


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_PORT_MIN", "7000")
    monkeypatch.setenv("ORCH_PORT_MAX", "7100")
    monkeypatch.setenv("ORCH_ENGINE_COMMAND", "/usr/bin/engine --flag 'two words'")
    monkeypatch.setenv("ORCH_ENGINE_ENV_PASSTHROUGH", " OPENAI_API_KEY, ,LOG_LEVEL ")
    s = load_settings()
    assert (s.port_min, s.port_max) == (7000, 7100)
    assert s.engine_argv == ("/usr/bin/engine", "--flag", "two words")
    assert s.passthrough_names == ["OPENAI_API_KEY", "LOG_LEVEL"]
    assert load_settings(port_min=7050).port_min == 7050  # overrides win


@pytest.mark.parametrize(
    ("env", "value", "named"),
    [("ORCH_PORT", "abc", "ORCH_PORT"), ("ORCH_PORT", "70000", "ORCH_PORT"),
     ("ORCH_ENGINE_BACKEND", "podman", "ORCH_ENGINE_BACKEND"), ("ORCH_BOOT_TIMEOUT_S", "0", "ORCH_BOOT_TIMEOUT_S"),
     ("ORCH_DEPLOYMENT", "Bad_Name", "ORCH_DEPLOYMENT"), ("ORCH_SLEEP_MODE", "nap", "ORCH_SLEEP_MODE"),
     ("ORCH_KEY_ROTATION_OVERLAP_S", "-1", "ORCH_KEY_ROTATION_OVERLAP_S"),
     ("ORCH_HEALTH_MAX_FAILURES", "0", "ORCH_HEALTH_MAX_FAILURES"),
     ("ORCH_ENGINE_MEMORY", "lots", "ORCH_ENGINE_MEMORY"),
     ("ORCH_LOG_LEVEL", "LOUD", "ORCH_LOG_LEVEL")],
)
def test_bad_values_are_one_config_error_line(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, named: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert named in message and "\n" not in message
    assert info.value.__cause__ is None  # no pydantic traceback chained


def test_port_min_above_max(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_PORT_MIN", "9500")
    monkeypatch.setenv("ORCH_PORT_MAX", "9400")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "ORCH_PORT_MIN" in str(info.value) and "\n" not in str(info.value)
    assert load_settings(port_min=9400, port_max=9400).port_min == 9400  # a single port is a range


def test_bad_fernet_master_key_is_named_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "not-a-fernet-key-but-secret-" + "x" * 20
    monkeypatch.setenv("ORCH_MASTER_KEY", secret)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "ORCH_MASTER_KEY" in str(info.value) and secret not in str(info.value)


def test_keys_are_not_in_the_settings_repr() -> None:
    master, admin = Fernet.generate_key().decode(), "adm-secret-value"
    s = load_settings(master_key=master, admin_key=admin)
    assert master not in repr(s) and admin not in repr(s) and master not in str(s)


def test_database_url_requires_the_master_key() -> None:
    with pytest.raises(ConfigError) as info:
        ensure_secrets(load_settings(database_url="postgresql://db/x", admin_key="adm"))
    assert "ORCH_MASTER_KEY" in str(info.value)
    with pytest.raises(ConfigError) as info:
        ensure_secrets(load_settings(database_url="postgresql://db/x", master_key=Fernet.generate_key().decode()))
    assert "ORCH_ADMIN_KEY" in str(info.value)
    with pytest.raises(ConfigError, match="ORCH_MASTER_KEY"):
        ensure_secrets(load_settings(database_url="postgresql://db/x"))
    both = load_settings(database_url="postgresql://db/x", master_key=Fernet.generate_key().decode(), admin_key="a")
    assert ensure_secrets(both) is both


def test_embedded_mode_generates_keys_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "state"
    first = ensure_secrets(load_settings(data_dir=data_dir))
    assert first.master_key and first.admin_key
    Fernet(first.master_key.encode())  # a valid Fernet key
    for name in ("master.key", "admin.key"):
        path = data_dir / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (data_dir / "master.key").read_text().strip() == first.master_key
    assert (data_dir / "admin.key").read_text().strip() == first.admin_key
    again = ensure_secrets(load_settings(data_dir=data_dir))
    assert (again.master_key, again.admin_key) == (first.master_key, first.admin_key)


def test_embedded_mode_keeps_given_keys(tmp_path: Path) -> None:
    master = Fernet.generate_key().decode()
    s = ensure_secrets(load_settings(data_dir=tmp_path, master_key=master))
    assert s.master_key == master
    assert not (tmp_path / "master.key").exists() and (tmp_path / "admin.key").exists()
