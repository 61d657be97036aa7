"""/proc, read directly: the engine processes of this soak, the TCP listeners on its engine
ports, the subprocess backend's process records, and signals by pid.

An engine process is ours when it is a session leader (the backend starts each engine in its
own session) whose environment says BAP_DEPLOYMENT=<this run's unique deployment>; nothing
else on the machine is ever signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EngineProc", "scan_engines", "listeners", "records", "kill9", "end_group", "starttime"]

_LISTEN = "0A"
_RECORD = ".bap-process.json"  # the subprocess backend's record (backends/subprocess.py RECORD_NAME)


@dataclass(frozen=True, slots=True)
class EngineProc:
    pid: int
    starttime: int
    engine_id: str
    port: int
    state: str  # /proc state letter; "T" = stopped by SIGSTOP (a sleeping engine)


def _stat(pid: int) -> list[str] | None:
    """Fields after `comm` of /proc/<pid>/stat: [state, ppid, pgrp, session, ...]."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def starttime(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None if gone or a zombie."""
    fields = _stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def scan_engines(deployment: str) -> list[EngineProc]:
    """Every live engine process (session leader) of `deployment`."""
    found: list[EngineProc] = []
    for pid in _pids():
        fields = _stat(pid)
        if fields is None or fields[0] in ("Z", "X") or int(fields[3]) != pid:
            continue
        env = _environ(pid)
        if env.get("BAP_DEPLOYMENT") != deployment or "BAP_ENGINE_ID" not in env:
            continue
        with contextlib.suppress(ValueError):
            found.append(EngineProc(pid, int(fields[19]), env["BAP_ENGINE_ID"], int(env.get("PORT", "0")),
                                    fields[0]))
    return found


def _listening_inodes(low: int, high: int) -> dict[str, int]:
    """socket inode -> port, for TCP sockets listening on a port in [low, high]."""
    out: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if len(cols) < 10 or cols[3] != _LISTEN:
                    continue
                port = int(cols[1].rsplit(":", 1)[1], 16)
                if low <= port <= high:
                    out[cols[9]] = port
    return out


def listeners(low: int, high: int) -> dict[int, set[int]]:
    """port -> pids holding a listening socket on it (every process on the machine is looked at)."""
    inodes = _listening_inodes(low, high)
    held: dict[int, set[int]] = {port: set() for port in inodes.values()}
    if not inodes:
        return held
    for pid in _pids():
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:[") and target[8:-1] in inodes:
                        held[inodes[target[8:-1]]].add(pid)
    return held


def records(data_dir: Path) -> dict[str, tuple[int | None, int | None]]:
    """engine id -> (pid, starttime) from the backend's process records (None, None: stopped)."""
    out: dict[str, tuple[int | None, int | None]] = {}
    for path in (data_dir / "engines").glob(f"*/{_RECORD}"):
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(path.read_text())
            pid, start = doc.get("pid"), doc.get("starttime")
            out[path.parent.name] = (pid if isinstance(pid, int) else None,
                                     start if isinstance(start, int) else None)
    return out


def kill9(proc: EngineProc) -> bool:
    """SIGKILL one engine process (the pid only: a crash), if it is still the same process."""
    if starttime(proc.pid) != proc.starttime:
        return False
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def end_group(pid: int, start: int | None, grace_s: float = 3.0) -> None:
    """Cleanup: SIGCONT + SIGTERM the process group, wait, SIGKILL it (same process only)."""
    if start is not None and starttime(pid) != start:
        return
    for sig in (signal.SIGCONT, signal.SIGTERM):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and starttime(pid) is not None:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
