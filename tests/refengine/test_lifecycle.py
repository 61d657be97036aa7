"""Process start and stop: configuration errors, SIGTERM/SIGINT, in-flight responses at shutdown."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.refengine.conftest import SpawnEngine
from tests.refengine.support import SRC, Engine, parse_sse, wait_until


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_exits_0_promptly_and_closes_sqlite(spawn: SpawnEngine, key: str, sig: signal.Signals) -> None:
    engine = await spawn(REFENGINE_SHUTDOWN_GRACE_S="30")
    async with engine.client(key) as c:
        # Leaves an idle keep-alive connection open in the client's pool while the engine stops.
        async with c.stream("POST", "/execute", json={"message": "bye"}) as r:
            await r.aread()
        assert await engine.stop(sig, timeout=5) == 0  # well inside the 30 s grace: idle is not in-flight
    wal = engine.db_path.with_name(engine.db_path.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0  # checkpointed and closed
    with sqlite3.connect(engine.db_path) as db:
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (2,)
    assert "Traceback" not in engine.log()


async def test_sigterm_finishes_the_in_flight_stream(spawn: SpawnEngine, key: str) -> None:
    engine = await spawn(REFENGINE_DELTA_DELAY_MS="300")
    async with engine.client(key) as c:
        async with c.stream("POST", "/execute", json={"message": "a b c", "thread_id": "f"}) as r:
            chunks = r.aiter_text()
            first = await anext(chunks)
            assert engine.proc is not None
            engine.proc.send_signal(signal.SIGTERM)

            async def refuses_new_connections() -> bool:
                try:
                    async with httpx.AsyncClient(timeout=1) as fresh:
                        await fresh.get(f"{engine.url}/health")
                    return False
                except httpx.TransportError:
                    return True

            await wait_until(refuses_new_connections, timeout=5)
            assert not engine.exited()  # still streaming the turn
            rest = "".join([part async for part in chunks])
    events = parse_sse(first + rest)
    assert [name for name, _ in events] == ["thread_lifecycle"] + ["text_delta"] * 4 + ["done"]
    await wait_until(engine.exited, timeout=5)
    assert engine.proc.returncode == 0
    with sqlite3.connect(engine.db_path) as db:
        rows = db.execute("SELECT role, content FROM messages WHERE thread_id = 'f' ORDER BY id").fetchall()
    assert rows == [("user", "a b c"), ("assistant", "echo: a b c")]


def _run_engine(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    full = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(SRC), "HOST": "127.0.0.1", "PORT": "0"}
    full["SQLITE_DB_PATH"] = str(tmp_path / "d" / "brain.sqlite")
    full.update(env)
    cmd = [sys.executable, "-m", "bap_engine.refengine"]
    return subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=20)


def test_missing_key_is_a_configuration_error(tmp_path: Path) -> None:
    done = _run_engine({}, tmp_path)
    assert done.returncode == 2
    assert "ENGINE_KEY_HASH" in done.stderr


def test_malformed_key_hash_exits_2_without_echoing_it(tmp_path: Path) -> None:
    secret = "not-a-hash-but-maybe-a-secret"
    done = _run_engine({"ENGINE_KEY_HASH": secret}, tmp_path)
    assert done.returncode == 2
    assert "ENGINE_KEY_HASH" in done.stderr and secret not in done.stderr


async def test_creates_the_data_dir_and_database(spawn: SpawnEngine, tmp_path: Path) -> None:
    data_dir = tmp_path / "deep" / "er" / "data"
    engine: Engine = await spawn(data_dir=data_dir)
    assert engine.db_path.is_file()
    with sqlite3.connect(engine.db_path) as db:
        cols = [row[1] for row in db.execute("PRAGMA table_info(messages)")]
        mode = db.execute("PRAGMA journal_mode").fetchone()
    assert cols == ["id", "thread_id", "role", "content", "created_at"]
    assert mode == ("wal",)
