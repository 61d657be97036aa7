"""The backend port: what every engine runtime (subprocess, docker, kubernetes) offers.

A backend knows nothing of products, policy, Postgres or HTTP routes. It receives an
engine id, a port, an image, env and labels, and reports what exists. It raises only
the errors defined here; each adapter translates its SDK's errors in one place.
Stop or destroy of something absent is success.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

__all__ = [
    "LABEL_ENGINE_ID",
    "LABEL_PRODUCT_ID",
    "LABEL_DEPLOYMENT",
    "BackendError",
    "EngineAbsent",
    "ImageNotFound",
    "PortInUse",
    "EngineSpec",
    "Placement",
    "ObservedState",
    "Observed",
    "EngineBackend",
]

LABEL_ENGINE_ID = "bap-engine.engine_id"
LABEL_PRODUCT_ID = "bap-engine.product_id"
LABEL_DEPLOYMENT = "bap-engine.deployment"


class BackendError(Exception):
    """The runtime failed. `transient` says whether retrying the same call may succeed."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient


class EngineAbsent(BackendError):
    """The engine's process/container/pod does not exist (for start, pause, resume)."""

    def __init__(self, engine_id: str) -> None:
        super().__init__(f"engine {engine_id} does not exist in the backend")


class ImageNotFound(BackendError):
    """The engine image (or command) is not available."""

    def __init__(self, image: str) -> None:
        super().__init__(f"engine image not found: {image}")


class PortInUse(BackendError):
    """The host port given in the spec is already bound by something else."""

    def __init__(self, port: int) -> None:
        super().__init__(f"host port {port} is already in use", transient=True)
        self.port = port


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """Everything a backend needs to create one engine."""

    engine_id: str
    product_id: str
    port: int  # host port (127.0.0.1) the engine is reachable on
    image: str  # the engine version: image tag (docker, kubernetes); subprocess: picks the command
    env: Mapping[str, str] = field(default_factory=dict)  # ENGINE_KEY_HASH, ... (secret: never log)
    labels: Mapping[str, str] = field(default_factory=dict)
    cpus: float | None = None
    memory: str | None = None  # "512m", "1g"


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a created engine can be reached."""

    engine_id: str
    url: str  # base URL the orchestrator and products use, e.g. http://127.0.0.1:9001
    ref: str  # backend handle: pid, container id, statefulset name


class ObservedState(enum.StrEnum):
    RUNNING = "running"  # process/container up (not necessarily healthy)
    PAUSED = "paused"  # frozen (SIGSTOP, docker pause) or scaled to zero with data kept
    EXITED = "exited"  # exists but not running (stopped, crashed); data kept
    ABSENT = "absent"  # nothing exists


@dataclass(frozen=True, slots=True)
class Observed:
    """What the backend sees of one engine."""

    engine_id: str
    state: ObservedState
    labels: Mapping[str, str] = field(default_factory=dict)
    created_at: datetime | None = None  # when the runtime object was created (UTC)
    ref: str = ""


class EngineBackend(Protocol):
    """The runtime port. Every method is idempotent where the docstring says so."""

    name: str

    async def create(self, spec: EngineSpec) -> Placement:
        """Create and start the engine (do not wait for health). Raises BackendError."""
        ...

    async def start(self, engine_id: str) -> None:
        """Start a stopped (exited) engine with its data. Raises EngineAbsent, BackendError."""
        ...

    async def stop(self, engine_id: str, grace_s: float = 30) -> None:
        """SIGTERM, wait grace_s, then SIGKILL; data kept. Absent is success."""
        ...

    async def pause(self, engine_id: str) -> None:
        """Freeze the engine, keeping its memory. Raises EngineAbsent, BackendError."""
        ...

    async def resume(self, engine_id: str) -> None:
        """Unfreeze a paused engine. Raises EngineAbsent, BackendError."""
        ...

    async def destroy(self, engine_id: str) -> None:
        """Remove the engine and its data. Idempotent: absent is success."""
        ...

    async def inspect(self, engine_id: str) -> Observed:
        """Observe one engine (ABSENT when nothing exists)."""
        ...

    async def list_managed(self) -> list[Observed]:
        """Every engine of this deployment the runtime holds (one list call)."""
        ...

    async def has_version(self, version: str) -> bool:
        """Whether engines of this `engine_version` (an image; a configured command for subprocess) can be
        created here. Checked before anything is created, so an unknown version is refused up front."""
        ...

    async def ping(self) -> None:
        """Check the runtime is reachable (daemon, cluster, data directory). Raises BackendError."""
        ...

    def url_for(self, engine_id: str, port: int) -> str:
        """Base URL of an engine, without any I/O."""
        ...

    async def close(self) -> None:
        """Release clients and threads."""
        ...
