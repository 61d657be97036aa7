"""The soak's own Postgres: initdb, start, fast stop and start again (the mid-run restart), and
the final stop, on a fixed 127.0.0.1 port so the replicas' DSN survives the restart.

Binaries: the ones bundled in the pgserver package (a dependency, so `make install` is enough),
else Debian's /usr/lib/postgresql/<newest>/bin. As root, Postgres runs as a non-root user
through `runuser`: `pgserver` for the bundled binaries (created like pgserver itself does when
missing, with the same permission fixes on its install directory), `postgres` for Debian's.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import signal
import stat
import subprocess
import time
from pathlib import Path

__all__ = ["Postgres", "find_binaries"]

_CONF = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = ''
max_connections = 200
fsync = off
shared_buffers = 64MB
log_min_messages = warning
"""


def find_binaries() -> tuple[Path, str]:
    """(bin directory, the OS user Postgres must run as when we are root)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "pginstall" / "bin"
        if (bundled / "pg_ctl").exists():
            return bundled, "pgserver"
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    if debian:
        return debian[-1].parent, "postgres"
    raise SystemExit("soak: no PostgreSQL binaries (neither pgserver's in .venv nor /usr/lib/postgresql): "
                     "run `make install`")


def _prepare_user(bin_dir: Path, user: str) -> None:
    """As root: the run user exists and can read and run the binaries (what pgserver does too)."""
    try:
        pwd.getpwnam(user)
    except KeyError:
        if user != "pgserver":
            raise SystemExit(f"soak: the OS user {user!r} that must run Postgres does not exist") from None
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user],
                       check=True, capture_output=True)
    traverse = stat.S_IXOTH | stat.S_IROTH | stat.S_IXGRP | stat.S_IRGRP
    for prefix in (bin_dir.parent, *bin_dir.parent.parents):
        mode = prefix.stat().st_mode
        if mode & (stat.S_IXOTH | stat.S_IXGRP) != (stat.S_IXOTH | stat.S_IXGRP):
            prefix.chmod(mode | traverse)
    for sub in (bin_dir, bin_dir.parent / "lib", bin_dir.parent / "share"):
        for path in [sub, *sub.rglob("*")] if sub.exists() else []:
            mode = path.stat().st_mode
            want = mode | stat.S_IROTH | stat.S_IRGRP | ((stat.S_IXOTH | stat.S_IXGRP) if path.is_dir() else 0)
            if path.parent == bin_dir:
                want |= stat.S_IXOTH | stat.S_IXGRP
            if want != mode:
                path.chmod(want)


class Postgres:
    """One cluster under `workdir/pg`, listening on 127.0.0.1:`port`, user postgres, trust auth."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.bin_dir, user = find_binaries()
        self.user = user if os.geteuid() == 0 else None
        self.pgdata = workdir / "pg"
        self.port = port
        self.out = workdir / "pg_ctl.out"
        self.dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def _run(self, tool: str, *args: str, timeout: float = 60) -> None:
        argv = [str(self.bin_dir / tool), *args]
        if self.user is not None:
            argv = ["runuser", "-u", self.user, "--", *argv]
        with self.out.open("ab") as out:  # never a pipe: the postmaster would inherit it
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout, check=False)
        if done.returncode != 0:
            tail = self.out.read_text(errors="replace")[-1500:]
            raise RuntimeError(f"{tool} {' '.join(args)} exited {done.returncode}:\n{tail}")

    def init(self) -> None:
        if self.user is not None:
            _prepare_user(self.bin_dir, self.user)
        self.pgdata.mkdir(mode=0o700)
        self.pgdata.parent.chmod(0o755)  # the run user must reach pgdata
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.pgdata), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
                  "--no-sync")
        with (self.pgdata / "postgresql.conf").open("a") as conf:
            conf.write(_CONF.format(port=self.port))

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.pgdata), "-l", str(self.pgdata / "server.log"), "-w", "-t", "60",
                  "start", timeout=90)

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.pgdata), "-m", mode, "-w", "-t", "60", "stop", timeout=90)

    def pid(self) -> int | None:
        """The postmaster's pid, if it runs on our pgdata."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.pgdata / "postmaster.pid").read_text().split()[0])
            if str(self.pgdata) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                return pid
        return None

    def shutdown(self) -> None:
        """Stop it for good: fast stop, else SIGQUIT/SIGKILL the postmaster (ours: pgdata in its cmdline)."""
        if self.pid() is None:
            return
        try:
            self.stop("fast")
        except (RuntimeError, subprocess.TimeoutExpired):
            pid = self.pid()
            for sig in (signal.SIGQUIT, signal.SIGKILL):
                if pid is None:
                    return
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                time.sleep(3)
                pid = self.pid()

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.pgdata / "server.log").read_text(errors="replace").splitlines()[-lines:])
        return ""
