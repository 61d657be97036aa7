"""Subprocess backend: each engine is a child process listening on a 127.0.0.1 port.

Owns `data_dir/engines/<engine_id>/`, the engine's data directory (its `/data`), which
holds `engine.log` and `.bap-process.json`: the record of the spec (env included, so the
file is 0600) and of the running pid plus its /proc starttime, which guards against pid
reuse. The record's `image` is the engine's version: it runs that version's command
(`SubprocessConfig.commands`; `command` without one), so a stopped engine restarts on its
own version. Engines run in their own session, so they outlive an orchestrator restart; a new
backend re-attaches through the record files. pause/resume are SIGSTOP/SIGCONT on the
process group. cpus/memory are informational here (not enforced).

It never reads configuration from the environment: only the basic variables named in
`SubprocessConfig.inherit_env` (PATH, HOME, LANG, ...) are forwarded to engines, never
the orchestrator's secrets. It raises only `base` errors, translated in `_translated`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

from bap_engine.backends import base

__all__ = ["SubprocessConfig", "SubprocessBackend", "RECORD_NAME", "LOG_NAME"]

RECORD_NAME = ".bap-process.json"
LOG_NAME = "engine.log"
_BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")
_ENGINE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_TRANSIENT = frozenset({errno.EAGAIN, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EBUSY, errno.EINTR})
_POLL_S = 0.02
_DESTROY_GRACE_S = 2.0
_KILL_WAIT_S = 5.0
_SIGNAL_SETTLE_S = 2.0

_Record = dict[str, object]


@dataclass(frozen=True, slots=True)
class SubprocessConfig:
    """Where engines keep their data, how to start one, and which deployment owns them."""

    data_dir: Path
    command: tuple[str, ...]
    deployment: str
    host: str = "127.0.0.1"
    # version (the spec's image) → command; empty: every version runs `command`
    commands: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    inherit_env: tuple[str, ...] = _BASE_ENV  # names copied from the orchestrator's env, if set


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """Turn OS and decoding errors into BackendError (the one translation point)."""
    try:
        yield
    except base.BackendError:
        raise
    except OSError as exc:
        raise base.BackendError(f"{what}: {exc.strerror or exc}", transient=exc.errno in _TRANSIENT) from exc
    except (ValueError, TypeError, KeyError) as exc:
        raise base.BackendError(f"{what}: bad process record ({exc})") from exc


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, starttime) from /proc/<pid>/stat, or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    parts = raw[raw.rindex(")") + 2 :].split()  # comm may contain spaces and parentheses
    return parts[0], int(parts[19])  # fields 3 (state) and 22 (starttime)


def _live(record: _Record) -> tuple[int, str] | None:
    """(pid, /proc state letter) if the recorded process is alive and still the same process."""
    pid, starttime = record.get("pid"), record.get("starttime")
    if not isinstance(pid, int) or not isinstance(starttime, int):
        return None
    stat = _proc_stat(pid)
    if stat is None or stat[1] != starttime or stat[0] in ("Z", "X", "x"):
        return None  # gone, pid reused by another process, or a zombie
    return pid, stat[0]


_SPAWN_GRACE_S = 5.0


def _adopt_spawned(directory: Path, record: _Record | None) -> _Record | None:
    """A record left `spawning` (the orchestrator died between the spawn and writing the pid):
    find the engine by the BAP_ENGINE_ID in its environment and record its pid, so no engine
    ever runs unseen. Only such records cost a /proc scan, once."""
    if record is None or not record.get("spawning") or record.get("pid") is not None:
        return record
    since = datetime.fromisoformat(str(record["spawning"]))
    spawner = record.get("spawner")
    spawner_alive = not isinstance(spawner, int) or _proc_stat(spawner) is not None
    if spawner_alive and (datetime.now(UTC) - since).total_seconds() < _SPAWN_GRACE_S:
        return record  # a spawn in flight: its process writes the pid itself (a dead spawner never will)
    needle = f"BAP_ENGINE_ID={record.get('engine_id')}".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in Path(entry.path, "environ").read_bytes().split(b"\0"):
                stat = _proc_stat(int(entry.name))
                record.update(pid=int(entry.name), starttime=stat[1] if stat else None)
                break
    record.pop("spawning", None)
    record.pop("spawner", None)
    with contextlib.suppress(OSError):
        _write_record(directory / RECORD_NAME, record)
    return record


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the engine's process group (its session), falling back to the pid alone."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Same option the engine's server sets, so a port in TIME_WAIT is not reported as taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def _write_record(path: Path, record: _Record) -> None:
    """Atomically replace the record (0600: it holds the engine's env).

    No fsync: the record describes processes, which do not survive the machine either; the
    rename alone keeps it whole across a crash of the orchestrator (and fsync twice per
    create was the largest cost of a burst of provisions)."""
    fd, tmp = tempfile.mkstemp(prefix=".bap-process.", dir=path.parent)  # mkstemp creates 0600
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_record(path: Path) -> _Record | None:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def _str_map(value: object) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


class SubprocessBackend:
    """Engines as local processes. Lives with `lifecycle`; see the module docstring."""

    name = "subprocess"

    def __init__(self, config: SubprocessConfig) -> None:
        if not config.command:
            raise ValueError("SubprocessConfig.command must not be empty")
        self._config = config
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    def command_for(self, version: str) -> tuple[str, ...]:
        """The command line of an engine version (`command` for one without its own)."""
        return self._config.commands.get(version) or self._config.command

    def _dir(self, engine_id: str) -> Path:
        if not _ENGINE_ID.match(engine_id) or engine_id in (".", ".."):
            raise base.BackendError(f"invalid engine id for the subprocess backend: {engine_id!r}")
        return self._config.data_dir / "engines" / engine_id

    def _record(self, engine_id: str) -> _Record | None:
        return _adopt_spawned(self._dir(engine_id), _read_record(self._dir(engine_id) / RECORD_NAME))

    def _reap(self, engine_id: str) -> None:
        """poll() our own child so an exited engine does not linger as a zombie."""
        child = self._children.get(engine_id)
        if child is not None and child.poll() is not None:
            del self._children[engine_id]

    def _observe(self, engine_id: str, record: _Record | None) -> base.Observed:
        if record is None:
            return base.Observed(engine_id=engine_id, state=base.ObservedState.ABSENT)
        self._reap(engine_id)
        live = _live(record)
        state = base.ObservedState.EXITED
        if live is not None:  # "T": stopped by SIGSTOP
            state = base.ObservedState.PAUSED if live[1] == "T" else base.ObservedState.RUNNING
        created = record.get("created_at")
        at = datetime.fromisoformat(created) if isinstance(created, str) else None
        labels = _str_map(record.get("labels"))
        return base.Observed(engine_id, state, labels, at, str(live[0]) if live else "")

    def _env(self, engine_id: str, directory: Path, port: int, spec_env: Mapping[str, str]) -> dict[str, str]:
        env = {name: os.environ[name] for name in self._config.inherit_env if name in os.environ}
        env.update(spec_env)
        env.update(PORT=str(port), HOST=self._config.host, SQLITE_DB_PATH=str(directory / "brain.sqlite"))
        env.update(BAP_ENGINE_ID=engine_id, BAP_DEPLOYMENT=self._config.deployment)
        return env

    def _spawn(self, engine_id: str, record: _Record) -> base.Placement:
        """Start the engine described by `record` and persist its pid (blocking; run in a thread)."""
        directory = self._dir(engine_id)
        port = int(str(record["port"]))
        env = self._env(engine_id, directory, port, _str_map(record.get("env")))
        command = self.command_for(str(record.get("image") or ""))
        if shutil.which(command[0], path=env.get("PATH", os.defpath)) is None:
            raise base.ImageNotFound(command[0])
        if not _port_free(self._config.host, port):
            raise base.PortInUse(port)
        record.update(pid=None, starttime=None, spawning=_now(), spawner=os.getpid())
        _write_record(directory / RECORD_NAME, record)  # a crash before the pid is recorded is adopted later
        log_fd = os.open(directory / LOG_NAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            child = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=directory,
                start_new_session=True,  # own session: survives the orchestrator, one group to signal
            )
        except (FileNotFoundError, PermissionError) as exc:
            raise base.ImageNotFound(command[0]) from exc
        finally:
            os.close(log_fd)
        self._children[engine_id] = child
        stat = _proc_stat(child.pid)
        record.update(pid=child.pid, starttime=stat[1] if stat else None, started_at=_now())
        record.pop("spawning", None)
        record.pop("spawner", None)
        try:
            _write_record(directory / RECORD_NAME, record)
        except BaseException:
            _signal_group(child.pid, signal.SIGKILL)
            child.wait()
            del self._children[engine_id]
            raise
        return base.Placement(engine_id=engine_id, url=self.url_for(engine_id, port), ref=str(child.pid))

    def _create_sync(self, spec: base.EngineSpec) -> base.Placement:
        directory = self._dir(spec.engine_id)
        existing = _read_record(directory / RECORD_NAME)
        live = _live(existing) if existing is not None else None
        if existing is not None and live is not None:
            if existing.get("port") != spec.port or existing.get("env") != dict(spec.env):
                raise base.BackendError(f"engine {spec.engine_id} already runs with another port or env")
            return base.Placement(spec.engine_id, self.url_for(spec.engine_id, spec.port), str(live[0]))
        fresh, deployment = not directory.exists(), self._config.deployment
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        record: _Record = {f.name: getattr(spec, f.name) for f in fields(spec)}
        labels = {**spec.labels, base.LABEL_ENGINE_ID: spec.engine_id, base.LABEL_PRODUCT_ID: spec.product_id}
        labels[base.LABEL_DEPLOYMENT] = deployment
        record.update(version=1, deployment=deployment, env=dict(spec.env), labels=labels)
        record.update(created_at=_now(), pid=None, starttime=None)
        try:
            _write_record(directory / RECORD_NAME, record)  # intent first: a crash leaves a trace
            return self._spawn(spec.engine_id, record)
        except BaseException:
            if fresh:  # nothing ran: leave nothing behind
                shutil.rmtree(directory, ignore_errors=True)
            raise

    def _start_sync(self, engine_id: str) -> None:
        record = self._record(engine_id)
        if record is None:
            raise base.EngineAbsent(engine_id)
        self._reap(engine_id)
        if _live(record) is None:
            self._spawn(engine_id, record)

    def _mark_stopped(self, engine_id: str) -> None:
        path = self._dir(engine_id) / RECORD_NAME
        record = _read_record(path)
        if record is not None and record.get("pid") is not None:
            record.update(pid=None, starttime=None, stopped_at=_now())
            _write_record(path, record)

    async def _wait_state(
        self, engine_id: str, record: _Record, done: Callable[[str | None], bool], timeout: float
    ) -> bool:
        """Poll (every ~20 ms) until `done(state letter)` holds (None = not alive)."""
        deadline = time.monotonic() + timeout
        while True:
            self._reap(engine_id)
            live = _live(record)
            if done(live[1] if live else None):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_POLL_S)

    async def _stop(self, engine_id: str, grace_s: float) -> None:
        record = self._record(engine_id)
        if record is None:
            return
        self._reap(engine_id)
        live = _live(record)
        if live is not None:
            pid = live[0]
            _signal_group(pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            _signal_group(pid, signal.SIGTERM)
            if not await self._wait_state(engine_id, record, _dead, grace_s):
                _signal_group(pid, signal.SIGKILL)
                if not await self._wait_state(engine_id, record, _dead, _KILL_WAIT_S):
                    raise base.BackendError(f"pid {pid} survived SIGKILL", transient=True)
            # Leader gone: stragglers still in its group (the pgid cannot be reused while they live).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        self._children.pop(engine_id, None)
        self._mark_stopped(engine_id)

    async def _signal_live(self, engine_id: str, sig: signal.Signals, done: Callable[[str | None], bool]) -> None:
        record = self._record(engine_id)
        self._reap(engine_id)
        live = _live(record) if record is not None else None
        if record is None or live is None:
            raise base.EngineAbsent(engine_id)
        _signal_group(live[0], sig)
        await self._wait_state(engine_id, record, done, _SIGNAL_SETTLE_S)

    async def create(self, spec: base.EngineSpec) -> base.Placement:
        """Spawn the engine without waiting for health; a running engine with the same port and env
        is returned as is. Raises ImageNotFound, PortInUse, BackendError."""
        with _translated(f"subprocess create {spec.engine_id}"):
            return await asyncio.to_thread(self._create_sync, spec)

    async def start(self, engine_id: str) -> None:
        """Re-spawn a stopped engine (same data and port); no-op if running. Raises EngineAbsent."""
        with _translated(f"subprocess start {engine_id}"):
            await asyncio.to_thread(self._start_sync, engine_id)

    async def stop(self, engine_id: str, grace_s: float = 30) -> None:
        """SIGCONT+SIGTERM the group, wait grace_s, SIGKILL; data kept. Absent is success."""
        with _translated(f"subprocess stop {engine_id}"):
            await self._stop(engine_id, grace_s)

    async def pause(self, engine_id: str) -> None:
        """SIGSTOP the engine's process group. Raises EngineAbsent, BackendError."""
        with _translated(f"subprocess pause {engine_id}"):
            await self._signal_live(engine_id, signal.SIGSTOP, lambda state: state in (None, "T"))

    async def resume(self, engine_id: str) -> None:
        """SIGCONT the engine's process group. Raises EngineAbsent, BackendError."""
        with _translated(f"subprocess resume {engine_id}"):
            await self._signal_live(engine_id, signal.SIGCONT, lambda state: state != "T")

    async def destroy(self, engine_id: str) -> None:
        """Stop (2 s grace) and delete the data directory. Idempotent. Raises BackendError."""
        with _translated(f"subprocess destroy {engine_id}"):
            await self._stop(engine_id, _DESTROY_GRACE_S)
            directory = self._dir(engine_id)
            if directory.exists():
                await asyncio.to_thread(shutil.rmtree, directory)

    async def inspect(self, engine_id: str) -> base.Observed:
        """Observe one engine (ABSENT without a record). Raises BackendError."""
        with _translated(f"subprocess inspect {engine_id}"):
            return self._observe(engine_id, self._record(engine_id))

    async def list_managed(self) -> list[base.Observed]:
        """Every engine recorded under data_dir for this deployment (one directory scan)."""
        with _translated("subprocess list"):
            records = await asyncio.to_thread(self._scan)
            return [self._observe(engine_id, record) for engine_id, record in records]

    def _scan(self) -> list[tuple[str, _Record]]:
        found: list[tuple[str, _Record]] = []
        try:
            entries = list(os.scandir(self._config.data_dir / "engines"))
        except FileNotFoundError:
            return found
        for entry in entries:
            with contextlib.suppress(ValueError):  # a corrupt record is not ours to judge here
                record = _adopt_spawned(Path(entry.path), _read_record(Path(entry.path) / RECORD_NAME))
                if record is not None and record.get("deployment") == self._config.deployment:
                    found.append((entry.name, record))
        return found

    async def has_version(self, version: str) -> bool:
        """A version is one of the configured commands (without any, every version runs `command`)."""
        return not self._config.commands or version in self._config.commands

    async def ping(self) -> None:
        """The data directory exists or can be made (a bad engine command fails its provision)."""
        try:
            (self._config.data_dir / "engines").mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise base.BackendError(f"data directory unusable: {err.strerror}") from None

    def url_for(self, engine_id: str, port: int) -> str:
        """Base URL of an engine, without I/O."""
        host = self._config.host
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def close(self) -> None:
        """Forget our children; engines keep running (they outlive the orchestrator)."""
        self._children.clear()


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _dead(state: str | None) -> bool:
    return state is None
