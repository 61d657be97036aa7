"""The Docker daemon restarted under a running fleet (ORCH_ENGINE_BACKEND=docker).

Skips unless a Docker daemon started by scripts/docker-up.sh (PID in /run/bap-dockerd.pid) is
reachable and the engine image is present; BAP_REQUIRE_DOCKER=1 makes that a failure (the gate of
tests/backends/support_docker.py). The daemon is stopped with SIGTERM (its containers stop with
it), waited for, and started again by scripts/docker-up.sh. Then every engine must be managed
again (GET running and healthy, admit works, a stop/start works), with exactly one container per
engine id label and no labelled container without a row once the reconciler has run.

Restarting dockerd disturbs every other user of the daemon (the Kubernetes test cluster, other
Docker tests), so the test is `disruptive`: tests/faults/conftest.py runs it last.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

import docker
import docker.errors
import pytest
import requests.exceptions

from bap_engine.backends.base import LABEL_DEPLOYMENT, LABEL_ENGINE_ID
from bap_engine.config import Settings
from tests.backends.helpers import DEFAULT_IMAGE, health_ok
from tests.backends.support_docker import _client, _image_present, _remove_deployment, _unavailable
from tests.conftest import wait_until
from tests.e2e.conftest import Server, StartServer
from tests.faults.support import Api, engine_rows, register, unique_user
from tests.workers.conftest import alive, process_state

PIDFILE = Path(os.environ.get("BAP_DOCKERD_PIDFILE", "/run/bap-dockerd.pid"))
DOCKER_UP = Path(__file__).resolve().parents[2] / "scripts" / "docker-up.sh"
RECONCILE_S = 2.0
TUNING: dict[str, object] = {
    "engine_backend": "docker", "engine_image": DEFAULT_IMAGE, "boot_timeout_s": 30,
    "health_check_interval_s": 1, "reconcile_interval_s": RECONCILE_S, "restart_backoff_base_s": 1,
    "health_max_failures": 2, "health_check_timeout_s": 1,
}
ENGINES = 3


def _daemon_up() -> bool:
    client = _client()
    try:
        return bool(client.ping())
    except (docker.errors.DockerException, requests.exceptions.RequestException):
        return False
    finally:
        client.close()


def _our_dockerd() -> int:
    """The PID of the dockerd scripts/docker-up.sh started, or skip (fail when Docker is required)."""
    if not _daemon_up():
        _unavailable("Docker daemon not reachable")
    if not _image_present(DEFAULT_IMAGE):
        _unavailable(f"engine image {DEFAULT_IMAGE} is missing")
    try:
        pid = int(PIDFILE.read_text().strip())
    except (OSError, ValueError):
        pid = 0
    if not pid or not alive(pid):
        _unavailable(f"no live dockerd in {PIDFILE}: only a daemon started by scripts/docker-up.sh is restarted")
    return pid


def _containers(deployment: str) -> Counter[str]:
    """engine id label → number of containers carrying it (this deployment)."""
    client = _client()
    try:
        rows = client.api.containers(all=True, filters={"label": f"{LABEL_DEPLOYMENT}={deployment}"})
    finally:
        client.close()
    return Counter(str((row.get("Labels") or {}).get(LABEL_ENGINE_ID)) for row in rows)


async def _restart_dockerd(pid: int) -> None:
    """SIGTERM, wait until the process is gone (reaped: docker-up.sh takes a zombie for a live
    daemon), then scripts/docker-up.sh, then wait until the daemon answers."""
    os.kill(pid, signal.SIGTERM)
    await wait_until(lambda: process_state(pid) is None, timeout=90, interval=0.2)
    done = await asyncio.to_thread(subprocess.run, ["bash", str(DOCKER_UP)], timeout=180, text=True,
                                   stdin=subprocess.DEVNULL, capture_output=True, check=False)
    assert done.returncode == 0, f"scripts/docker-up.sh failed: {done.stderr[-2000:]}"
    await wait_until(_daemon_up, timeout=60, interval=0.2)


async def _all_running(api: Api, users: list[str]) -> bool:
    async with api.client() as c:
        got = [await api.call(c, "get", u) for u in users]
    for g in got:
        if g.status != 200 or g.doc.get("status") != "running" or not await health_ok(str(g.doc["url"]), 1):
            return False
    return True


@pytest.mark.disruptive
async def test_dockerd_restart_under_a_running_fleet(start_server: StartServer, settings: Settings,
                                                     pg_dsn: str) -> None:
    pid = _our_dockerd()
    server = start_server(**TUNING)
    try:
        api = Api(server.url, register(server.url), timeout=60)
        users = [unique_user("dock") for _ in range(ENGINES)]
        for user in users:
            await api.admitted(user)
        assert _containers(settings.deployment) == Counter(str(r["id"]) for r in await engine_rows(pg_dsn, settings))

        await _restart_dockerd(pid)

        await wait_until(lambda: _all_running(api, users), timeout=90, interval=0.5)
        for user in users:
            await api.admitted(user, provision=False)
        async with api.client() as c:
            stopped = await api.call(c, "stop", users[0])
            assert stopped.status == 200 and stopped.doc["status"] == "stopped", stopped.body
            started = await api.call(c, "start", users[0])
            assert started.status == 200 and started.doc["status"] == "running", started.body
        await _assert_one_container_per_row(api, users, settings, pg_dsn)
    finally:
        await asyncio.to_thread(_stop, server)  # first: a live server could re-create what is removed below
        if not _daemon_up():
            await asyncio.to_thread(subprocess.run, ["bash", str(DOCKER_UP)], timeout=180, check=False)
        await asyncio.to_thread(_remove_deployment, settings.deployment)


def _stop(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            server.kill9()


async def _assert_one_container_per_row(api: Api, users: list[str], settings: Settings, dsn: str) -> None:
    async def matches() -> bool:
        rows = {str(r["id"]) for r in await engine_rows(dsn, settings)}
        return len(rows) == ENGINES and _containers(settings.deployment) == Counter(rows)

    await wait_until(matches, timeout=30, interval=0.5)
    # two reconcile passes must not change that (a late duplicate or a wrongly removed container)
    await asyncio.sleep(2 * RECONCILE_S)
    assert await matches(), (_containers(settings.deployment), await engine_rows(dsn, settings))
    assert await _all_running(api, users)
    async with api.client() as c:
        deleted = [await api.call(c, "delete", u) for u in users]
    assert all(d.status == 200 for d in deleted), [d.body for d in deleted]
