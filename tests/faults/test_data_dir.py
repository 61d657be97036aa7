"""ORCH_DATA_DIR full or read-only: provision fails cleanly and leaves nothing half-created.

The data directory of a `bap-engine serve` is a small real tmpfs (`mount -t tmpfs -o size=2m`;
root is needed, else the test skips), while its database is the fault Postgres, so only the
engines' side breaks. Once the server runs, the tmpfs is filled up (ENOSPC) or remounted
read-only (`mount -o remount,ro`: chmod does not stop root). Then provision and admit with
auto_provision must answer 502 BACKEND_ERROR - the contract's code for "the engine runtime
failed", which is what happened; not 500 INTERNAL_ERROR, and not 503, which would blame the
database - with a message naming the cause ("No space left on device", "Read-only file system")
and no key or env value. Nothing may be left: no row, no engine directory, no process, no
bound port. After the fault is undone, provision works again (nothing sticky).
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from bap_engine.config import Settings
from tests.backends.helpers import port_is_free
from tests.conftest import destroy_leftover_engines
from tests.e2e.conftest import StartServer
from tests.faults.support import Api, Call, engine_pids, engine_rows, register, unique_user

TUNING: dict[str, object] = {"health_check_interval_s": 1, "reconcile_interval_s": 2}
_CHUNK = b"\0" * 65536
_MAX_CHUNKS = 1024  # 64 MiB: far more than the 2 MiB tmpfs holds


class Tmpfs:
    """A small tmpfs mounted for one test (unmounted by the fixture)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def mount(self, *args: str) -> None:
        subprocess.run(["mount", *args, str(self.path)], check=True, capture_output=True, timeout=30)

    def fill(self) -> Callable[[], None]:
        """Write until ENOSPC; returns the undo (delete the filler)."""
        with self.filler.open("wb", buffering=0) as out:
            for _ in range(_MAX_CHUNKS):
                try:
                    out.write(_CHUNK)
                except OSError as err:
                    assert err.errno == errno.ENOSPC, err
                    break
            else:
                raise AssertionError("the tmpfs never filled up")
        with pytest.raises(OSError):  # not even one more byte fits
            (self.path / "probe").write_bytes(b"x" * 4096)
        return lambda: self.filler.unlink()

    def read_only(self) -> Callable[[], None]:
        """Remount read-only; returns the undo (remount read-write)."""
        self.mount("-o", "remount,ro")
        with pytest.raises(OSError):
            (self.path / "probe").write_bytes(b"x")
        return lambda: self.mount("-o", "remount,rw")


@pytest.fixture
async def data_tmpfs(tmp_path: Path, settings: Settings, pg_dsn: str) -> AsyncIterator[Tmpfs]:
    """Request it before `start_server`, so it is unmounted after the servers are stopped."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    fs = Tmpfs(tmp_path / "data")
    fs.path.mkdir()
    try:
        fs.mount("-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs")
    except subprocess.CalledProcessError as err:
        pytest.skip(f"cannot mount a tmpfs here: {err.stderr.decode(errors='replace').strip()}")
    try:
        yield fs
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(fs.path)], check=False, capture_output=True, timeout=30)
        await destroy_leftover_engines(settings.model_copy(update={"data_dir": fs.path}), pg_dsn)
        if subprocess.run(["umount", str(fs.path)], check=False, capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(fs.path)], check=True, capture_output=True, timeout=30)


def _assert_clean_error(call: Call, cause: str) -> None:
    assert call.status == 502, (call.op, call.status, call.body)
    error = call.doc.get("error")
    assert set(call.doc) == {"error"} and isinstance(error, dict) and set(error) == {"code", "message"}, call.body
    assert error["code"] == "BACKEND_ERROR", call.body
    message = str(error["message"])
    assert cause.lower() in message.lower(), f"the message does not name the cause ({cause}): {message}"
    assert "sk-sept-" not in message and not re.search(r"[0-9a-f]{64}", message), "a key or key hash leaked"


async def _assert_nothing_created(api: Api, user: str, fs: Tmpfs, settings: Settings, dsn: str) -> None:
    async with api.client() as c:
        got = await api.call(c, "get", user)
    assert got.status == 404, got.body
    assert await engine_rows(dsn, settings) == []
    engines = fs.path / "engines"
    assert not engines.exists() or list(engines.iterdir()) == []
    assert engine_pids(settings.model_copy(update={"data_dir": fs.path})) == {}
    assert _processes_in(fs.path) == [], "a process still runs in the data directory"
    busy = [p for p in range(settings.port_min, settings.port_max + 1) if not port_is_free(p)]
    assert busy == [], f"engine ports still bound: {busy}"


def _processes_in(root: Path) -> list[int]:
    """PIDs whose working directory is under `root`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if Path(os.readlink(entry / "cwd")).is_relative_to(root):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.parametrize(("fault", "cause"), [("full", "No space left on device"),
                                              ("read-only", "Read-only file system")])
async def test_unusable_data_dir_fails_provision_cleanly(data_tmpfs: Tmpfs, start_server: StartServer,
                                                         settings: Settings, pg_dsn: str, fault: str,
                                                         cause: str) -> None:
    server = start_server(data_dir=str(data_tmpfs.path), **TUNING)
    api = Api(server.url, register(server.url))
    undo = data_tmpfs.fill() if fault == "full" else data_tmpfs.read_only()
    for op in ("provision", "admit_new"):
        user = unique_user("disk")
        async with api.client() as c:
            call = await api.call(c, op, user)
        _assert_clean_error(call, cause)
        await _assert_nothing_created(api, user, data_tmpfs, settings, pg_dsn)

    undo()
    user = unique_user("disk")
    async with api.client() as c:
        provisioned = await api.call(c, "provision", user)
        assert provisioned.status == 200, provisioned.body
        deleted = await api.call(c, "delete", user)
        assert deleted.status == 200, deleted.body
