"""`python -m build` makes an sdist and a wheel of the server and of the client, without deprecation
warnings, and each pair installs into a clean venv where the CLI runs and both packages import.

The server's dependencies come from pip's cache (a cold cache downloads them: ~10 s here warm, the
whole module well under the 3-minute budget); the client dist is given on the same pip command line,
so `bap-engine-client` is never looked up on an index.
"""

from __future__ import annotations

import re
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import bap_engine_client
import pytest

import bap_engine
from tests.packaging.conftest import Dists, Venv, run

SMOKE = """
import importlib.metadata as md
import bap_engine, bap_engine_client, bap_engine.client
assert bap_engine.client.BapClient is bap_engine_client.BapClient
assert md.version("bap-engine") == bap_engine.__version__, md.version("bap-engine")
assert md.version("bap-engine-client") == bap_engine_client.__version__
print(bap_engine.__file__, bap_engine_client.__file__)
"""


def _wheel_metadata(wheel: Path) -> tuple[dict[str, list[str]], list[str]]:
    """The wheel's METADATA fields (each a list of values) and its file names."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        text = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    msg = Parser().parsestr(text, headersonly=True)
    fields: dict[str, list[str]] = {}
    for key, value in msg.items():
        fields.setdefault(key, []).append(value)
    return fields, names


def test_builds_print_no_deprecation_warning(dists: Dists) -> None:
    assert dists.setuptools_versions, "python -m build did not report the setuptools it used"
    assert all(int(v.split(".")[0]) >= 77 for v in dists.setuptools_versions), dists.setuptools_versions
    warned = [line for line in dists.log.splitlines() if re.search(r"deprecat", line, re.IGNORECASE)]
    assert not warned, "\n".join(warned)


def test_server_wheel_metadata(dists: Dists) -> None:
    fields, names = _wheel_metadata(dists.server_wheel)
    assert fields["Version"] == [bap_engine.__version__]  # the one place: bap_engine.__version__
    assert fields["License-Expression"] == ["Apache-2.0"] and "License" not in fields
    assert fields["License-File"] == ["LICENSE"]
    assert any(r.startswith("bap-engine-client") for r in fields["Requires-Dist"])
    assert "bap_engine/py.typed" in names and "bap_engine/client/__init__.py" in names
    assert not [n for n in names if n.startswith("bap_engine_client/")]  # the client ships on its own


def test_client_dists_metadata(dists: Dists) -> None:
    fields, names = _wheel_metadata(dists.client_wheel)
    assert fields["Version"] == [bap_engine_client.__version__]
    assert fields["License-Expression"] == ["Apache-2.0"] and fields["License-File"] == ["LICENSE"]
    assert [re.split(r"[<>=!~ ;]", r)[0] for r in fields["Requires-Dist"]] == ["httpx"]
    packages = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert packages == {"bap_engine_client"} and "bap_engine_client/py.typed" in names
    with tarfile.open(dists.client_sdist) as tf:
        members = {m.split("/", 1)[-1] for m in tf.getnames()}
    assert {"scripts/gen_sync.py", "LICENSE", "src/bap_engine_client/_async.py"} <= members


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_dists_install_into_a_clean_venv_and_run(dists: Dists, kind: str, tmp_path: Path) -> None:
    server, client = (dists.server_wheel, dists.client_wheel) if kind == "wheel" else (
        dists.server_sdist, dists.client_sdist)
    venv = Venv.create(tmp_path / "venv")
    venv.pip("install", "-q", server, client)

    files = venv.python(SMOKE).split()
    assert all(Path(f).is_relative_to(venv.path) for f in files), files  # not the work tree's copies
    help_text = run([venv.bin / "bap-engine", "--help"], cwd=venv.path)
    assert "Usage" in help_text and "serve" in help_text
