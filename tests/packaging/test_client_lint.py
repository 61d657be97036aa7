"""The client distribution passes ruff and mypy --strict under its own configuration
(clients/python/pyproject.toml); `make lint` covers src/ and tests/, this covers clients/python."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.packaging.conftest import CLIENT_DIR, run

BIN = Path(sys.executable).parent


def _tool(name: str) -> Path:
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            pytest.fail(f"{name} is not installed (it is a dev dependency: make install)")
        path = Path(found)
    return path


def test_client_is_ruff_clean() -> None:
    run([_tool("ruff"), "check", "--no-cache", "."], cwd=CLIENT_DIR)


def test_client_is_mypy_strict_clean(tmp_path: Path) -> None:
    out = run([_tool("mypy"), "--cache-dir", tmp_path / "mypy"], cwd=CLIENT_DIR)
    assert "Success" in out, out
