"""deploy/docker-compose.yml (Postgres + the orchestrator) comes up with the local images and admits.

Needs a Docker daemon, Debian's `docker-compose` (1.29: `apt-get install docker-compose`) and the
images: `bap-engine/orchestrator:0.1.0` (scripts/build-images.sh; or $BAP_ORCHESTRATOR_IMAGE) and
`bap-engine/postgres:15` (or $BAP_POSTGRES_IMAGE), which the test builds from deploy/postgres on
`local/debian:bookworm` when it is missing and keeps by tag. Without them it skips; with
BAP_REQUIRE_DOCKER=1 (or "docker" in BAP_REQUIRE_BACKENDS) it fails instead.

Each run is its own compose project (`-p bapcompose<hex>`) with its own keys, its API and engine
ports picked on 127.0.0.1 (where the file publishes everything). The engines run as child processes
of the orchestrator inside its container (the subprocess backend with the reference engine): an
admitted engine answers /health on its published port. At the end `docker-compose down -v` removes
the containers, network and volumes, and the test checks that nothing of the project is left. The
orchestrator's log is scanned for keys with the rest of the run's logs (tests/log_scan.py).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import httpx
import pytest
from cryptography.fernet import Fernet

from tests.conftest import next_port_range
from tests.e2e.conftest import free_port
from tests.log_scan import record_server_log

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
ORCH_IMAGE = os.environ.get("BAP_ORCHESTRATOR_IMAGE", "bap-engine/orchestrator:0.1.0")
POSTGRES_IMAGE = os.environ.get("BAP_POSTGRES_IMAGE", "bap-engine/postgres:15")
DEBIAN_IMAGE = "local/debian:bookworm"  # scripts/build-images.sh's base, deploy/postgres's default
ENGINE_PORTS = 4  # engine ports published (ORCH_PORT_MIN..ORCH_PORT_MAX)
KEEP = os.environ.get("BAP_KEEP_TEST_RESOURCES") == "1"


def _unavailable(reason: str) -> NoReturn:
    wanted = {n.strip() for n in os.environ.get("BAP_REQUIRE_BACKENDS", "").split(",")}
    if os.environ.get("BAP_REQUIRE_DOCKER") == "1" or "docker" in wanted:
        pytest.fail(f"docker-compose test cannot run: {reason}")
    pytest.skip(f"docker-compose test cannot run: {reason}")


def _run(*argv: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _have_image(image: str) -> bool:
    return _run("docker", "image", "inspect", image).returncode == 0


def _ensure_images() -> None:
    """The orchestrator image must be there; the Postgres one is built from deploy/postgres if not."""
    if not _have_image(ORCH_IMAGE):
        _unavailable(f"image {ORCH_IMAGE} missing; run scripts/build-images.sh")
    if _have_image(POSTGRES_IMAGE):
        return
    if "BAP_POSTGRES_IMAGE" in os.environ or not _have_image(DEBIAN_IMAGE):
        _unavailable(f"image {POSTGRES_IMAGE} missing (and no {DEBIAN_IMAGE} to build it on; run "
                     "scripts/build-images.sh)")
    built = _run("docker", "build", "-q", "-t", POSTGRES_IMAGE, str(DEPLOY / "postgres"), timeout=600)
    assert built.returncode == 0, f"docker build deploy/postgres failed:\n{built.stderr[-3000:]}"


@dataclass
class Compose:
    """One compose project of deploy/docker-compose.yml, with its environment."""

    project: str
    admin_key: str
    port_min: int
    port_max: int
    api_port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return _run("docker-compose", "-f", str(COMPOSE_FILE), "-p", self.project, *args, env=self.env,
                    timeout=timeout)

    def logs(self, service: str = "") -> str:
        out = self("logs", "--no-color", *([service] if service else []), timeout=60)
        return out.stdout + out.stderr

    def leftovers(self) -> list[str]:
        """Containers, volumes and networks still labelled with this project."""
        label = f"label=com.docker.compose.project={self.project}"
        found = []
        for kind in (["ps", "-aq"], ["volume", "ls", "-q"], ["network", "ls", "-q"]):
            found += _run("docker", *kind, "--filter", label).stdout.split()
        return found


def _compose_env(c: Compose, master_key: str, password: str) -> dict[str, str]:
    """The caller's environment without ORCH_*/POSTGRES_*/COMPOSE_* (the file interpolates them),
    plus this project's keys, ports and images."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "POSTGRES_", "COMPOSE_"))}
    env.update(
        POSTGRES_PASSWORD=password, ORCH_MASTER_KEY=master_key, ORCH_ADMIN_KEY=c.admin_key,
        BAP_ORCHESTRATOR_PORT=str(c.api_port), ORCH_PORT_MIN=str(c.port_min), ORCH_PORT_MAX=str(c.port_max),
        BAP_ORCHESTRATOR_IMAGE=ORCH_IMAGE, BAP_POSTGRES_IMAGE=POSTGRES_IMAGE, ORCH_DEPLOYMENT=c.project,
    )
    return env


@pytest.fixture
def compose(tmp_path: Path) -> Iterator[Compose]:
    """A fresh project (not up yet); `down -v` at the end, and nothing of it may be left."""
    if shutil.which("docker") is None or _run("docker", "info").returncode != 0:
        _unavailable("no reachable Docker daemon; run scripts/docker-up.sh")
    if shutil.which("docker-compose") is None:
        _unavailable("docker-compose not installed; apt-get install -y docker-compose")
    _ensure_images()
    low, _ = next_port_range()
    c = Compose(f"bapcompose{uuid.uuid4().hex[:10]}", "adm-" + secrets.token_urlsafe(24), low, low + ENGINE_PORTS - 1)
    master_key, password = Fernet.generate_key().decode(), secrets.token_hex(16)
    c.env = _compose_env(c, master_key, password)
    log = tmp_path / "serve-compose.log"  # scanned at session end, with the keys it must not hold
    record_server_log(log, c.admin_key, master_key, password)
    try:
        yield c
    finally:
        log.write_text(c.logs("orchestrator"))
        if not KEEP:
            down = c("down", "-v", "--remove-orphans", "-t", "10", timeout=120)
            assert down.returncode == 0, down.stderr
            assert c.leftovers() == [], f"left by compose project {c.project}: {c.leftovers()}"


def _wait_healthy(c: Compose, timeout: float = 60) -> None:
    """/health answers 200 through the published API port; fail at once if the orchestrator exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{c.api}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        container = c("ps", "-q", "orchestrator").stdout.strip()
        if container and _run("docker", "inspect", "-f", "{{.State.Status}}", container).stdout.strip() == "exited":
            raise AssertionError(f"the orchestrator exited:\n{c.logs()[-4000:]}")
        time.sleep(0.5)
    raise AssertionError(f"no /health 200 at {c.api} within {timeout} s:\n{c.logs()[-4000:]}")


def test_compose_quickstart_admits_through_the_published_port(compose: Compose) -> None:
    c = compose
    up = c("up", "-d", timeout=180)
    assert up.returncode == 0, f"docker-compose up failed:\n{up.stderr[-3000:]}\n{c.logs()[-3000:]}"
    _wait_healthy(c)

    with httpx.Client(base_url=c.api, timeout=60) as http:
        r = http.post("/products/register", headers={"X-Admin-Key": c.admin_key},
                      json={"slug": f"compose-{uuid.uuid4().hex[:8]}", "display_name": "Compose quickstart"})
        assert r.status_code == 200, r.text
        headers = {"X-Platform-Key": r.json()["platform_api_key"]}
        r = http.post("/engines/alice/admit", headers=headers, json={"auto_provision": True, "auto_wake": True})
        assert r.status_code == 200, r.text
        assert r.json()["admitted"] is True, r.json()
        engine = r.json()["engine"]
        url = engine["url"]
        port = urlsplit(url).port or 0
        assert url == f"http://127.0.0.1:{port}" and c.port_min <= port <= c.port_max, url

        # The engine, a child of the orchestrator in its container, answers on its published port.
        health = httpx.get(f"{url}/health", timeout=5)
        assert health.status_code == 200, health.text
        assert health.json()["status"] == "ok", health.json()
        r = http.get("/engines/alice", headers=headers)
        assert r.status_code == 200 and r.json()["status"] == "running", r.text
