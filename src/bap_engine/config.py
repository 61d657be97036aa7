"""Settings: every ORCH_* variable, in one place (pydantic-settings).

Nothing here reads the environment at import; `load_settings()` does, and turns a bad
value into one clear `ConfigError` line instead of a traceback.
"""

from __future__ import annotations

import os
import secrets
import shlex
import sys
from pathlib import Path
from typing import Literal

from cryptography.fernet import Fernet
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "ConfigError", "load_settings", "ensure_secrets"]

DEFAULT_ENGINE_IMAGE = "bap-engine/refengine:0.1.0"


class ConfigError(Exception):
    """A setting is missing or invalid; the message is one line naming the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ORCH_", extra="ignore", frozen=True)

    database_url: str | None = None
    master_key: str | None = Field(default=None, repr=False)
    master_key_previous: str | None = Field(default=None, repr=False)  # opens, never seals (a rotation)
    admin_key: str | None = Field(default=None, repr=False)
    data_dir: Path = Path("./.bap-engine")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)

    engine_backend: Literal["subprocess", "docker", "kubernetes"] = "subprocess"
    engine_image: str = DEFAULT_ENGINE_IMAGE
    engine_command: str | None = None
    engine_commands: dict[str, str] = Field(default_factory=dict)  # subprocess: version → command line
    engine_env_passthrough: str = ""
    engine_network: str | None = None
    catalog_mount_path: str | None = None
    engine_cpus: float | None = Field(default=None, gt=0)
    engine_memory: str | None = Field(default=None, pattern=r"^[0-9]+[bkmgBKMG]?$")
    port_min: int = Field(default=9001, ge=1, le=65535)
    port_max: int = Field(default=9999, ge=1, le=65535)
    deployment: str = Field(default="default", pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")

    health_check_interval_s: float = Field(default=30, gt=0)
    health_check_timeout_s: float = Field(default=10, gt=0)
    health_max_failures: int = Field(default=3, ge=1)
    restart_backoff_base_s: float = Field(default=5, ge=0)
    restart_backoff_max_s: float = Field(default=300, ge=0)
    restart_max_attempts: int = Field(default=8, ge=0)
    boot_timeout_s: float = Field(default=60, gt=0)
    health_concurrency: int = Field(default=50, ge=1)
    health_audit_sample_s: float = Field(default=600, ge=0)
    idle_sleep_after_s: float = Field(default=900, gt=0)
    idle_stop_after_s: float = Field(default=86400, gt=0)
    sleep_mode: Literal["pause", "stop", "label"] = "pause"
    reconcile_interval_s: float = Field(default=60, gt=0)
    stop_grace_s: float = Field(default=30, ge=0)

    k8s_namespace: str = "bap-engines"
    k8s_storage_class: str | None = None
    k8s_url_mode: Literal["service", "hostport", "nodeport"] = "service"
    kubeconfig: str | None = None

    metrics_public: bool = False
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    key_rotation_overlap_s: int = Field(default=300, ge=0, le=86400)
    workers_enabled: bool = True  # [ext] run the leader election and workers in this process
    activity_flush_s: float = Field(default=2.0, gt=0)
    events_keepalive_s: float = Field(default=15, gt=0)  # a `: keep-alive` comment on a quiet GET /events

    @field_validator("master_key_previous", mode="before")
    @classmethod
    def _unset_when_empty(cls, value: object) -> object:
        # `ORCH_MASTER_KEY_PREVIOUS=` (emptied rather than removed, step 3 of a rotation) is unset
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.port_min > self.port_max:
            raise ValueError(f"ORCH_PORT_MIN ({self.port_min}) is greater than ORCH_PORT_MAX ({self.port_max})")
        if self.master_key is not None:
            try:
                Fernet(self.master_key.encode())
            except ValueError:
                raise ValueError("ORCH_MASTER_KEY is not a valid Fernet key (32 url-safe base64 bytes)") from None
        if self.master_key_previous is not None:
            try:
                Fernet(self.master_key_previous.encode())
            except ValueError:
                raise ValueError("ORCH_MASTER_KEY_PREVIOUS is not a valid Fernet key (32 url-safe base64 bytes)"
                                 ) from None
        for version, command in self.engine_commands.items():
            if not version or not version.strip():
                raise ValueError("ORCH_ENGINE_COMMANDS has an empty version name")
            try:
                argv = shlex.split(command)
            except ValueError as err:
                raise ValueError(f"ORCH_ENGINE_COMMANDS[{version!r}] is not a valid command line: {err}") from None
            if not argv:
                raise ValueError(f"ORCH_ENGINE_COMMANDS[{version!r}] is empty")
        return self

    @property
    def embedded(self) -> bool:
        return self.database_url is None

    @property
    def engine_argv(self) -> tuple[str, ...]:
        """The subprocess backend's engine command (default: the reference engine)."""
        if self.engine_command:
            return tuple(shlex.split(self.engine_command))
        return (sys.executable, "-m", "bap_engine.refengine")

    @property
    def engine_versions(self) -> dict[str, tuple[str, ...]]:
        """The subprocess backend's versions: each `ORCH_ENGINE_COMMANDS` entry, and the default version
        (`ORCH_ENGINE_IMAGE`) running `engine_argv` — unless ORCH_ENGINE_COMMANDS names it and
        ORCH_ENGINE_COMMAND is unset."""
        versions = {version: tuple(shlex.split(command)) for version, command in self.engine_commands.items()}
        if self.engine_command or self.engine_image not in versions:
            versions[self.engine_image] = self.engine_argv
        return versions

    @property
    def passthrough_names(self) -> list[str]:
        return [n.strip() for n in self.engine_env_passthrough.split(",") if n.strip()]


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = "_".join(str(p) for p in first["loc"])
    name = f"ORCH_{loc.upper()}" if loc else "settings"
    return f"invalid setting {name}: {first['msg']}"


def load_settings(**overrides: object) -> Settings:
    """Read ORCH_* from the environment (overrides win). Raises ConfigError."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


def _read_or_create(path: Path, make: str) -> str:
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(make + "\n")
    return make


def ensure_secrets(settings: Settings) -> Settings:
    """Fill master/admin keys: generated once into ORCH_DATA_DIR in embedded mode,
    required with a database URL. Raises ConfigError naming the missing variable."""
    if settings.master_key and settings.admin_key:
        return settings
    if not settings.embedded:
        missing = "ORCH_MASTER_KEY" if not settings.master_key else "ORCH_ADMIN_KEY"
        raise ConfigError(f"{missing} is required when ORCH_DATABASE_URL is set")
    master = settings.master_key or _read_or_create(
        settings.data_dir / "master.key", Fernet.generate_key().decode()
    )
    admin = settings.admin_key or _read_or_create(
        settings.data_dir / "admin.key", "adm-" + secrets.token_urlsafe(32)
    )
    return settings.model_copy(update={"master_key": master, "admin_key": admin})
