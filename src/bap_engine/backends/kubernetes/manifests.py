"""Pure builders for the objects that make one engine: names, labels and request bodies.

An engine is a StatefulSet of one replica (`bap-engine-<id>`) plus a Service (same name),
a Secret (`<name>-env`, the engine's env) and a PVC (`<name>-data`, mounted at /data).
The Secret, Service and PVC carry an ownerReference to the StatefulSet, so deleting it
cascades. Everything here is data in, dict out: no I/O, no client, no environment.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from bap_engine.backends import base

__all__ = [
    "CONTAINER_PORT",
    "SLEEP_ANNOTATION",
    "LABELS_ANNOTATION",
    "UrlMode",
    "Names",
    "names_for",
    "engine_labels",
    "statefulset_body",
    "service_body",
    "secret_body",
    "pvc_body",
    "owner_reference",
    "k8s_quantity_memory",
]

UrlMode = Literal["service", "hostport", "nodeport"]
CONTAINER_PORT = 8000
SLEEP_ANNOTATION = "bap-engine/sleep"  # "true" while scaled to 0 by pause (PAUSED, not EXITED)
LABELS_ANNOTATION = "bap-engine/labels"  # every spec label as JSON, even those k8s cannot hold
_GRACE_S = 30
_DNS_SAFE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")
_LABEL_PREFIX = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?$")
_MEMORY = re.compile(r"^([0-9]+)([bkmgBKMG]?)$")

_Body = dict[str, object]


@dataclass(frozen=True, slots=True)
class Names:
    """The object names of one engine."""

    statefulset: str
    service: str
    secret: str
    pvc: str
    pod: str


def names_for(engine_id: str) -> Names:
    """`bap-engine-<id>` when the id is DNS-safe (a UUID is), else a sanitized prefix + hash.

    Kept under 52 characters: the StatefulSet controller appends a revision hash to a label.
    """
    ident = engine_id if _DNS_SAFE.match(engine_id) else ""
    if not ident:
        cleaned = re.sub(r"[^a-z0-9-]+", "-", engine_id.lower()).strip("-")[:24].strip("-")
        digest = hashlib.sha256(engine_id.encode()).hexdigest()[:10]
        ident = f"{cleaned}-{digest}" if cleaned else digest
    name = f"bap-engine-{ident}"
    return Names(statefulset=name, service=name, secret=f"{name}-env", pvc=f"{name}-data", pod=f"{name}-0")


def _valid_label(key: str, value: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and not _LABEL_PREFIX.match(prefix):
        return False
    return bool(_LABEL_NAME.match(name)) and bool(_LABEL_VALUE.match(value))


def engine_labels(spec: base.EngineSpec, deployment: str) -> tuple[dict[str, str], dict[str, str]]:
    """(k8s labels, all labels). Spec labels k8s cannot hold survive only in the annotation."""
    every = {
        **spec.labels,
        base.LABEL_ENGINE_ID: spec.engine_id,
        base.LABEL_PRODUCT_ID: spec.product_id,
        base.LABEL_DEPLOYMENT: deployment,
    }
    k8s = {k: v for k, v in every.items() if _valid_label(k, v)}
    for required in (base.LABEL_ENGINE_ID, base.LABEL_DEPLOYMENT):
        if required not in k8s:
            raise base.BackendError(f"{required}={every[required]!r} is not a valid Kubernetes label value")
    return k8s, every


def selector_labels(labels: Mapping[str, str]) -> dict[str, str]:
    return {k: labels[k] for k in (base.LABEL_ENGINE_ID, base.LABEL_DEPLOYMENT)}


def k8s_quantity_memory(memory: str) -> str:
    """Docker-style "512m"/"1g"/"1048576" to a Kubernetes quantity ("512Mi", "1Gi", "1048576")."""
    match = _MEMORY.match(memory.strip())
    if match is None:
        raise base.BackendError(f"invalid memory limit {memory!r}")
    number, unit = match.groups()
    suffix = {"": "", "b": "", "k": "Ki", "m": "Mi", "g": "Gi"}[unit.lower()]
    return f"{number}{suffix}"


def _resources(spec: base.EngineSpec) -> _Body:
    # Requests stay small so a test node (or a dense node) can hold many sleeping-capable engines;
    # the limits are what the spec asks for.
    limits: dict[str, str] = {}
    if spec.cpus is not None:
        limits["cpu"] = f"{max(1, round(spec.cpus * 1000))}m"
    if spec.memory is not None:
        limits["memory"] = k8s_quantity_memory(spec.memory)
    requests = {"cpu": "10m", "memory": "32Mi"}
    if "cpu" in limits and int(limits["cpu"][:-1]) < 10:
        requests["cpu"] = limits["cpu"]
    if limits:
        return {"limits": limits, "requests": requests}
    return {"requests": requests}


def _meta(name: str, labels: Mapping[str, str], annotations: Mapping[str, str] | None = None) -> _Body:
    meta: _Body = {"name": name, "labels": dict(labels)}
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def owner_reference(statefulset_name: str, uid: str) -> _Body:
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": statefulset_name,
        "uid": uid,
        "controller": False,
        "blockOwnerDeletion": False,
    }


def _container(spec: base.EngineSpec, names: Names, mode: UrlMode, host_ip: str, pull: str) -> _Body:
    env: list[_Body] = [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": names.secret, "key": key}}}
        for key in sorted(spec.env)
        if key not in ("PORT", "HOST", "SQLITE_DB_PATH")
    ]
    env += [
        {"name": "PORT", "value": str(CONTAINER_PORT)},
        {"name": "HOST", "value": "0.0.0.0"},
        {"name": "SQLITE_DB_PATH", "value": "/data/brain.sqlite"},
        {"name": "BAP_ENGINE_ID", "value": spec.engine_id},
    ]
    port: _Body = {"name": "http", "containerPort": CONTAINER_PORT, "protocol": "TCP"}
    if mode == "hostport":
        port.update(hostPort=spec.port, hostIP=host_ip)
    probe: _Body = {"httpGet": {"path": "/health", "port": CONTAINER_PORT}, "timeoutSeconds": 2}
    return {
        "name": "engine",
        "image": spec.image,
        "imagePullPolicy": pull,
        "env": env,
        "ports": [port],
        "resources": _resources(spec),
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        "readinessProbe": {**probe, "periodSeconds": 2, "failureThreshold": 2},
        "livenessProbe": {**probe, "initialDelaySeconds": 15, "periodSeconds": 10, "failureThreshold": 3},
    }


def statefulset_body(
    spec: base.EngineSpec,
    deployment: str,
    *,
    mode: UrlMode,
    host_ip: str,
    image_pull_policy: str,
    replicas: int,
) -> _Body:
    names = names_for(spec.engine_id)
    labels, every = engine_labels(spec, deployment)
    annotations = {LABELS_ANNOTATION: json.dumps(every, sort_keys=True), "bap-engine/port": str(spec.port)}
    pod_spec: _Body = {
        "containers": [_container(spec, names, mode, host_ip, image_pull_policy)],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": names.pvc}}],
        "terminationGracePeriodSeconds": _GRACE_S,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,  # thousands of engine Services would otherwise bloat every env
        "restartPolicy": "Always",
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(names.statefulset, labels, annotations),
        "spec": {
            "replicas": replicas,
            "serviceName": names.service,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector_labels(labels)},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def service_body(spec: base.EngineSpec, deployment: str, *, mode: UrlMode, owner: _Body) -> _Body:
    names = names_for(spec.engine_id)
    labels, _ = engine_labels(spec, deployment)
    port: _Body = {"name": "http", "port": CONTAINER_PORT, "targetPort": CONTAINER_PORT, "protocol": "TCP"}
    svc_spec: _Body = {"selector": selector_labels(labels), "ports": [port], "type": "ClusterIP"}
    if mode == "nodeport":
        port["nodePort"] = spec.port
        svc_spec["type"] = "NodePort"
    meta = _meta(names.service, labels)
    meta["ownerReferences"] = [owner]
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": svc_spec}


def secret_body(spec: base.EngineSpec, deployment: str, *, owner: _Body) -> _Body:
    names = names_for(spec.engine_id)
    labels, _ = engine_labels(spec, deployment)
    meta = _meta(names.secret, labels)
    meta["ownerReferences"] = [owner]
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": meta, "stringData": dict(spec.env)}


def pvc_body(spec: base.EngineSpec, deployment: str, *, storage_class: str | None, size: str, owner: _Body) -> _Body:
    names = names_for(spec.engine_id)
    labels, _ = engine_labels(spec, deployment)
    meta = _meta(names.pvc, labels)
    meta["ownerReferences"] = [owner]
    pvc_spec: _Body = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}
    if storage_class is not None:
        pvc_spec["storageClassName"] = storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": pvc_spec}
