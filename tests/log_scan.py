"""Session-wide log scan: no key, token, admin key or master key in any log the test run wrote.

This is a pytest plugin (loaded by `pytest_plugins` in tests/conftest.py), not a test, because a
hook is the robust choice: `pytest_sessionfinish` runs once after whatever was selected (one file,
`-k`, `-x` after a failure, a plugin that reorders tests), while a test meant to run last can be
deselected, reordered or followed by other tests, and cannot see the session fixtures' teardown
(the ops server's last lines). At session end it reads every log; if a line holds a secret it
prints the lines (secret masked) and sets the exit status to TESTS_FAILED.

What is read:
- the pytest process: a handler on the root logger, installed at session start, writes every
  record that reaches it through the production `JsonFormatter` (so the scrub is part of what is
  checked) to a temporary file; it is re-attached before each test if something replaced root's
  handlers. Logger levels are left alone (root is WARNING unless a test lowers it), so records a
  logger is not enabled for are never made and are not seen.
- `bap-engine serve` logs: the files given to `record_server_log` (tests/e2e/conftest.py) and every
  `serve*.log` under the session's base temp dir (tests/ops/conftest.py writes `serve.log` there).
  Every line counts, JSON or not (start-up echo, a raw traceback).

A secret is a platform or engine key, a webhook secret, a Fernet token or a Fernet key's shape
(defined here, apart from bap_engine.logs, so a bug in the scrub is not shared by its check), or a
value given to `record_secrets`: ADMIN_KEY, every `master_key` fixture, each server's
ORCH_ADMIN_KEY and ORCH_MASTER_KEY. Logs are read from pytest's base temp dir, so they must still
be there at session end: keep `tmp_path_retention_policy` at its default, "all".

PYTEST_DONT_REWRITE: conftest imports this module before pytest registers it as a plugin, and it
has no asserts to rewrite (without the marker pytest warns, and warnings are errors here).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bap_engine.logs import JsonFormatter

__all__ = ["record_secrets", "record_server_log"]

_SHAPES = (
    r"[ps]k-sept-[A-Za-z0-9_-]{8,}",
    r"whsec_[A-Za-z0-9_+/=-]{8,}",
    r"gAAAAA[A-Za-z0-9_-]{20,}",
    r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{43}=",  # a Fernet key (the master key) standing alone
)
_PREFIXES = ("pk-sept-", "sk-sept-", "whsec_", "gAAAAA")
_MAX_SHOWN = 40


@dataclass
class _Scan:
    secrets: set[str] = field(default_factory=set)
    server_logs: list[Path] = field(default_factory=list)
    basetemp: Path | None = None
    process_log: Path | None = None
    handler: logging.Handler | None = None
    reattached: int = 0


_scan = _Scan()


def record_secrets(*values: str | None) -> None:
    """Values no log line may contain (None, "None" and values under 6 characters are ignored)."""
    _scan.secrets.update(v for v in values if v and v != "None" and len(v) >= 6)


def record_server_log(path: Path, *secrets: str | None) -> None:
    """A `bap-engine serve` log to scan at session end, and the secrets that server was given."""
    _scan.server_logs.append(path)
    record_secrets(*secrets)


def pytest_sessionstart(session: pytest.Session) -> None:
    fd, name = tempfile.mkstemp(prefix="bap-test-log-", suffix=".jsonl")
    os.close(fd)
    _scan.process_log = Path(name)
    handler = logging.FileHandler(name, encoding="utf-8")
    handler.setFormatter(JsonFormatter())
    _scan.handler = handler
    logging.getLogger().addHandler(handler)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    root = logging.getLogger()
    if _scan.handler is not None and _scan.handler not in root.handlers:
        root.addHandler(_scan.handler)  # something (configure_logging?) replaced root's handlers
        _scan.reattached += 1


@pytest.fixture(scope="session", autouse=True)
def _log_scan_basetemp(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Where this session's tmp_path dirs (and so the servers' logs) live."""
    _scan.basetemp = tmp_path_factory.getbasetemp()


def _pattern() -> re.Pattern[str]:
    forms = {form for s in _scan.secrets for form in (s, json.dumps(s)[1:-1])}
    literals = [re.escape(s) for s in sorted(forms, key=len, reverse=True)]
    return re.compile("|".join((*_SHAPES, *literals)))


def _mask(match: re.Match[str]) -> str:
    text = match.group()
    prefix = next((p for p in _PREFIXES if text.startswith(p)), "")
    return f"{prefix}<masked {len(text)} chars>"


def _log_files() -> Iterator[Path]:
    if _scan.process_log is not None:
        yield _scan.process_log
    yield from _scan.server_logs
    if _scan.basetemp is not None:
        for folder, _dirs, files in os.walk(_scan.basetemp, onerror=lambda _err: None):
            yield from (Path(folder) / f for f in files if f.startswith("serve") and f.endswith(".log"))


def _findings(pattern: re.Pattern[str]) -> tuple[list[str], list[Path], int]:
    """(offending lines, masked; recorded logs that are gone; files read)."""
    found: list[str] = []
    missing: list[Path] = []
    seen: set[Path] = set()
    for path in _log_files():
        key = path.resolve()
        if key in seen:
            continue
        seen.add(key)
        if not path.exists():
            missing.append(path)
            continue
        with path.open(encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, 1):
                if pattern.search(line):
                    found.append(f"{path}:{number}: {pattern.sub(_mask, line.rstrip())[:600]}")
    return found, missing, len(seen) - len(missing)


def _report(session: pytest.Session, lines: list[str], *, failed: bool) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        sys.stderr.write("\n".join(lines) + "\n")  # -p no:terminal
        return
    reporter.ensure_newline()
    reporter.write_sep("=", "log secret scan", red=failed, yellow=not failed, bold=True)
    for line in lines:
        reporter.write_line(line)


@pytest.hookimpl(tryfirst=True)  # before pytest's tmpdir plugin may clean the base temp dir
def pytest_sessionfinish(session: pytest.Session, exitstatus: int | pytest.ExitCode) -> None:
    if _scan.handler is None or _scan.process_log is None:
        return
    logging.getLogger().removeHandler(_scan.handler)
    _scan.handler.close()
    found, missing, read = _findings(_pattern())
    notes = [f"log scan: {path} was recorded but is gone, not scanned" for path in missing]
    if _scan.reattached:
        notes.append(f"log scan: root handlers were replaced {_scan.reattached} time(s); handler re-attached")
    if not found:
        _scan.process_log.unlink(missing_ok=True)
        if notes:
            _report(session, notes, failed=False)
        return
    head = [f"log scan FAILED: {len(found)} log line(s) hold a key, token or the run's admin/master key "
            f"({read} files read; the pytest process log is kept at {_scan.process_log})"]
    shown = found[:_MAX_SHOWN] + ([f"... and {len(found) - _MAX_SHOWN} more"] if len(found) > _MAX_SHOWN else [])
    _report(session, head + shown + notes, failed=True)
    if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
