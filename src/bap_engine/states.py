"""Engine states, the transition table, and audit action names (pure data)."""

from __future__ import annotations

import enum

__all__ = ["EngineState", "AuditAction", "TRANSITIONS", "can_transition"]


class EngineState(enum.StrEnum):
    PROVISIONING = "provisioning"
    RUNNING = "running"
    SLEEPING = "sleeping"
    STOPPED = "stopped"
    FAILED = "failed"
    DESTROYING = "destroying"


class AuditAction(enum.StrEnum):
    PROVISION = "provision"
    PROVISION_FAILED = "provision_failed"
    START = "start"
    STOP = "stop"
    WAKE = "wake"
    SLEEP = "sleep"
    DESTROY = "destroy"
    ROTATE_KEY = "rotate_key"
    HEALTH_CHECK = "health_check"
    HEALTH_FAILED = "health_failed"
    AUTO_RESTART_START = "auto_restart_start"
    AUTO_RESTART_SUCCESS = "auto_restart_success"
    AUTO_RESTART_FAILED = "auto_restart_failed"
    AUTO_RESTART_GAVE_UP = "auto_restart_gave_up"
    POLICY_REGISTER = "policy_register"
    POLICY_UPDATE = "policy_update"
    ADMIT_DENIED = "admit_denied"
    RECONCILE = "reconcile"
    POOL_FILL = "pool_fill"
    POOL_CLAIM = "pool_claim"
    SETTINGS_UPDATE = "settings_update"
    PRODUCT_DELETE = "product_delete"
    PLATFORM_KEY_ROTATE = "platform_key_rotate"
    UPGRADE = "upgrade"


S = EngineState
TRANSITIONS: dict[EngineState, frozenset[EngineState]] = {
    S.PROVISIONING: frozenset({S.RUNNING, S.DESTROYING}),
    S.RUNNING: frozenset({S.SLEEPING, S.STOPPED, S.FAILED, S.DESTROYING}),
    S.SLEEPING: frozenset({S.RUNNING, S.STOPPED, S.FAILED, S.DESTROYING}),
    S.STOPPED: frozenset({S.RUNNING, S.FAILED, S.DESTROYING}),  # [decided] failed: a start that failed
    S.FAILED: frozenset({S.RUNNING, S.DESTROYING}),
    S.DESTROYING: frozenset(),
}


def can_transition(src: EngineState, dst: EngineState) -> bool:
    return dst in TRANSITIONS[src]
