"""`bap-engine rotate-master-key`: every sealed value moves from key A to key B while the API serves.

Each test runs on its own throwaway database on the session's server (the rotation reads whole
tables, and the shared test database holds rows sealed under every other test's master key). Real
apps (`create_app` in a lifespan) with real subprocess engines; the command itself runs as a
subprocess, and is killed with SIGKILL after the first batch it reports, then run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
from cryptography.fernet import Fernet, InvalidToken

from bap_engine.cli.checks import FAIL, OK, WARN, check_secrets
from bap_engine.config import Settings
from bap_engine.db import migrate
from bap_engine.db.pool import create_pool
from bap_engine.keys import KeySealer, hash_key
from bap_engine.rekey import rekey
from tests.conftest import (
    ADMIN_KEY,
    ResponseLog,
    audit_rows_containing,
    open_app,
    pk,
    register_product,
    unique_slug,
)
from tests.log_scan import record_secrets

EXE = str(Path(sys.executable).with_name("bap-engine"))
USERS = ("rk-a", "rk-b", "rk-c")
_SEALED = (("engines", "id", "engine_key_enc"), ("engines", "id", "pending_key_enc"),
           ("webhooks", "product_id", "secret_enc"))


# ---- helpers -----------------------------------------------------------------------------------
def new_master_key() -> str:
    key = Fernet.generate_key().decode()
    record_secrets(key)
    return key


@contextlib.asynccontextmanager
async def throwaway_database(pg_dsn: str) -> AsyncIterator[str]:
    name = f"bap_rekey_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield urlunsplit(urlsplit(pg_dsn)._replace(path="/" + name))
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def cli_env(settings: Settings, dsn: str, master: str, previous: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "BAP_"))}
    env.update({"ORCH_DATABASE_URL": dsn, "ORCH_MASTER_KEY": master, "ORCH_ADMIN_KEY": ADMIN_KEY,
                "ORCH_DATA_DIR": str(settings.data_dir / "cli"), "ORCH_LOG_LEVEL": "INFO"})
    if previous is not None:
        env["ORCH_MASTER_KEY_PREVIOUS"] = previous
    return env


def run_cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = subprocess.run([EXE, "rotate-master-key", *args], env=env, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout, proc.stderr


async def sealed_values(dsn: str) -> list[tuple[str, str, str, str]]:
    """(table, id, column, ciphertext) of every sealed value in the database."""
    conn = await asyncpg.connect(dsn)
    try:
        out = []
        for table, id_column, column in _SEALED:
            rows = await conn.fetch(f"SELECT {id_column}::text AS id, {column} AS v FROM {table} "
                                    f"WHERE {column} IS NOT NULL ORDER BY {id_column}")
            out += [(table, r["id"], column, r["v"]) for r in rows]
        return out
    finally:
        await conn.close()


def opens(master: str, token: str) -> str | None:
    try:
        return Fernet(master.encode()).decrypt(token.encode()).decode()
    except InvalidToken:
        return None


async def engine_rows(dsn: str) -> dict[str, asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT id::text AS id, user_id, api_key_hash, engine_key_enc, pending_key_enc "
                                "FROM engines")
    finally:
        await conn.close()
    return {r["user_id"]: r for r in rows}


async def insert_bare_engine(dsn: str, master: str, product_id: str, user_id: str, key: str,
                             pending: str | None = None, op: str | None = None) -> str:
    """An `engines` row with no process behind it (stopped), sealed under `master`."""
    engine_id = str(uuid.uuid4())
    f = Fernet(master.encode())
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO engines (id, product_id, user_id, status, engine_version, api_key_hash, engine_key_enc, "
            "pending_key_enc, op, op_owner, op_deadline) VALUES ($1, $2, $3, 'stopped', 'test-version', $4, $5, $6, "
            "$7::text, CASE WHEN $7::text IS NULL THEN NULL ELSE 1 END, "
            "CASE WHEN $7::text IS NULL THEN NULL ELSE now() + interval '1 hour' END)",
            uuid.UUID(engine_id), uuid.UUID(product_id), user_id, hash_key(key), f.encrypt(key.encode()).decode(),
            None if pending is None else f.encrypt(pending.encode()).decode(), op)
    finally:
        await conn.close()
    return engine_id


async def assert_keys_answered(client: httpx.AsyncClient, platform_key: str, keys: dict[str, str],
                               dsn: str) -> None:
    """GET /engines/{u} answers each user's key, and it hash-matches the row."""
    rows = await engine_rows(dsn)
    for user, key in keys.items():
        r = await client.get(f"/engines/{user}", headers=pk(platform_key))
        assert r.status_code == 200, r.text
        assert r.json()["api_key"] == key, user
        assert hash_key(r.json()["api_key"]) == rows[user]["api_key_hash"], user


class Lines:
    """A subprocess's stderr, line by line, read by a thread (to wait for one with a timeout)."""

    def __init__(self, stream: IO[str] | None) -> None:
        assert stream is not None
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line)

    def wait_for(self, prefix: str, timeout: float) -> str:
        while True:
            line = self.lines.get(timeout=timeout)
            self.seen.append(line)
            if line.startswith(prefix):
                return line

    def rest(self) -> str:
        self._thread.join(10)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return "".join(self.seen)


def assert_no_secret(text: str, secrets: list[str]) -> None:
    assert "gAAAAA" not in text and "sk-sept-" not in text and "whsec_" not in text, text
    for secret in secrets:
        assert secret not in text


# ---- the tests ---------------------------------------------------------------------------------
async def test_rotation_killed_halfway_then_finished(settings: Settings, pg_dsn: str, master_key: str) -> None:
    """Engines and a webhook under A; replicas with B + A answer before, during and after; a run killed
    after its first batch, a second run finishes; then B alone opens everything; nothing leaks."""
    key_a, key_b = master_key, new_master_key()
    async with throwaway_database(pg_dsn) as dsn:
        on_a = settings.model_copy(update={"database_url": dsn})
        log = ResponseLog([ADMIN_KEY, key_a, key_b])
        keys: dict[str, str] = {}
        async with open_app(on_a, log) as (_, client):
            product_id, platform_key = await register_product(client)
            for user in USERS:
                r = await client.post("/engines/provision", json={"user_id": user}, headers=pk(platform_key))
                assert r.status_code == 200, r.text
                keys[user] = r.json()["api_key"]
            r = await client.put(f"/products/{product_id}/webhook", json={"url": "http://127.0.0.1:9/hook"},
                                 headers={"X-Admin-Key": ADMIN_KEY})
            assert r.status_code == 200, r.text
            secret = r.json()["secret"]
        # a stopped engine with a rotation pending (pending_key_enc sealed too)
        keys["rk-bare"], pending = "sk-sept-" + uuid.uuid4().hex * 2, "sk-sept-" + uuid.uuid4().hex * 2
        await insert_bare_engine(dsn, key_a, product_id, "rk-bare", keys["rk-bare"], pending=pending)
        record_secrets(secret, pending, *keys.values())
        before = await sealed_values(dsn)
        assert len(before) == 6 and all(opens(key_a, v) for *_, v in before)

        on_b_and_a = on_a.model_copy(update={"master_key": key_b, "master_key_previous": key_a})
        async with open_app(on_b_and_a, log) as (_, client):
            await assert_keys_answered(client, platform_key, keys, dsn)  # before the rotation

            env = cli_env(settings, dsn, key_b, key_a)
            proc = subprocess.Popen([EXE, "rotate-master-key", "--batch-size", "1", "--pause", "60"], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                    text=True)
            lines = Lines(proc.stderr)
            try:
                first = await asyncio.to_thread(lines.wait_for, "rotate-master-key: engines:", 60)
            finally:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
            assert "1 read, 1 re-encrypted" in first, first
            killed_output = lines.rest() + (proc.stdout.read() if proc.stdout else "")
            halfway = await sealed_values(dsn)
            moved = {(t, i) for t, i, _, v in halfway if opens(key_b, v) is not None}
            assert len(moved) == 1, "the kill landed after one row"
            await assert_keys_answered(client, platform_key, keys, dsn)  # halfway: admits keep answering
            r = await client.post(f"/engines/{USERS[0]}/admit", json={}, headers=pk(platform_key))
            assert r.status_code == 200 and r.json()["engine"]["api_key"] == keys[USERS[0]], r.text

            code, out, err = await asyncio.to_thread(run_cli, env, "--batch-size", "2", "--json")
            assert code == 0, (out, err)
            summary = json.loads(out)
            assert summary["complete"] is True and summary["left"] == [] and summary["unreadable"] == []
            assert (summary["reencrypted"], summary["current"], summary["changed"]) == (4, 1, 0), summary
            assert summary["tables"]["engines"]["current"] == 1 and summary["tables"]["webhooks"]["reencrypted"] == 1
            assert "rotate-master-key: webhooks: 1 read" in err, err
            await assert_keys_answered(client, platform_key, keys, dsn)

            code, again, again_err = await asyncio.to_thread(run_cli, env)  # idempotent: all current now
            assert code == 0 and "0 re-encrypted, 5 already current" in again, (again, again_err)

        after = await sealed_values(dsn)
        assert [(t, i, c) for t, i, c, _ in after] == [(t, i, c) for t, i, c, _ in before]
        rows = await engine_rows(dsn)
        for user, key in keys.items():
            assert opens(key_b, rows[user]["engine_key_enc"]) == key
            assert opens(key_a, rows[user]["engine_key_enc"]) is None
        assert opens(key_b, rows["rk-bare"]["pending_key_enc"]) == pending
        assert [opens(key_b, v) for t, _, _, v in after if t == "webhooks"] == [secret]
        assert all(opens(key_b, v) is not None and opens(key_a, v) is None for *_, v in after)

        async with open_app(on_a.model_copy(update={"master_key": key_b}), log) as (_, client):  # B alone
            await assert_keys_answered(client, platform_key, keys, dsn)

        secrets = [key_a, key_b, ADMIN_KEY, secret, pending, *keys.values(), *(v for *_, v in before + after)]
        for text in (killed_output, out, err, again, again_err):
            assert_no_secret(text, secrets)
        log.check(ADMIN_KEY, key_b)
        assert await audit_rows_containing(dsn, log.secrets + [secret, pending, key_a, key_b]) == []


async def test_concurrent_rotate_key_and_busy_rows_are_not_overwritten(
    settings: Settings, pg_dsn: str, master_key: str
) -> None:
    """A rotate-key committed between a batch's read and its write wins (the row ends under B with the
    new key); a row held by an op is left alone (then done by the next run)."""
    key_a, key_b = master_key, new_master_key()
    async with throwaway_database(pg_dsn) as dsn:
        on_a = settings.model_copy(update={"database_url": dsn})
        keys: dict[str, str] = {}
        async with open_app(on_a) as (_, client):
            product_id, platform_key = await register_product(client)
            for user in USERS[:2]:
                r = await client.post("/engines/provision", json={"user_id": user}, headers=pk(platform_key))
                assert r.status_code == 200, r.text
                keys[user] = r.json()["api_key"]
        busy_key = "sk-sept-" + uuid.uuid4().hex * 2
        busy_id = await insert_bare_engine(dsn, key_a, product_id, "rk-busy", busy_key, op="stop")
        record_secrets(busy_key, *keys.values())
        rotated_id = (await engine_rows(dsn))[USERS[0]]["id"]

        on_b_and_a = on_a.model_copy(update={"master_key": key_b, "master_key_previous": key_a})
        async with open_app(on_b_and_a) as (_, client):
            rotated: list[str] = []

            async def rotate_meanwhile(table: str, ids: list[str]) -> None:
                if table == "engines" and rotated_id in ids and not rotated:
                    r = await client.post(f"/engines/{USERS[0]}/rotate-key", headers=pk(platform_key))
                    assert r.status_code == 200, r.text
                    rotated.append(r.json()["api_key"])
                    record_secrets(rotated[0])

            pool = await create_pool(dsn, max_size=2)
            try:
                report = await rekey(pool, KeySealer(key_b, key_a), batch_size=1, retry_s=0.5,
                                     before_write=rotate_meanwhile)
                engines = report.tables[0]
                assert rotated and engines.read == 3
                # the rotated row was refused, re-read, found current; the busy one kept its op: left
                assert (engines.reencrypted, engines.current, engines.changed) == (1, 1, 2), engines
                assert report.left == [("engines", busy_id)] and not report.complete
                keys[USERS[0]] = rotated[0]
                rows = await engine_rows(dsn)
                assert opens(key_b, rows[USERS[0]]["engine_key_enc"]) == rotated[0]
                assert hash_key(rotated[0]) == rows[USERS[0]]["api_key_hash"]
                assert opens(key_a, rows["rk-busy"]["engine_key_enc"]) == busy_key  # untouched under its op
                await assert_keys_answered(client, platform_key, keys, dsn)

                await pool.execute("UPDATE engines SET op = NULL, op_owner = NULL, op_deadline = NULL WHERE id = $1",
                                   busy_id)  # the op ends: the next run finishes
                again = await rekey(pool, KeySealer(key_b, key_a))
                assert again.complete and (again.reencrypted, again.current) == (1, 2)
            finally:
                await pool.close()
        assert all(opens(key_b, v) for *_, v in await sealed_values(dsn))


async def test_unreadable_value_is_named_not_shown(settings: Settings, pg_dsn: str, master_key: str) -> None:
    """A value under neither key: exit 1 naming table and id, the rest still rotated; an unmigrated
    database: exit 1 saying so."""
    key_a, key_b, key_c = master_key, new_master_key(), new_master_key()
    async with throwaway_database(pg_dsn) as dsn:
        await migrate.upgrade(dsn)
        product_id = str(uuid.uuid4())
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("INSERT INTO products (id, slug, display_name, api_key_hash) VALUES ($1, $2, 'x', $3)",
                               uuid.UUID(product_id), unique_slug("rk"), uuid.uuid4().hex)
        finally:
            await conn.close()
        good, lost = "sk-sept-" + uuid.uuid4().hex * 2, "sk-sept-" + uuid.uuid4().hex * 2
        record_secrets(good, lost)
        good_id = await insert_bare_engine(dsn, key_a, product_id, "rk-good", good)
        lost_id = await insert_bare_engine(dsn, key_c, product_id, "rk-lost", lost)
        values = [v for *_, v in await sealed_values(dsn)]
        code, out, err = await asyncio.to_thread(run_cli, cli_env(settings, dsn, key_b, key_a), "--json")
        assert code == 1, (out, err)
        assert f"engines {lost_id}" in err and "neither" in err, err
        summary = json.loads(out)
        assert summary["unreadable"] == [{"table": "engines", "id": lost_id}] and summary["reencrypted"] == 1
        rows = await engine_rows(dsn)
        assert opens(key_b, rows["rk-good"]["engine_key_enc"]) == good and rows["rk-good"]["id"] == good_id
        assert opens(key_c, rows["rk-lost"]["engine_key_enc"]) == lost  # left as it was
        assert_no_secret(out + err, [key_a, key_b, key_c, ADMIN_KEY, good, lost, *values])
    async with throwaway_database(pg_dsn) as empty:
        code, out, err = await asyncio.to_thread(run_cli, cli_env(settings, empty, key_b, key_a))
        assert code == 1 and "bap-engine migrate" in err, (out, err)
        assert_no_secret(out + err, [key_a, key_b, ADMIN_KEY])


def test_usage_errors_exit_2(settings: Settings, master_key: str) -> None:
    """No ORCH_MASTER_KEY_PREVIOUS, the same key twice, an invalid previous key: usage, no key shown."""
    other = new_master_key()
    nowhere = "postgresql://bap@127.0.0.1:1/none"  # never reached: usage is checked first
    bad = "not-a-fernet-key-" + uuid.uuid4().hex
    cases = [
        (cli_env(settings, nowhere, master_key, None), "ORCH_MASTER_KEY_PREVIOUS is not set"),
        (cli_env(settings, nowhere, master_key, ""), "ORCH_MASTER_KEY_PREVIOUS is not set"),
        (cli_env(settings, nowhere, master_key, master_key), "equals ORCH_MASTER_KEY"),
        (cli_env(settings, nowhere, other, bad), "ORCH_MASTER_KEY_PREVIOUS"),
    ]
    for env, says in cases:
        code, out, err = run_cli(env)
        assert code == 2 and says in err, (code, out, err)
        assert_no_secret(out + err, [master_key, other, bad, ADMIN_KEY])
    code, out, err = run_cli(cli_env(settings, nowhere, other, master_key), "--batch-size", "0")
    assert code == 2, (out, err)


def test_doctor_says_a_rotation_is_under_way(tmp_path: Path, master_key: str) -> None:
    other = new_master_key()
    base = Settings(database_url="postgresql://db/x", master_key=other, admin_key=ADMIN_KEY, data_dir=tmp_path)
    assert check_secrets(base).status == OK
    during = check_secrets(base.model_copy(update={"master_key_previous": master_key}))
    assert during.status == WARN and "ORCH_MASTER_KEY_PREVIOUS set" in during.detail
    assert "rotate-master-key" in during.fix
    same = check_secrets(base.model_copy(update={"master_key_previous": other}))
    assert same.status == WARN and "equals" in same.detail
    missing = check_secrets(base.model_copy(update={"admin_key": None, "master_key_previous": master_key}))
    assert missing.status == FAIL
    for check in (during, same, missing):
        assert master_key not in check.detail + check.fix and other not in check.detail + check.fix
