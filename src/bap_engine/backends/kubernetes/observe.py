"""Reading engine state out of Kubernetes objects (pure functions over SDK models, no I/O
except the local bind probe of `port_free`).

State rules: StatefulSet absent -> ABSENT; replicas 0 -> PAUSED with the sleep annotation,
else EXITED; replicas >= 1 -> from the pod: EXITED when it is being deleted, failed, or its
container is terminated or stuck waiting (CrashLoopBackOff, image errors...), else RUNNING
(including "pod not created yet": the controller is bringing it up).
"""

from __future__ import annotations

import contextlib
import errno
import json
import socket
from datetime import UTC, datetime
from typing import Any

from bap_engine.backends import base
from bap_engine.backends.kubernetes import manifests as m

__all__ = [
    "stopped_for_good",
    "starting",
    "utc",
    "IMAGE_ERRORS",
    "port_free",
    "sleeping",
    "labels_of",
    "container_outcome",
    "pod_state",
]


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            if exc.errno == errno.EADDRNOTAVAIL:  # not this host's address: nothing to check
                return True
            raise
    return True


def sleeping(sts: Any) -> bool:
    annotations = sts.metadata.annotations or {}
    return annotations.get(m.SLEEP_ANNOTATION) == "true"


def labels_of(sts: Any) -> dict[str, str]:
    annotations = sts.metadata.annotations or {}
    with contextlib.suppress(ValueError, TypeError):
        data = json.loads(annotations.get(m.LABELS_ANNOTATION, ""))
        if isinstance(data, dict):
            return {str(k): str(v) for k, v in data.items()}
    return dict(sts.metadata.labels or {})


IMAGE_ERRORS = frozenset({"ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName"})
_STARTING = (None, "ContainerCreating", "PodInitializing")


def container_outcome(pod: Any) -> str | None:
    """ "started" once the container ran, "image" when its image is missing, "port" when no node
    has its hostPort free (the scheduler says so), None while pending."""
    if pod is None:
        return None
    for cond in pod.status.conditions or []:
        if cond.type == "PodScheduled" and cond.status == "False" and "free ports" in (cond.message or ""):
            return "port"
    for cs in pod.status.container_statuses or []:
        if cs.state.running is not None or cs.state.terminated is not None or cs.restart_count:
            return "started"
        if cs.state.waiting is not None and cs.state.waiting.reason in IMAGE_ERRORS:
            return "image"
        if cs.state.waiting is not None and cs.state.waiting.reason not in _STARTING:
            return "started"  # e.g. CreateContainerConfigError: not ours to wait on; health will tell
    return None


def pod_state(pod: Any) -> base.ObservedState:
    """RUNNING while the pod runs or is being brought up; EXITED when it crashed or is going away."""
    if pod is None:
        return base.ObservedState.RUNNING  # replicas=1: the controller is (re)creating it
    if pod.metadata.deletion_timestamp is not None or pod.status.phase in ("Failed", "Succeeded"):
        return base.ObservedState.EXITED
    for cs in pod.status.container_statuses or []:
        if cs.state.terminated is not None:
            return base.ObservedState.EXITED
        waiting = cs.state.waiting
        if waiting is not None and waiting.reason not in _STARTING:
            return base.ObservedState.EXITED  # CrashLoopBackOff, ErrImagePull, CreateContainerError...
    return base.ObservedState.RUNNING


def utc(when: object) -> datetime | None:
    """A timestamp from the SDK (tz-aware, local tz) as UTC."""
    return when.astimezone(UTC) if isinstance(when, datetime) else None


def stopped_for_good(pod: Any) -> bool:
    """True when the pod is gone, or terminating with no engine container left running."""
    if pod is None:
        return True
    if pod.metadata.deletion_timestamp is None:
        return False
    if not pod.spec.node_name:
        return True  # never scheduled: nothing runs anywhere
    statuses = pod.status.container_statuses or []
    if not statuses:
        return False  # the kubelet has not reported yet
    for cs in statuses:
        if cs.state.running is not None:
            return False
        if cs.state.waiting is not None and cs.state.waiting.reason in _STARTING:
            return False  # may be about to start
    return True


def starting(pod: Any) -> bool:
    """Scheduled, and the kubelet may be creating its containers right now (per the API).

    A 1.20 kubelet that gets a pod's deletion while its first sync is still creating the
    containers marks the pod terminated without killing anything: the engine then runs on,
    Terminating, for minutes. So nobody should delete a pod in this window.
    """
    if pod is None or pod.metadata.deletion_timestamp is not None or not pod.spec.node_name:
        return False
    statuses = pod.status.container_statuses or []
    if not statuses:
        return True
    return any(cs.state.waiting is not None and cs.state.waiting.reason in _STARTING for cs in statuses)
