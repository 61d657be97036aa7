"""Live key rotation (``POST /_bap/rotate-key``) and its persistence across restarts."""

from __future__ import annotations

import json
import stat
import uuid
from pathlib import Path

import httpx

from tests.refengine.conftest import SpawnEngine
from tests.refengine.support import Engine, sha256_hex, wait_until


def new_key() -> str:
    return f"key-{uuid.uuid4().hex}"


async def _status(engine: Engine, key: str) -> int:
    async with engine.client(key) as c:
        return (await c.get("/history")).status_code


async def _rotate(engine: Engine, key: str, body: object) -> httpx.Response:
    async with engine.client(key) as c:
        return await c.post("/_bap/rotate-key", json=body)


def _key_file(engine: Engine) -> dict[str, object]:
    raw: dict[str, object] = json.loads((engine.data_dir / "bap-keys.json").read_text())
    return raw


async def test_rotation_overlap_then_old_key_refused(spawn: SpawnEngine, key: str) -> None:
    engine = await spawn()
    new = new_key()
    r = await _rotate(engine, key, {"key_hash": sha256_hex(new), "overlap_seconds": 1})
    assert (r.status_code, r.json()) == (200, {"status": "rotated", "overlap_seconds": 1})
    assert await _status(engine, new) == 200
    assert await _status(engine, key) == 200  # inside the 1 s overlap

    async def old_refused() -> bool:
        return await _status(engine, key) == 401

    await wait_until(old_refused, timeout=5)
    assert await _status(engine, new) == 200
    # Nothing secret reaches the log: neither key nor either hash.
    log = engine.log()
    for secret in (key, new, sha256_hex(key), sha256_hex(new)):
        assert secret not in log


async def test_rotation_persists_atomically_to_the_key_file(spawn: SpawnEngine, key: str) -> None:
    engine = await spawn()
    new = new_key()
    r = await _rotate(engine, key, {"key_hash": sha256_hex(new).upper(), "overlap_seconds": 30})
    assert r.status_code == 200
    stored = _key_file(engine)
    assert stored["current_hash"] == sha256_hex(new)
    assert stored["previous_hash"] == sha256_hex(key)
    assert isinstance(stored["previous_valid_until"], float)
    assert stored["retired_hashes"] == [sha256_hex(key)]
    path = engine.data_dir / "bap-keys.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in engine.data_dir.iterdir() if p.name.startswith("bap-keys")] == ["bap-keys.json"]
    assert new not in path.read_text() and key not in path.read_text()


async def test_overlap_is_clamped(spawn: SpawnEngine, key: str) -> None:
    engine = await spawn(BAP_KEY_ROTATION_MAX_OVERLAP_SECONDS="2")
    second, third = new_key(), new_key()
    r = await _rotate(engine, key, {"key_hash": sha256_hex(second), "overlap_seconds": 9999})
    assert r.json() == {"status": "rotated", "overlap_seconds": 2}
    r = await _rotate(engine, second, {"key_hash": sha256_hex(third), "overlap_seconds": -5})
    assert r.json() == {"status": "rotated", "overlap_seconds": 0}
    assert await _status(engine, second) == 401  # no overlap at all
    assert await _status(engine, third) == 200


async def test_rotation_requires_the_current_key(spawn: SpawnEngine, key: str) -> None:
    engine = await spawn()
    new = new_key()
    assert (await _rotate(engine, key, {"key_hash": sha256_hex(new), "overlap_seconds": 60})).status_code == 200
    # The previous key still reads during the overlap, but may not rotate again.
    assert await _status(engine, key) == 200
    r = await _rotate(engine, key, {"key_hash": sha256_hex(new_key()), "overlap_seconds": 60})
    assert (r.status_code, r.json()["error"]) == (401, "INVALID_KEY")
    assert (await _rotate(engine, "nope", {"key_hash": "a" * 64, "overlap_seconds": 0})).status_code == 401
    assert _key_file(engine)["current_hash"] == sha256_hex(new)


async def test_repeating_a_rotation_is_idempotent(spawn: SpawnEngine, key: str) -> None:
    """A retried rotation (say, after an orchestrator crash) keeps the previous key's overlap window."""
    engine = await spawn()
    new = new_key()
    body = {"key_hash": sha256_hex(new), "overlap_seconds": 60}
    assert (await _rotate(engine, key, body)).status_code == 200
    before = _key_file(engine)
    again = await _rotate(engine, new, body)
    assert (again.status_code, again.json()) == (200, {"status": "rotated", "overlap_seconds": 60})
    assert _key_file(engine) == before
    assert await _status(engine, key) == 200
    assert await _status(engine, new) == 200


async def test_rotation_body_is_validated(spawn: SpawnEngine, key: str) -> None:
    engine = await spawn()
    good = sha256_hex("x")
    bad_bodies: list[object] = [
        {"key_hash": "abc", "overlap_seconds": 1},
        {"key_hash": "g" * 64, "overlap_seconds": 1},
        {"key_hash": 123, "overlap_seconds": 1},
        {"overlap_seconds": 1},
        {"key_hash": good},
        {"key_hash": good, "overlap_seconds": "10"},
        {"key_hash": good, "overlap_seconds": True},
        {"key_hash": good, "overlap_seconds": 1.5},
        [good, 1],
    ]
    for body in bad_bodies:
        r = await _rotate(engine, key, body)
        assert (r.status_code, r.json()["error"]) == (400, "VALIDATION_ERROR"), body
    async with engine.client(key) as c:
        r = await c.post("/_bap/rotate-key", content=b"{oops")
        assert (r.status_code, r.json()["error"]) == (400, "VALIDATION_ERROR")
    assert await _status(engine, key) == 200
    assert not (engine.data_dir / "bap-keys.json").exists()


async def test_restart_keeps_the_rotated_key(spawn: SpawnEngine, key: str) -> None:
    engine = await spawn()
    new = new_key()
    assert (await _rotate(engine, key, {"key_hash": sha256_hex(new), "overlap_seconds": 0})).status_code == 200
    assert await engine.stop() == 0
    # Restarted with the same (now stale) ENGINE_KEY_HASH: the key file wins.
    again = await spawn(data_dir=engine.data_dir)
    assert await _status(again, new) == 200
    assert await _status(again, key) == 401


async def test_restart_keeps_an_open_overlap_window(spawn: SpawnEngine, key: str) -> None:
    engine = await spawn()
    new = new_key()
    assert (await _rotate(engine, key, {"key_hash": sha256_hex(new), "overlap_seconds": 300})).status_code == 200
    assert await engine.stop() == 0
    again = await spawn(data_dir=engine.data_dir)
    assert await _status(again, new) == 200
    assert await _status(again, key) == 200


async def test_newer_env_hash_wins_over_the_key_file(spawn: SpawnEngine, key: str) -> None:
    engine = await spawn()
    rotated, recreated = new_key(), new_key()
    r = await _rotate(engine, key, {"key_hash": sha256_hex(rotated), "overlap_seconds": 300})
    assert r.status_code == 200
    assert await engine.stop() == 0
    # The orchestrator re-created the engine with a hash the file has never seen: that is the truth.
    again = await spawn(data_dir=engine.data_dir, ENGINE_KEY_HASH=sha256_hex(recreated))
    assert await _status(again, recreated) == 200
    assert await _status(again, rotated) == 401
    assert await _status(again, key) == 401
    stored = _key_file(again)
    assert stored["current_hash"] == sha256_hex(recreated)
    assert stored["retired_hashes"] == [sha256_hex(key), sha256_hex(rotated)]


async def test_restart_with_the_creation_env_after_two_rotations_keeps_the_latest_key(
    spawn: SpawnEngine, key: str
) -> None:
    """A restarted container keeps its creation env: that hash is retired, not newer, so the file wins."""
    engine = await spawn()
    second, third = new_key(), new_key()
    assert (await _rotate(engine, key, {"key_hash": sha256_hex(second), "overlap_seconds": 0})).status_code == 200
    assert (await _rotate(engine, second, {"key_hash": sha256_hex(third), "overlap_seconds": 0})).status_code == 200
    assert await engine.stop() == 0
    again = await spawn(data_dir=engine.data_dir)  # ENGINE_KEY_HASH is still sha256(key)
    assert await _status(again, third) == 200
    assert await _status(again, second) == 401
    assert await _status(again, key) == 401


async def test_damaged_key_file_falls_back_to_the_env_hash(spawn: SpawnEngine, key: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "damaged"
    data_dir.mkdir()
    (data_dir / "bap-keys.json").write_text('{"current_hash": "not-a-hash"')
    engine = await spawn(data_dir=data_dir)
    assert await _status(engine, key) == 200
    assert "ignoring unreadable bap-keys.json" in engine.log()
