"""The checks of `bap-engine doctor`: each returns `Check(name, status, detail, fix)`; none shows a key.

    settings    ORCH_* load (an invalid one is named); an unknown ORCH_* name (a typo) is a WARN
    secrets     the master and admin keys: from ORCH_*, or (embedded) the key files: valid, mode 0600;
                ORCH_MASTER_KEY_PREVIOUS set (a master-key rotation under way) is a WARN
    data dir    exists (or can be made in an existing parent), writable (a file is made and removed),
                free space (WARN under --min-free-mb, FAIL under 50 MB)
    ports       ORCH_PORT_MIN..MAX: the API port outside it, how many of a bounded sample bind on 127.0.0.1
    database    reachable: ORCH_DATABASE_URL (password masked), or the embedded Postgres under the data
                dir, started or joined the way `migrate` does it (and stopped again unless another
                process, such as a running serve, still uses it)
    migrations  the schema is at this code's head revision (behind: WARN, serve migrates at start)
    backend     the backend's ping() (data directory, Docker daemon, Kubernetes API); for subprocess
                also the engine command. Docker images are not looked up (the backend offers no call
                for it): a missing image fails its provision, with the reason audited.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

import asyncpg
from cryptography.fernet import Fernet

from bap_engine.config import ConfigError, Settings, load_settings

__all__ = ["Status", "Check", "OK", "WARN", "FAIL", "SKIP", "check_settings", "check_secrets", "check_data_dir",
           "check_ports", "check_database", "check_backend", "redact"]

Status = Literal["OK", "WARN", "FAIL", "SKIP"]
OK: Status = "OK"
WARN: Status = "WARN"
FAIL: Status = "FAIL"
SKIP: Status = "SKIP"
_RANK = {SKIP: 0, OK: 1, WARN: 2, FAIL: 3}
_NOT_SETTINGS = {"ORCH_TEST_DATABASE_URL"}  # read by the test suite, not by the server
PORT_SAMPLE = 256
HARD_MIN_FREE_MB = 50
EMBEDDED_START_S = 60.0


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


def _worst(*found: tuple[Status, str, str]) -> tuple[Status, str, str]:
    """The first of the most severe (status, note, fix)."""
    return max(found, key=lambda f: _RANK[f[0]])


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def check_settings(environ: Mapping[str, str]) -> tuple[Check, Settings | None]:
    try:
        settings = load_settings()
    except ConfigError as e:
        return Check("settings", FAIL, str(e), "fix or unset that variable"), None
    known = {f"ORCH_{name.upper()}" for name in Settings.model_fields} | _NOT_SETTINGS
    unknown = sorted(k for k in environ if k.upper().startswith("ORCH_") and k.upper() not in known)
    db = "embedded Postgres" if settings.embedded else "ORCH_DATABASE_URL"
    summary = f"loaded: {settings.engine_backend} backend, {db}, deployment {settings.deployment}"
    if unknown:
        return Check("settings", WARN, f"{summary}; unknown, ignored: {', '.join(unknown)}",
                     "fix the name (a typo?) or unset it"), settings
    return Check("settings", OK, summary), settings


def _key_file(path: Path, fernet: bool) -> tuple[Status, str, str]:
    variable = f"ORCH_{path.stem.upper()}_KEY"
    try:
        text, mode = path.read_text().strip(), path.stat().st_mode
    except OSError as e:
        return FAIL, f"in {path}, unreadable: {e.strerror}", f"fix its owner or mode, or set {variable}"
    if not text:
        return FAIL, f"in {path}, empty", f"delete it (a new key is generated) or set {variable}"
    if fernet:
        try:
            Fernet(text.encode())
        except ValueError:
            return FAIL, f"in {path}, not a valid Fernet key", "restore the original: engine keys are sealed with it"
    if mode & 0o077:
        return WARN, f"in {path}, readable by others", f"chmod 600 {path}"
    return OK, f"in {path}", ""


def check_secrets(settings: Settings) -> Check:
    """Never reads a key into the output: only where each one comes from (and whether a master-key
    rotation is under way: ORCH_MASTER_KEY_PREVIOUS set)."""
    found = _secrets(settings)
    if not settings.master_key_previous or found.status == FAIL:
        return found
    if settings.master_key_previous == settings.master_key:
        return Check("secrets", WARN, f"{found.detail}; ORCH_MASTER_KEY_PREVIOUS equals the master key",
                     "set ORCH_MASTER_KEY to the new master key, or unset ORCH_MASTER_KEY_PREVIOUS")
    rotation: tuple[Status, str, str] = (WARN, "", "once `bap-engine rotate-master-key` has finished, unset "
                                                   "ORCH_MASTER_KEY_PREVIOUS and restart")
    status, _, fix = _worst((found.status, "", found.fix), rotation)  # a key file's own fix comes first
    return Check("secrets", status, f"{found.detail}; ORCH_MASTER_KEY_PREVIOUS set: a master-key rotation "
                                    "is under way (values sealed under either key are read)", fix)


def _secrets(settings: Settings) -> Check:
    if not settings.embedded:
        missing = [n for n, v in (("ORCH_MASTER_KEY", settings.master_key), ("ORCH_ADMIN_KEY", settings.admin_key))
                   if not v]
        if missing:
            return Check("secrets", FAIL, f"{' and '.join(missing)} required with ORCH_DATABASE_URL",
                         "set them (the same values on every replica)")
        return Check("secrets", OK, "master and admin keys from ORCH_MASTER_KEY and ORCH_ADMIN_KEY")
    found: list[tuple[Status, str, str]] = []
    for name, value in (("master", settings.master_key), ("admin", settings.admin_key)):
        path = settings.data_dir.resolve() / f"{name}.key"
        if value:
            found.append((OK, f"from ORCH_{name.upper()}_KEY", ""))
        elif not path.exists():
            found.append((OK, "generated into the data dir at the first start", ""))
        else:
            found.append(_key_file(path, fernet=name == "master"))
    status, _, fix = _worst(*found)
    (_, master, _), (_, admin, _) = found
    detail = f"master and admin keys {master}" if master == admin else f"master key {master}; admin key {admin}"
    return Check("secrets", status, detail, fix)


def _writable(directory: Path) -> str | None:
    """None when a file can be made (and is removed) in `directory`, else why not."""
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".bap-doctor-")
    except OSError as e:
        return e.strerror or type(e).__name__
    os.close(fd)
    os.unlink(name)
    return None


def check_data_dir(settings: Settings, min_free_mb: int) -> Check:
    path = settings.data_dir.resolve()
    fix_dir = "create it (mkdir -p), mount its volume, or set ORCH_DATA_DIR to a writable directory"
    if path.exists() and not path.is_dir():
        return Check("data dir", FAIL, f"{path} is not a directory", fix_dir)
    target = path if path.exists() else path.parent
    if not target.is_dir():
        why = "is not a directory" if target.exists() else "does not exist"
        return Check("data dir", FAIL, f"{path} does not exist and its parent {target} {why}", fix_dir)
    problem = _writable(target)
    if problem:
        return Check("data dir", FAIL, f"{target} is not writable: {problem}",
                     "give this user write access (chown/chmod) or set ORCH_DATA_DIR")
    free = shutil.disk_usage(target).free // 2**20
    note = f"{path}: writable, {free} MB free" + ("" if path.exists() else " (created at the first start)")
    fix_space = "free some space, or move ORCH_DATA_DIR to a larger volume"
    if free < HARD_MIN_FREE_MB:
        return Check("data dir", FAIL, note, fix_space)
    if free < min_free_mb:
        return Check("data dir", WARN, f"{note}, under {min_free_mb} MB", fix_space)
    if path.exists() and path.stat().st_mode & 0o002:
        return Check("data dir", WARN, f"{note}; writable by every user", f"chmod o-w {path}")
    return Check("data dir", OK, note)


def _bindable(port: int) -> bool:
    """What the subprocess backend tests before it starts an engine on the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _sample(low: int, high: int, n: int) -> list[int]:
    size = high - low + 1
    if size <= n:
        return list(range(low, high + 1))
    return sorted({low + i * (size - 1) // (n - 1) for i in range(n)})


def check_ports(settings: Settings) -> Check:
    low, high = settings.port_min, settings.port_max
    note = f"ORCH_PORT_MIN..MAX {low}..{high} ({high - low + 1} ports)"
    found: list[tuple[Status, str, str]] = [(OK, note, "")]
    if low <= settings.port <= high:
        found.append((WARN, f"the API port ORCH_PORT={settings.port} is inside it", "move ORCH_PORT or the range"))
    if low < 1024 and hasattr(os, "geteuid") and os.geteuid() != 0:
        found.append((WARN, "ports under 1024 need privileges", "use ports from 1024 up"))
    if settings.engine_backend == "kubernetes":
        found.append((OK, "not bind-tested here (engines run in the cluster)", ""))
    else:
        sample = _sample(low, high, PORT_SAMPLE)
        free = sum(_bindable(p) for p in sample)
        what = f"{free} of {len(sample)}" + (" sampled" if len(sample) < high - low + 1 else "")
        status: Status = FAIL if free == 0 else WARN if free * 10 < len(sample) else OK
        fix = "" if status == OK else "stop what holds them, or move ORCH_PORT_MIN..ORCH_PORT_MAX"
        found.append((status, f"{what} free on 127.0.0.1", fix))
    status, _, fix = _worst(*found)
    return Check("ports", status, "; ".join(n for _, n, _ in found), fix)


def _password(dsn: str | None) -> str | None:
    try:
        return urlsplit(dsn).password if dsn else None
    except ValueError:
        return None


def redact(dsn: str) -> str:
    """The database URL without its password."""
    password = _password(dsn)
    if password:
        dsn = dsn.replace(f":{password}@", ":***@")
    return re.sub(r"(?i)(password=)[^&\s]*", r"\1***", dsn)


def _scrub(text: str, dsn: str | None) -> str:
    """An error message without the database password (raw or decoded)."""
    password = _password(dsn)
    if password:
        text = text.replace(password, "***").replace(unquote(password), "***")
    return redact(text)


_DB_FIXES = {
    "InvalidPasswordError": "check the user and password in ORCH_DATABASE_URL",
    "InvalidAuthorizationSpecificationError": "check the user in ORCH_DATABASE_URL (and pg_hba.conf)",
    "InvalidCatalogNameError": "create the database (createdb) or fix its name in ORCH_DATABASE_URL",
}


def _known_revision(version: str) -> bool:
    from alembic.script import ScriptDirectory

    from bap_engine.db import migrate

    try:
        ScriptDirectory(str(Path(migrate.__file__).with_name("migrations"))).get_revision(version)
    except Exception:  # alembic raises several kinds for an unknown revision
        return False
    return True


async def _migrations(conn: asyncpg.Connection) -> Check:
    from bap_engine.db import migrate

    head = migrate.head_revision()
    fix = "run `bap-engine migrate` (serve also migrates at start)"
    try:
        if await migrate.is_current(conn, head):
            return Check("migrations", OK, f"schema at head {head}")
        version = await conn.fetchval("SELECT version_num FROM alembic_version")
    except asyncpg.UndefinedTableError:
        version = None
    except (asyncpg.PostgresError, OSError) as e:
        return Check("migrations", FAIL, f"cannot read the schema version: {_first_line(e)}", "check the database")
    if version is None:
        return Check("migrations", WARN, f"no schema yet (head {head})", fix)
    if not _known_revision(str(version)):
        return Check("migrations", FAIL, f"schema at {version}, unknown to this bap-engine (head {head}): "
                                         "a newer version migrated it", "upgrade bap-engine")
    return Check("migrations", WARN, f"schema at {version}, behind head {head}", fix)


async def check_database(settings: Settings, timeout: float) -> list[Check]:
    """The database and its migrations (two checks)."""
    from bap_engine.app import database  # imported here: the other commands need none of the server
    pg = settings.data_dir.resolve() / "pg"
    where, fix, limit = f"embedded Postgres under {pg}", f"see {pg / 'log'}, or set ORCH_DATABASE_URL", max(
        timeout, EMBEDDED_START_S)
    if not settings.embedded:
        where, limit = redact(settings.database_url or ""), timeout
        fix = "check that Postgres runs, and ORCH_DATABASE_URL"
    try:
        async with asyncio.timeout(limit), database(settings) as dsn:
            conn = await asyncpg.connect(dsn, timeout=timeout)
            try:
                version = conn.get_server_version()
                return [Check("database", OK, f"{where}: PostgreSQL {version.major}.{version.minor}"),
                        await _migrations(conn)]
            finally:
                await conn.close()
    except TimeoutError:
        problem = "timed out"
    except Exception as e:  # whatever the driver or pgserver raise, it is this check's FAIL
        problem = _scrub(f"{type(e).__name__}: {_first_line(e)}", settings.database_url)
        fix = _DB_FIXES.get(type(e).__name__, fix)
    return [Check("database", FAIL, f"{where}: unreachable: {problem}", fix),
            Check("migrations", SKIP, "needs the database")]


_BACKEND_FIXES = {
    "subprocess": "check ORCH_DATA_DIR",
    "docker": "start the daemon (scripts/docker-up.sh) or check DOCKER_HOST and its permissions",
    "kubernetes": "check ORCH_KUBECONFIG (or the in-cluster service account) and that the cluster runs",
}


def _backend_note(settings: Settings) -> str:
    if settings.engine_backend == "subprocess":
        return f"subprocess: data directory usable, engine command {settings.engine_argv[0]}"
    if settings.engine_backend == "docker":
        return (f"docker: daemon answers; the image ({settings.engine_image}) is not looked up here: a missing "
                "one fails its provision")
    return f"kubernetes: API answers (namespace {settings.k8s_namespace})"


async def check_backend(settings: Settings, timeout: float, data_dir_ok: bool) -> Check:
    from bap_engine.app import build_backend
    name, fix = settings.engine_backend, _BACKEND_FIXES[settings.engine_backend]
    if name == "subprocess":
        if not data_dir_ok:
            return Check("backend", SKIP, "subprocess: needs the data directory")
        program = settings.engine_argv[0]
        if shutil.which(program) is None:
            return Check("backend", FAIL, f"subprocess: engine command not found or not executable: {program}",
                         "fix ORCH_ENGINE_COMMAND")
    try:
        backend = build_backend(settings)
    except Exception as e:  # an SDK refusing its configuration
        return Check("backend", FAIL, f"{name}: {type(e).__name__}: {_first_line(e)}", fix)
    try:
        await asyncio.wait_for(backend.ping(), timeout)
    except TimeoutError:
        return Check("backend", FAIL, f"{name}: ping got no answer within {timeout:g} s", fix)
    except Exception as e:  # BackendError (its message says what is wrong), or an SDK error
        return Check("backend", FAIL, str(getattr(e, "message", "") or _first_line(e)), fix)
    finally:
        try:
            await backend.close()
        except Exception:  # closing a client that never connected: nothing to report
            pass
    return Check("backend", OK, _backend_note(settings))
