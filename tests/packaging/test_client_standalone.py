"""`pip install ./clients/python` in a clean venv brings httpx and nothing of the server.

The client's tree is copied to tmp first (pip builds in the source tree), installed into a venv made
`--without-pip` (so it holds nothing else), then imported with `python -I` from outside the repository.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.packaging.conftest import CLIENT_DIR, COPY_IGNORE, Venv

# The server's heavy dependencies: importing the client must load none of them.
SERVER_ONLY = ("bap_engine", "fastapi", "starlette", "asyncpg", "sqlalchemy", "docker", "kubernetes_asyncio",
               "pydantic", "uvicorn", "alembic", "pgserver")

PROBE = """
import importlib.metadata as md, importlib.util, json, re, sys
import bap_engine_client
from bap_engine_client import AsyncBapClient, BapClient, ERRORS_BY_CODE

def closure(name):
    seen, todo = set(), [name]
    while todo:
        try:
            dist = md.distribution(todo.pop())
        except md.PackageNotFoundError:  # a requirement whose marker excludes it here
            continue
        key = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if key in seen:
            continue
        seen.add(key)
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(re.match(r"[A-Za-z0-9._-]+", req).group(0))
    return seen

installed = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower() for d in md.distributions()}
print(json.dumps({
    "file": bap_engine_client.__file__,
    "server_importable": importlib.util.find_spec("bap_engine") is not None,
    "modules": sorted(sys.modules),
    "requires": md.requires("bap-engine-client"),
    "installed": sorted(installed),
    "closure": sorted(closure("bap-engine-client")),
    "codes": len(ERRORS_BY_CODE),
}))
"""


def test_client_installs_alone_and_imports_nothing_of_the_server(tmp_path: Path) -> None:
    source = tmp_path / "client"
    shutil.copytree(CLIENT_DIR, source, ignore=COPY_IGNORE)
    venv = Venv.create(tmp_path / "venv")
    venv.pip("install", "-q", source)

    found = json.loads(venv.python(PROBE).strip().splitlines()[-1])

    assert Path(found["file"]).is_relative_to(venv.path), found["file"]  # the installed copy, not the tree
    assert found["server_importable"] is False
    loaded = {m.split(".")[0] for m in found["modules"]}
    assert not loaded & set(SERVER_ONLY), sorted(loaded & set(SERVER_ONLY))
    assert [r.split(">")[0].split("=")[0].strip() for r in found["requires"]] == ["httpx"]
    # everything installed came with bap-engine-client: httpx and its dependencies
    extra = set(found["installed"]) - set(found["closure"])
    assert not extra, f"installed beyond the client's dependencies: {sorted(extra)}"
    assert found["codes"] > 0
