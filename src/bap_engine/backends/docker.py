"""Docker backend: one container per engine on one Docker daemon.

Owns: containers named ``bap-engine-<engine_id>`` and volumes named ``engine-data-<engine_id>``
(mounted at ``/data``), both carrying the ``bap-engine.*`` labels. The engine's port is published
on ``127.0.0.1`` only; the restart policy is ``unless-stopped``; docker's init (tini) is PID 1, so
a stop never waits the full grace period for a process that ignores SIGTERM. Sleep is
``docker pause`` (cgroup freezer: memory kept).

Never: reads the environment (everything comes from ``DockerConfig``), pulls an image (a missing
image is ``ImageNotFound``), or calls the blocking SDK on the event loop (every call runs on a
thread pool sized for concurrency). SDK errors become ``base`` errors in ``_translate`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions

from bap_engine.backends.base import (
    LABEL_DEPLOYMENT,
    LABEL_ENGINE_ID,
    LABEL_PRODUCT_ID,
    BackendError,
    EngineAbsent,
    EngineSpec,
    ImageNotFound,
    Observed,
    ObservedState,
    Placement,
    PortInUse,
)

__all__ = ["DockerBackend", "DockerConfig", "container_name", "volume_name"]

_T = TypeVar("_T")

DEFAULT_DAEMON_URL = "unix:///var/run/docker.sock"
# Pinned so that building the client does no I/O; every daemon since Docker 20.10 speaks it.
_API_VERSION = "1.41"
_ENGINE_PORT = 8000
_DATA_DIR = "/data"
_CATALOG_DIR = "/catalog"
_THREADS = 32
_IMAGE_CACHE_S = 30.0  # how long has_version trusts that an image it found is still there
_PORT_TAKEN = ("port is already allocated", "address already in use")
_STATES = {
    "running": ObservedState.RUNNING,
    # The daemon is bringing a crashed engine back (restart policy); the health loop judges it.
    "restarting": ObservedState.RUNNING,
    "paused": ObservedState.PAUSED,
}


@dataclass(frozen=True, slots=True)
class DockerConfig:
    """How to reach the daemon and what every engine container shares.

    deployment: value of the ``bap-engine.deployment`` label; separates deployments sharing a daemon.
    network: a Docker network every engine joins (it must exist), or None for the default bridge.
    catalog_mount_path: a host path mounted read-only at ``/catalog`` (``CATALOG_DIR``), or None.
    base_url: the Docker daemon URL (``unix://...``, ``tcp://...``); None is the local socket.
    """

    deployment: str
    network: str | None = None
    catalog_mount_path: str | None = None
    base_url: str | None = None


def container_name(engine_id: str) -> str:
    """The container name of an engine."""
    return f"bap-engine-{engine_id}"


def volume_name(engine_id: str) -> str:
    """The data volume name of an engine."""
    return f"engine-data-{engine_id}"


@contextlib.contextmanager
def _translate(engine_id: str | None = None, *, image: str = "", port: int | None = None) -> Iterator[None]:
    """Turn docker SDK and transport errors into ``base`` errors (the only place that does).

    ``engine_id`` is given where a 404 means "the engine's container does not exist" (EngineAbsent);
    elsewhere a 404 (a missing network, say) is a plain BackendError.
    """
    try:
        yield
    except docker.errors.ImageNotFound as exc:
        raise ImageNotFound(image or _explain(exc)) from exc
    except docker.errors.NotFound as exc:
        if engine_id is not None:
            raise EngineAbsent(engine_id) from exc
        raise BackendError(f"docker: {_explain(exc)}") from exc
    except docker.errors.APIError as exc:
        text = _explain(exc)
        if port is not None and any(marker in text for marker in _PORT_TAKEN):
            raise PortInUse(port) from exc
        raise BackendError(f"docker: {text}") from exc
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise BackendError(f"Docker daemon not reachable: {exc}", transient=True) from exc
    except docker.errors.DockerException as exc:
        raise BackendError(f"docker: {exc}", transient=True) from exc


def _explain(exc: docker.errors.DockerException) -> str:
    """The daemon's own message for an API error (without the SDK's URL noise)."""
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc)


def _parse_time(value: object) -> datetime | None:
    """Docker timestamps: RFC 3339 with nanoseconds (inspect) or epoch seconds (list)."""
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, tz=UTC)
    if not isinstance(value, str) or not value:
        return None
    head, _, frac = value.rstrip("Z").partition(".")
    digits = "".join(ch for ch in frac if ch.isdigit())[:6]
    try:
        parsed = datetime.fromisoformat(f"{head}.{digits or '0'}")
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _observed(engine_id: str, status: str, labels: Mapping[str, str], created: object, ref: str) -> Observed:
    """Build an Observed from docker's status word (created/exited/dead/removing are EXITED)."""
    return Observed(
        engine_id=engine_id,
        state=_STATES.get(status, ObservedState.EXITED),
        labels=dict(labels),
        created_at=_parse_time(created),
        ref=ref,
    )


class DockerBackend:
    """Engines as Docker containers; see the module docstring for what it creates."""

    name = "docker"

    def __init__(self, config: DockerConfig) -> None:
        """Build the client and the thread pool; no I/O happens until the first call."""
        self.config = config
        self._client = docker.DockerClient(
            base_url=config.base_url or DEFAULT_DAEMON_URL,
            version=_API_VERSION,
            max_pool_size=_THREADS,
        )
        self._executor = ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="bap-docker")
        self._known_images: dict[str, float] = {}  # image → monotonic time it was last seen locally

    async def _run(self, fn: Callable[..., _T], *args: object, **kwargs: object) -> _T:
        """Run one blocking SDK call on the pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def has_version(self, version: str) -> bool:
        """The image exists in the local daemon (never pulled). A positive answer is cached for
        _IMAGE_CACHE_S, so a burst of provisions asks once. Raises BackendError (daemon unreachable)."""
        seen = self._known_images.get(version)
        if seen is not None and time.monotonic() - seen < _IMAGE_CACHE_S:
            return True
        try:
            with _translate(image=version):
                await self._run(self._client.images.get, version)
        except ImageNotFound:
            self._known_images.pop(version, None)
            return False
        except BackendError as exc:
            if isinstance(exc.__cause__, docker.errors.NotFound):
                return False
            raise
        self._known_images[version] = time.monotonic()
        return True

    async def ping(self) -> None:
        """Check that the daemon answers. Raises BackendError (transient) naming the daemon URL."""
        url = self.config.base_url or DEFAULT_DAEMON_URL
        try:
            with _translate():
                await self._run(self._client.api.ping)
        except BackendError as exc:
            cause = exc.__cause__ or exc.message
            raise BackendError(
                f"Docker daemon not reachable at {url} ({cause}); start it, e.g. with scripts/docker-up.sh",
                transient=True,
            ) from exc

    async def create(self, spec: EngineSpec) -> Placement:
        """Create the data volume and the container, and start it (no health wait).

        A leftover container of the same name (an earlier, interrupted create) is replaced; the
        volume, and so the data, is kept. Raises ImageNotFound, PortInUse, BackendError.
        """
        ref = await self._run(self._create, spec)
        return Placement(engine_id=spec.engine_id, url=self.url_for(spec.engine_id, spec.port), ref=ref)

    def _create(self, spec: EngineSpec) -> str:
        """Blocking body of create: volume, container, start; returns the container id.

        On failure nothing new is left behind (a volume that already held data is kept), so a
        retry, maybe on another port, starts clean.
        """
        labels = self._labels(spec)
        volume = volume_name(spec.engine_id)
        with _translate(image=spec.image, port=spec.port):
            self._client.images.get(spec.image)  # fail before any side effect; never pull
            fresh = not self._volume_exists(volume)
            self._client.api.create_volume(name=volume, labels=labels)
        try:
            with _translate(image=spec.image, port=spec.port):
                return self._create_and_start(spec, labels)
        except BackendError:
            if fresh:
                with contextlib.suppress(docker.errors.DockerException, requests.exceptions.RequestException):
                    self._client.api.remove_volume(volume, force=True)
            raise

    def _volume_exists(self, volume: str) -> bool:
        """Whether the named volume exists (raises the SDK's errors other than 404)."""
        try:
            self._client.volumes.get(volume)
        except docker.errors.NotFound:
            return False
        return True

    def _create_and_start(self, spec: EngineSpec, labels: dict[str, str]) -> str:
        """Create the container (replacing a leftover of the same name) and start it; raises SDK errors."""
        try:
            container_id = self._create_container(spec, labels)
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # 409: the name is taken by a leftover container
                raise
            self._client.api.remove_container(container_name(spec.engine_id), force=True)
            container_id = self._create_container(spec, labels)
        try:
            self._client.api.start(container_id)
        except docker.errors.APIError:
            with contextlib.suppress(docker.errors.DockerException, requests.exceptions.RequestException):
                self._client.api.remove_container(container_id, force=True)
            raise
        return container_id

    def _create_container(self, spec: EngineSpec, labels: dict[str, str]) -> str:
        """Create (not start) the engine container; returns its id. Raises the SDK's errors."""
        env = dict(spec.env)
        env.setdefault("PORT", str(_ENGINE_PORT))
        env.setdefault("SQLITE_DB_PATH", f"{_DATA_DIR}/brain.sqlite")
        volumes: dict[str, dict[str, str]] = {volume_name(spec.engine_id): {"bind": _DATA_DIR, "mode": "rw"}}
        if self.config.catalog_mount_path:
            volumes[self.config.catalog_mount_path] = {"bind": _CATALOG_DIR, "mode": "ro"}
            env.setdefault("CATALOG_DIR", _CATALOG_DIR)
        # types-docker only admits "always"/"on-failure"; the daemon also takes "unless-stopped".
        options: dict[str, Any] = {"restart_policy": {"Name": "unless-stopped"}}
        if spec.cpus is not None:
            options["nano_cpus"] = int(spec.cpus * 1_000_000_000)
        if spec.memory is not None:
            options["mem_limit"] = spec.memory
        if self.config.network:
            options["network"] = self.config.network
        container = self._client.containers.create(
            spec.image,
            name=container_name(spec.engine_id),
            labels=labels,
            environment=env,
            # The engine listens on PORT inside; publish that on the spec's host port, loopback only.
            ports={f"{env['PORT']}/tcp": ("127.0.0.1", spec.port)},
            volumes=volumes,
            init=True,
            detach=True,
            **options,
        )
        return str(container.id)

    def _labels(self, spec: EngineSpec) -> dict[str, str]:
        """The spec's labels, with this backend's identity labels always set."""
        return {
            **spec.labels,
            LABEL_ENGINE_ID: spec.engine_id,
            LABEL_PRODUCT_ID: spec.product_id,
            LABEL_DEPLOYMENT: self.config.deployment,
        }

    async def start(self, engine_id: str) -> None:
        """Start a stopped engine with its data (a running one is left alone).

        Raises EngineAbsent, BackendError (for instance when its host port was taken meanwhile).
        """
        await self._run(self._call, engine_id, self._client.api.start)

    async def stop(self, engine_id: str, grace_s: float = 30) -> None:
        """SIGTERM, wait grace_s, then SIGKILL; data kept. Absent is success. Raises BackendError."""
        try:
            await self._run(self._call, engine_id, self._client.api.stop, timeout=math.ceil(grace_s))
        except EngineAbsent:
            return

    async def pause(self, engine_id: str) -> None:
        """Freeze the engine (cgroup freezer). Already paused is success.

        Raises EngineAbsent (no container, or it is not running), BackendError.
        """
        await self._run(self._freeze, engine_id, True)

    async def resume(self, engine_id: str) -> None:
        """Unfreeze a paused engine. Already running is success.

        Raises EngineAbsent (no container, or it is not running), BackendError.
        """
        await self._run(self._freeze, engine_id, False)

    def _call(self, engine_id: str, method: Callable[..., object], **kwargs: object) -> None:
        """Blocking: one container call by name."""
        with _translate(engine_id):
            method(container_name(engine_id), **kwargs)

    def _freeze(self, engine_id: str, freeze: bool) -> None:
        """Blocking body of pause (freeze=True) and resume."""
        try:
            self._call(engine_id, self._client.api.pause if freeze else self._client.api.unpause)
        except EngineAbsent:
            raise
        except BackendError as exc:
            # The daemon refuses to pause a paused container, unpause an unpaused one, or pause a
            # stopped one; only the state reached tells success from "no process to freeze".
            state = self._inspect(engine_id).state
            if state is (ObservedState.PAUSED if freeze else ObservedState.RUNNING):
                return
            if state in (ObservedState.EXITED, ObservedState.ABSENT):
                raise EngineAbsent(engine_id) from exc
            raise

    async def destroy(self, engine_id: str) -> None:
        """Remove the container (forced) and its data volume. Idempotent. Raises BackendError."""
        await self._run(self._destroy, engine_id)

    def _destroy(self, engine_id: str) -> None:
        """Blocking body of destroy."""
        for remove in (
            functools.partial(self._client.api.remove_container, container_name(engine_id), force=True),
            functools.partial(self._client.api.remove_volume, volume_name(engine_id), force=True),
        ):
            with contextlib.suppress(EngineAbsent), _translate(engine_id):
                remove()

    async def inspect(self, engine_id: str) -> Observed:
        """Observe one engine (ABSENT when its container does not exist). Raises BackendError."""
        return await self._run(self._inspect, engine_id)

    def _inspect(self, engine_id: str) -> Observed:
        """Blocking body of inspect."""
        try:
            with _translate(engine_id):
                info: dict[str, Any] = self._client.api.inspect_container(container_name(engine_id))
        except EngineAbsent:
            return Observed(engine_id=engine_id, state=ObservedState.ABSENT)
        labels = (info.get("Config") or {}).get("Labels") or {}
        status = (info.get("State") or {}).get("Status", "")
        return _observed(engine_id, status, labels, info.get("Created"), str(info.get("Id", "")))

    async def list_managed(self) -> list[Observed]:
        """Every container of this deployment, in one list call (no per-container inspect)."""
        with _translate():
            rows: list[dict[str, Any]] = await self._run(
                self._client.api.containers,
                all=True,
                filters={"label": f"{LABEL_DEPLOYMENT}={self.config.deployment}"},
            )
        found: list[Observed] = []
        for row in rows:
            labels = row.get("Labels") or {}
            engine_id = labels.get(LABEL_ENGINE_ID)
            if engine_id:
                found.append(_observed(engine_id, row.get("State", ""), labels, row.get("Created"), row["Id"]))
        return found

    def url_for(self, engine_id: str, port: int) -> str:
        """Base URL of an engine: its published port on the host's loopback."""
        return f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        """Close the client and let the pool's threads finish."""
        await asyncio.to_thread(self._client.close)
        self._executor.shutdown(wait=False, cancel_futures=True)
