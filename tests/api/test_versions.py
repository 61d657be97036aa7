"""Engine versions: `engine_version` names a version the backend knows (subprocess: a key of
ORCH_ENGINE_COMMANDS, or the default ORCH_ENGINE_IMAGE); an unknown one is 400 before anything
is created, wherever it comes from (provision body, pinned policy, admit's auto-provision)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from bap_engine.config import ConfigError, Settings, load_settings
from tests.conftest import ADMIN_KEY, assert_envelope, engine_dir, pk, pool_of, register_product, unique_slug


def marked_engine(version: str) -> str:
    """The reference engine, started through `sh` which first appends `version` to `ran-version`
    in the engine's data directory (its cwd): which command ran is visible there."""
    script = f'echo {version} >> ran-version; exec "$0" -m bap_engine.refengine'
    return shlex.join(("sh", "-c", script, sys.executable))


VERSIONS = {"v1": marked_engine("v1"), "v2": marked_engine("v2"), "broken": shlex.join(("sh", "-c", "exit 3"))}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"engine_commands": VERSIONS})


def ran(settings: Settings, engine_id: str) -> list[str]:
    path = engine_dir(settings, engine_id) / "ran-version"
    return path.read_text().split() if path.exists() else []


async def _engine_count(app: FastAPI, product_id: str) -> int:
    return int(await pool_of(app).fetchval("SELECT count(*) FROM engines WHERE product_id = $1", product_id))


async def test_each_engine_runs_its_own_version(client: httpx.AsyncClient, settings: Settings) -> None:
    _, key = await register_product(client)
    r = await client.post("/engines/provision", json={"user_id": "one", "engine_version": "v1"}, headers=pk(key))
    assert r.status_code == 200, r.text
    one = r.json()["engine_id"]
    r = await client.post("/engines/provision", json={"user_id": "two", "engine_version": "v2"}, headers=pk(key))
    assert r.status_code == 200, r.text
    two = r.json()["engine_id"]
    assert (ran(settings, one), ran(settings, two)) == (["v1"], ["v2"])
    assert (await client.get("/engines/two", headers=pk(key))).json()["engine_version"] == "v2"
    # a stopped engine starts again on its own version
    assert (await client.post("/engines/two/stop", headers=pk(key))).status_code == 200
    assert (await client.post("/engines/two/start", headers=pk(key))).status_code == 200
    assert ran(settings, two) == ["v2", "v2"]
    # the default version (ORCH_ENGINE_IMAGE) is known too
    r = await client.post("/engines/provision", json={"user_id": "three"}, headers=pk(key))
    assert r.status_code == 200, r.text
    assert (await client.get("/engines/three", headers=pk(key))).json()["engine_version"] == settings.engine_image
    assert ran(settings, r.json()["engine_id"]) == []  # the reference engine itself, no wrapper
    for user in ("one", "two", "three"):
        assert (await client.delete(f"/engines/{user}", headers=pk(key))).status_code == 200


async def test_unknown_version_is_refused_before_anything_is_created(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings
) -> None:
    product_id, key = await register_product(client)
    r = await client.post("/engines/provision", json={"user_id": "u", "engine_version": "v9"}, headers=pk(key))
    assert_envelope(r, 400, "VALIDATION_ERROR")
    assert "v9" in r.json()["error"]["message"]
    assert await _engine_count(app, product_id) == 0
    engines = Path(settings.data_dir) / "engines"
    assert not engines.exists() or list(engines.iterdir()) == []
    actions = await pool_of(app).fetch("SELECT action FROM audit_log WHERE product_id = $1", product_id)
    assert [a["action"] for a in actions] == ["policy_register"]


async def test_a_policy_cannot_pin_an_unknown_version(client: httpx.AsyncClient, app: FastAPI) -> None:
    slug = unique_slug()
    body = {"slug": slug, "display_name": "P", "policy": {"engine_version": "nope"}}
    r = await client.post("/products/register", json=body, headers={"X-Admin-Key": ADMIN_KEY})
    assert_envelope(r, 400, "VALIDATION_ERROR")
    assert "nope" in r.json()["error"]["message"]
    assert await pool_of(app).fetchval("SELECT count(*) FROM products WHERE slug = $1", slug) == 0

    product_id, key = await register_product(client, {"engine_version": "v2"})  # a known one is fine
    r = await client.put(f"/products/{product_id}/policy", headers={"X-Admin-Key": ADMIN_KEY},
                         json={"policy": {"engine_version": "nope", "max_engines": 3}})
    assert_envelope(r, 400, "VALIDATION_ERROR")
    stored = await pool_of(app).fetchval("SELECT policy FROM products WHERE id = $1", product_id)
    assert stored == {"engine_version": "v2"}


async def test_admit_provisions_the_pinned_version_and_refuses_an_unknown_one(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings
) -> None:
    product_id, key = await register_product(client, {"engine_version": "v2"})
    r = await client.post("/engines/alice/admit", json={"auto_provision": True}, headers=pk(key))
    assert r.status_code == 200 and r.json()["admitted"], r.text
    engine = r.json()["engine"]
    assert engine["engine_version"] == "v2" and ran(settings, engine["engine_id"]) == ["v2"]
    # a version pinned earlier that the backend no longer has (its configuration changed)
    await pool_of(app).execute("UPDATE products SET policy = $2 WHERE id = $1", product_id,
                               {"engine_version": "gone"})
    r = await client.post("/engines/bob/admit", json={"auto_provision": True}, headers=pk(key))
    assert_envelope(r, 400, "VALIDATION_ERROR")
    assert "gone" in r.json()["error"]["message"]
    assert await _engine_count(app, product_id) == 1
    assert (await client.delete("/engines/alice", headers=pk(key))).status_code == 200


def test_engine_commands_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_ENGINE_COMMANDS", '{"v2": "/opt/engine --flag \'two words\'"}')
    monkeypatch.setenv("ORCH_ENGINE_IMAGE", "v1")
    monkeypatch.delenv("ORCH_ENGINE_COMMAND", raising=False)
    s = load_settings()
    assert s.engine_versions == {"v2": ("/opt/engine", "--flag", "two words"), "v1": s.engine_argv}
    monkeypatch.setenv("ORCH_ENGINE_COMMAND", "/opt/default")
    assert load_settings().engine_versions["v1"] == ("/opt/default",)
    monkeypatch.setenv("ORCH_ENGINE_COMMANDS", '{"v2": "   "}')
    with pytest.raises(ConfigError, match="ORCH_ENGINE_COMMANDS"):
        load_settings()
    monkeypatch.setenv("ORCH_ENGINE_COMMANDS", "[1]")
    with pytest.raises(ConfigError, match="ORCH_ENGINE_COMMANDS"):
        load_settings()


async def test_subprocess_version_lookup(tmp_path: Path) -> None:
    from bap_engine.backends.subprocess import SubprocessBackend, SubprocessConfig

    known = SubprocessBackend(SubprocessConfig(tmp_path, ("engine",), "d", commands={"v1": ("engine",)}))
    assert await known.has_version("v1") and not await known.has_version("v2")
    assert known.command_for("v1") == ("engine",) and known.command_for("other") == ("engine",)
    anything = SubprocessBackend(SubprocessConfig(tmp_path, ("engine",), "d"))  # no commands: one for all
    assert await anything.has_version("whatever")


async def test_docker_version_is_a_local_image() -> None:
    docker = pytest.importorskip("docker")
    from tests.backends.helpers import DEFAULT_IMAGE

    try:
        client = docker.from_env()
        present = any(DEFAULT_IMAGE in image.tags for image in client.images.list())
        client.close()
    except docker.errors.DockerException:
        pytest.skip("no Docker daemon")
    if not present:
        pytest.skip(f"{DEFAULT_IMAGE} not built")
    from bap_engine.backends.docker import DockerBackend, DockerConfig

    backend = DockerBackend(DockerConfig(deployment="t-versions"))
    try:
        assert await backend.has_version(DEFAULT_IMAGE)
        assert await backend.has_version(DEFAULT_IMAGE)  # cached
        assert not await backend.has_version("bap-engine/no-such-image:0.0.0")
    finally:
        await backend.close()


async def test_direct_registration_checks_the_version(settings: Settings) -> None:
    """`bap-engine products register` writes to the database itself: it checks the version too."""
    from bap_engine.app import register_product as register_directly
    from bap_engine.errors import ValidationFailed

    with pytest.raises(ValidationFailed, match="nope"):
        await register_directly(settings, unique_slug(), "P", {"engine_version": "nope"})
    product_id, key = await register_directly(settings, unique_slug(), "P", {"engine_version": "v2"})
    assert product_id and key
