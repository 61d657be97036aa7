"""Contract-suite support for the docker backend (needs a Docker daemon and the engine image).

Skips when the daemon or the engine image is missing, unless BAP_REQUIRE_DOCKER=1 or
BAP_REQUIRE_BACKENDS (comma list) names "docker": then it fails. Teardown removes every
container and volume carrying the test's deployment label (BAP_KEEP_TEST_RESOURCES=1 keeps them).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import docker
import docker.errors
import pytest

from bap_engine.backends.base import LABEL_DEPLOYMENT, BackendError, EngineBackend, Placement
from bap_engine.backends.docker import DockerBackend, DockerConfig, container_name
from tests.backends.helpers import DEFAULT_IMAGE

__all__ = ["kill_behind_back", "make_backend"]

_HINT = "run scripts/docker-up.sh and scripts/build-images.sh to enable"


def _required() -> bool:
    wanted = {name.strip() for name in os.environ.get("BAP_REQUIRE_BACKENDS", "").split(",")}
    return os.environ.get("BAP_REQUIRE_DOCKER") == "1" or "docker" in wanted


def _unavailable(reason: str) -> None:
    """Skip, or fail when docker is required."""
    message = f"{reason}; {_HINT}"
    if _required():
        pytest.fail(message)
    pytest.skip(message)


def _client() -> docker.DockerClient:
    return docker.DockerClient(base_url="unix:///var/run/docker.sock", version="1.41")


def _image_present(image: str) -> bool:
    client = _client()
    try:
        client.images.get(image)
        return True
    except docker.errors.ImageNotFound:
        return False
    finally:
        client.close()


def _remove_deployment(deployment: str) -> None:
    """Remove every container, then every volume, labelled with this deployment."""
    client = _client()
    label = {"label": f"{LABEL_DEPLOYMENT}={deployment}"}
    try:
        for row in client.api.containers(all=True, filters=label):
            client.api.remove_container(row["Id"], force=True)
        for volume in client.api.volumes(filters=label).get("Volumes") or []:
            client.api.remove_volume(volume["Name"], force=True)
    finally:
        client.close()


@asynccontextmanager
async def make_backend(workdir: Path, deployment: str) -> AsyncIterator[EngineBackend]:
    """A DockerBackend for `deployment` on the local daemon; cleans the deployment up on exit."""
    backend = DockerBackend(DockerConfig(deployment=deployment))
    try:
        try:
            await backend.ping()
        except BackendError as exc:
            _unavailable(f"Docker daemon not reachable ({exc.message})")
        if not await asyncio.to_thread(_image_present, DEFAULT_IMAGE):
            _unavailable(f"engine image {DEFAULT_IMAGE} is missing")
        try:
            yield backend
        finally:
            if os.environ.get("BAP_KEEP_TEST_RESOURCES") != "1":
                await asyncio.to_thread(_remove_deployment, deployment)
    finally:
        await backend.close()


def _kill(engine_id: str) -> None:
    client = _client()
    try:
        client.containers.get(container_name(engine_id)).kill()
    finally:
        client.close()


async def kill_behind_back(backend: EngineBackend, placement: Placement) -> None:
    """Crash the engine without telling the backend: `docker kill` its container (SIGKILL).

    The daemon counts a kill as a manual stop, so the restart policy (unless-stopped) does not
    bring it back: the container stays EXITED until `start`. (A crash from inside - the engine
    dying on its own - is restarted by the daemon and shows RUNNING again within about a second.)
    """
    await asyncio.to_thread(_kill, placement.engine_id)
