"""Fixtures and helpers of the packaging tests: clean venvs, pip, and the dists built once per session.

- `Venv`: a fresh `python -m venv --without-pip` in tmp, so it holds only what a test installs;
  `pip(...)` installs into it with this interpreter's pip (`pip --python`: a current pip, about
  twice as fast as the venv's bundled one; pip's cache and the machine's pip configuration serve the
  downloads); `python(...)` runs `python -I` there from a directory outside the repository, so
  nothing of the work tree is importable by accident.
- `dists` (session): `python -m build` of the server (the repository root) and of the client
  (`clients/python`, copied to tmp first), each an sdist and a wheel built from that sdist.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIENT_DIR = ROOT / "clients" / "python"
STEP_TIMEOUT_S = 240.0
# what a copy of a source tree leaves behind: build leftovers and caches
COPY_IGNORE = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", ".mypy_cache", ".ruff_cache")


def clean_env() -> dict[str, str]:
    """The environment of a subprocess: this process's, without anything pointing at the work tree."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def run(argv: Sequence[str | Path], cwd: Path, timeout: float = STEP_TIMEOUT_S) -> str:
    """Run a command; its combined output, or a test failure quoting the output's tail."""
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=clean_env(), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if proc.returncode != 0:
        shown = " ".join(str(a) if len(str(a)) < 200 else "<...>" for a in argv)
        pytest.fail(f"{shown} exited {proc.returncode}:\n{proc.stdout[-4000:]}")
    return proc.stdout


@dataclass(frozen=True)
class Venv:
    """A clean virtual environment in `path`; commands run from `path` (outside the repository)."""

    path: Path

    @classmethod
    def create(cls, path: Path) -> Venv:
        run([sys.executable, "-m", "venv", "--without-pip", path], cwd=path.parent)
        return cls(path)

    @property
    def bin(self) -> Path:
        return self.path / "bin"

    def pip(self, *args: str | Path) -> str:
        return run([sys.executable, "-m", "pip", "--python", self.bin / "python", *args], cwd=self.path)

    def python(self, code: str) -> str:
        return run([self.bin / "python", "-I", "-c", code], cwd=self.path)


@dataclass(frozen=True)
class Dists:
    """The sdist and wheel of each project, and the build output (for warnings)."""

    server_sdist: Path
    server_wheel: Path
    client_sdist: Path
    client_wheel: Path
    log: str
    seconds: float

    @property
    def setuptools_versions(self) -> set[str]:
        """The setuptools the isolated builds used (python -m build prints it)."""
        return set(re.findall(r"setuptools==(\S+)", self.log))


def _only(outdir: Path, pattern: str) -> Path:
    found = sorted(outdir.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {outdir}, found {found}"
    return found[0]


@pytest.fixture(scope="session")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    base = tmp_path_factory.mktemp("dists")
    out = base / "dist"
    client_src = base / "client-src"
    shutil.copytree(CLIENT_DIR, client_src, ignore=COPY_IGNORE)
    started = time.monotonic()
    log = run([sys.executable, "-m", "build", "--outdir", out, ROOT], cwd=base)
    log += run([sys.executable, "-m", "build", "--outdir", out, client_src], cwd=base)
    return Dists(server_sdist=_only(out, "bap_engine-*.tar.gz"), server_wheel=_only(out, "bap_engine-*.whl"),
                 client_sdist=_only(out, "bap_engine_client-*.tar.gz"),
                 client_wheel=_only(out, "bap_engine_client-*.whl"), log=log, seconds=time.monotonic() - started)
