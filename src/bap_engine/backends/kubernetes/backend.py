"""Kubernetes backend: an engine is a StatefulSet of one replica + Service + Secret + PVC.

Sleep is scale-to-zero keeping the PVC, so `pause` and `stop` both set replicas to 0; the
difference is recorded in the `bap-engine/sleep` annotation (set by pause, cleared by
stop/start/resume) and reported as PAUSED vs EXITED. pause/stop/destroy return once the
engine's container is dead; start/resume scale back to 1 without waiting for readiness (the
orchestrator polls /health); create waits only until the container started, to report a
missing image or port. URL modes (`KubernetesConfig.url_mode`): `service`
http://<svc>.<ns>.svc:8000 (orchestrator in the cluster), `hostport` the pod's hostPort=spec.port
bound on `host` (single-node/test clusters), `nodeport` a NodePort Service (needs kube-proxy).

Pod deletions follow two rules learnt on a 1.20 kubelet (harmless on newer ones): never delete
a pod whose containers are still being created (`settle` first), and remove a dead pod's
object ourselves (`_wait_pod_gone`) rather than wait for the kubelet's 10 s status tick.
Never reads the environment; raises only `base` errors (see `api.translated`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from bap_engine.backends import base
from bap_engine.backends.kubernetes import manifests as m
from bap_engine.backends.kubernetes import observe as o
from bap_engine.backends.kubernetes.api import REQUEST_TIMEOUT_S as _T
from bap_engine.backends.kubernetes.api import Api, ApiException, status_of, translated

__all__ = ["KubernetesConfig", "KubernetesBackend"]

_MERGE = "application/merge-patch+json"
_POLL_S = 0.25
_DESTROY_WAIT_S = 30.0
_PAUSE_GRACE_S = 30.0
_SETTLE_S = 30.0
_REPLACE_WAIT_S = 60.0


@dataclass(frozen=True, slots=True)
class KubernetesConfig:
    """Where engines live in the cluster and how they are reached."""

    namespace: str = "bap-engines"
    storage_class: str | None = None  # None: the cluster's default StorageClass
    url_mode: m.UrlMode = "service"
    deployment: str = "default"
    kubeconfig: str | None = None  # None: in-cluster service account, else the default kubeconfig
    image_pull_policy: str = "IfNotPresent"
    host: str = "127.0.0.1"  # hostport/nodeport: the node address in URLs (and the hostIP bound)
    volume_size: str = "1Gi"
    create_wait_s: float = 60.0  # create waits this long for the container to start (image check)


class KubernetesBackend:
    """Engines as StatefulSets in one namespace. Lives with `lifecycle`; see the module docstring."""

    name = "kubernetes"

    def __init__(self, config: KubernetesConfig) -> None:
        if config.url_mode not in ("service", "hostport", "nodeport"):
            raise ValueError(f"unknown Kubernetes url_mode {config.url_mode!r}")
        self._config = config
        self._api = Api(config.kubeconfig)

    @property
    def config(self) -> KubernetesConfig:
        return self._config

    async def has_version(self, version: str) -> bool:
        """Always True: which images the cluster's nodes can pull is not knowable from here (registry
        credentials, node caches); an unpullable image surfaces as a failed boot instead."""
        return True

    async def ping(self) -> None:
        """Check the API answers (startup). Raises BackendError("Kubernetes API unreachable: ...")."""
        await self._api.ping()

    async def close(self) -> None:
        await self._api.close()

    def url_for(self, engine_id: str, port: int) -> str:
        """Base URL of an engine, without I/O."""
        if self._config.url_mode == "service":
            return f"http://{m.names_for(engine_id).service}.{self._config.namespace}.svc:{m.CONTAINER_PORT}"
        return f"http://{self._config.host}:{port}"

    # -- helpers -----------------------------------------------------------------------------

    def _observed(self, sts: Any, state: base.ObservedState) -> base.Observed:
        labels = o.labels_of(sts)
        return base.Observed(
            engine_id=labels.get(base.LABEL_ENGINE_ID, sts.metadata.name),
            state=state,
            labels=labels,
            created_at=o.utc(sts.metadata.creation_timestamp),
            ref=sts.metadata.name,
        )

    async def _read_sts(self, engine_id: str) -> Any:
        """The StatefulSet, or None when absent."""
        apps = await self._api.apps()
        try:
            return await apps.read_namespaced_stateful_set(
                m.names_for(engine_id).statefulset, self._config.namespace, _request_timeout=_T
            )
        except ApiException as exc:
            if status_of(exc) == 404:
                return None
            raise

    async def _read_pod(self, name: str) -> Any:
        core = await self._api.core()
        try:
            return await core.read_namespaced_pod(name, self._config.namespace, _request_timeout=_T)
        except ApiException as exc:
            if status_of(exc) == 404:
                return None
            raise

    async def _scale(self, engine_id: str, replicas: int, *, sleep: bool) -> bool:
        """Set replicas and the sleep annotation in one merge patch. False when absent."""
        apps = await self._api.apps()
        body = {
            "metadata": {"annotations": {m.SLEEP_ANNOTATION: "true" if sleep else None}},
            "spec": {"replicas": replicas},
        }
        try:
            await apps.patch_namespaced_stateful_set(
                m.names_for(engine_id).statefulset,
                self._config.namespace,
                body,
                _content_type=_MERGE,
                _request_timeout=_T,
            )
        except ApiException as exc:
            if status_of(exc) == 404:
                return False
            raise
        return True

    async def _delete(self, kind: str, name: str, **options: object) -> None:
        """Delete one object; 404 is success."""
        api = await (self._api.apps() if kind == "stateful_set" else self._api.core())
        method = getattr(api, f"delete_namespaced_{kind}")
        try:
            await method(name, self._config.namespace, _request_timeout=_T, **options)
        except ApiException as exc:
            if status_of(exc) != 404:
                raise

    async def _wait_pod_gone(self, name: str, timeout: float) -> bool:
        """Poll until the pod object is gone, removing it ourselves (grace 0) once the kubelet
        reports every container dead: the kubelet would only do so after its volume teardown,
        on a 10 s status tick (7-14 s later), and the StatefulSet cannot restart the engine
        until the old pod object is gone (so this is what makes a wake take ~2 s, not ~12 s)."""
        deadline, uid = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            pod = await self._read_pod(name)
            if pod is None or uid not in (None, pod.metadata.uid):
                return True  # gone, or already replaced by the controller's next pod
            uid = pod.metadata.uid
            if o.stopped_for_good(pod):
                options = {"gracePeriodSeconds": 0, "preconditions": {"uid": pod.metadata.uid}}
                try:
                    await self._delete("pod", name, body=options)
                except ApiException as exc:
                    if status_of(exc) != 409:  # 409: the UID changed, a new pod already
                        raise
                continue
            await asyncio.sleep(_POLL_S)
        return False

    async def settle(self, engine_id: str, timeout: float = _SETTLE_S) -> None:
        """Wait (bounded) while the engine's pod is being started: see `observe.starting`.
        Everything that deletes an engine's pod (scale-down included) calls this first."""
        name = m.names_for(engine_id).pod
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and o.starting(await self._read_pod(name)):
            await asyncio.sleep(_POLL_S)

    async def _scale_down(self, engine_id: str, grace_s: float) -> None:
        """After replicas=0: delete the pod with `grace_s` and wait until the controller has seen
        the scale-down and the engine's container is dead, so it no longer answers."""
        pod = m.names_for(engine_id).pod
        # grace 0 would be a force delete: the object goes at once while the container still runs
        await self._delete("pod", pod, grace_period_seconds=max(1, int(grace_s)))
        deadline = time.monotonic() + grace_s + 30
        while time.monotonic() < deadline:
            sts = await self._read_sts(engine_id)
            if sts is None:
                return
            observed = (sts.status.observed_generation or 0) >= (sts.metadata.generation or 0)
            if observed and await self._wait_pod_gone(pod, deadline - time.monotonic()):
                return
            await asyncio.sleep(_POLL_S)
        raise base.BackendError(
            f"pod of {engine_id} still present {grace_s + 30:.0f}s after scale-down", transient=True
        )

    async def _wait_container(self, spec: base.EngineSpec) -> None:
        """Wait (bounded) until the engine's container started; ImageNotFound / PortInUse (after
        cleaning up) when the runtime cannot get the image / no node has the port. Not a health wait."""
        pod = m.names_for(spec.engine_id).pod
        deadline = time.monotonic() + self._config.create_wait_s
        while time.monotonic() < deadline:
            outcome = o.container_outcome(await self._read_pod(pod))
            if outcome == "started":
                return
            if outcome in ("image", "port"):
                await self.destroy(spec.engine_id)
                raise base.ImageNotFound(spec.image) if outcome == "image" else base.PortInUse(spec.port)
            await asyncio.sleep(_POLL_S)

    async def _require_awake_or_asleep(self, engine_id: str) -> None:
        """EngineAbsent unless the StatefulSet exists and runs or sleeps (not stopped)."""
        sts = await self._read_sts(engine_id)
        if sts is None or (not sts.spec.replicas and not o.sleeping(sts)):
            raise base.EngineAbsent(engine_id)

    # -- create ------------------------------------------------------------------------------

    async def _check_port(self, spec: base.EngineSpec) -> None:
        """hostport mode: the node address must be free unless this very engine holds it."""
        if self._config.url_mode != "hostport" or o.port_free(self._config.host, spec.port):
            return
        sts = await self._read_sts(spec.engine_id)
        if sts is None or (sts.metadata.annotations or {}).get("bap-engine/port") != str(spec.port):
            raise base.PortInUse(spec.port)

    async def _create_statefulset(self, spec: base.EngineSpec) -> Any:
        apps, cfg = await self._api.apps(), self._config
        body = m.statefulset_body(
            spec,
            cfg.deployment,
            mode=cfg.url_mode,
            host_ip=cfg.host,
            image_pull_policy=cfg.image_pull_policy,
            replicas=0,  # children first, then scale: the pod never waits on a missing Secret/PVC
        )
        try:
            return await apps.create_namespaced_stateful_set(cfg.namespace, body, _request_timeout=_T)
        except ApiException as exc:
            if status_of(exc) != 409:
                raise
        sts = await self._read_sts(spec.engine_id)
        if sts is None:
            raise base.BackendError(f"StatefulSet of {spec.engine_id} vanished during create", transient=True)
        port = (sts.metadata.annotations or {}).get("bap-engine/port")
        if port != str(spec.port):
            raise base.BackendError(f"engine {spec.engine_id} already exists on port {port}")
        return sts

    async def _create_children(self, spec: base.EngineSpec, owner: dict[str, object]) -> None:
        core, cfg = await self._api.core(), self._config
        ns, names = cfg.namespace, m.names_for(spec.engine_id)
        secret = m.secret_body(spec, cfg.deployment, owner=owner)
        try:
            await core.create_namespaced_secret(ns, secret, _request_timeout=_T)
        except ApiException as exc:
            if status_of(exc) != 409:
                raise
            await core.replace_namespaced_secret(names.secret, ns, secret, _request_timeout=_T)
        pvc = m.pvc_body(spec, cfg.deployment, storage_class=cfg.storage_class, size=cfg.volume_size, owner=owner)
        service = m.service_body(spec, cfg.deployment, mode=cfg.url_mode, owner=owner)
        for create, body in (
            (core.create_namespaced_persistent_volume_claim, pvc),
            (core.create_namespaced_service, service),
        ):
            try:
                await create(ns, body, _request_timeout=_T)
            except ApiException as exc:
                if status_of(exc) == 422 and "provided port is already allocated" in str(exc):
                    raise base.PortInUse(spec.port) from exc
                if status_of(exc) != 409:
                    raise

    async def create(self, spec: base.EngineSpec) -> base.Placement:
        """Apply StatefulSet (0 replicas), Secret, PVC and Service, then scale to 1 (no health wait).

        Idempotent for the same engine id and port. Raises PortInUse, base.BackendError.
        """
        with translated(f"kubernetes create {spec.engine_id}"):
            await self._check_port(spec)
            sts = await self._create_statefulset(spec)
            await self._create_children(spec, m.owner_reference(sts.metadata.name, sts.metadata.uid))
            if not await self._scale(spec.engine_id, 1, sleep=False):
                raise base.BackendError(f"StatefulSet of {spec.engine_id} vanished during create", transient=True)
            await self._wait_container(spec)
            return base.Placement(spec.engine_id, self.url_for(spec.engine_id, spec.port), sts.metadata.name)

    # -- transitions -------------------------------------------------------------------------

    async def start(self, engine_id: str) -> None:
        """Scale to 1 (data kept); a crashed or terminating pod is replaced by a fresh one
        (this waits until the old one is dead). Raises base.EngineAbsent, base.BackendError."""
        with translated(f"kubernetes start {engine_id}"):
            sts = await self._read_sts(engine_id)
            if sts is None:
                raise base.EngineAbsent(engine_id)
            if sts.spec.replicas and not o.sleeping(sts):
                await self._replace_dead_pod(engine_id)
            elif not await self._scale(engine_id, 1, sleep=False):
                raise base.EngineAbsent(engine_id)

    async def _replace_dead_pod(self, engine_id: str) -> None:
        name = m.names_for(engine_id).pod
        pod = await self._read_pod(name)
        if pod is None or o.pod_state(pod) is not base.ObservedState.EXITED:
            return  # running, or being (re)created by the controller
        if pod.metadata.deletion_timestamp is None:  # crashed in place (CrashLoopBackOff...)
            await self._delete("pod", name, grace_period_seconds=1)
        if not await self._wait_pod_gone(name, _REPLACE_WAIT_S):
            raise base.BackendError(f"old pod of {engine_id} still terminating", transient=True)

    async def resume(self, engine_id: str) -> None:
        """Scale a sleeping (or running) engine to 1. Raises base.EngineAbsent (also when stopped)."""
        with translated(f"kubernetes resume {engine_id}"):
            await self._require_awake_or_asleep(engine_id)
            if not await self._scale(engine_id, 1, sleep=False):
                raise base.EngineAbsent(engine_id)

    async def pause(self, engine_id: str) -> None:
        """Sleep = scale to 0 keeping the PVC, reported PAUSED; returns once the pod is gone.

        Raises base.EngineAbsent (also when stopped), base.BackendError.
        """
        with translated(f"kubernetes pause {engine_id}"):
            await self._require_awake_or_asleep(engine_id)
            await self.settle(engine_id)
            if not await self._scale(engine_id, 0, sleep=True):
                raise base.EngineAbsent(engine_id)
            await self._scale_down(engine_id, _PAUSE_GRACE_S)

    async def stop(self, engine_id: str, grace_s: float = 30) -> None:
        """Scale to 0, delete the pod with `grace_s` and wait until it is gone. Absent is success."""
        with translated(f"kubernetes stop {engine_id}"):
            await self.settle(engine_id)
            if await self._scale(engine_id, 0, sleep=False):
                await self._scale_down(engine_id, grace_s)

    async def destroy(self, engine_id: str) -> None:
        """Delete StatefulSet, pod, Service, Secret and PVC (the data). Idempotent: 404 is success."""
        names = m.names_for(engine_id)
        with translated(f"kubernetes destroy {engine_id}"):
            # Pod first, PVC after: the PVC is owned by the StatefulSet, and a 1.20 kubelet whose
            # running pod loses its PVC blocks that pod's worker for minutes (it never terminates).
            await self.settle(engine_id)
            if await self._scale(engine_id, 0, sleep=False):
                await self._delete("pod", names.pod, grace_period_seconds=1)
                await self._wait_pod_gone(names.pod, _DESTROY_WAIT_S)
            await self._delete("stateful_set", names.statefulset, propagation_policy="Background")
            await self._delete("service", names.service)
            await self._delete("secret", names.secret)
            # pvc-protection keeps the claim (and the data) until the pod object is gone; the
            # provisioner then deletes the volume: asynchronous, but certain
            await self._delete("persistent_volume_claim", names.pvc)

    # -- observation -------------------------------------------------------------------------

    async def inspect(self, engine_id: str) -> base.Observed:
        """From the StatefulSet (replicas, sleep annotation) and its pod. Raises base.BackendError."""
        with translated(f"kubernetes inspect {engine_id}"):
            sts = await self._read_sts(engine_id)
            if sts is None:
                return base.Observed(engine_id=engine_id, state=base.ObservedState.ABSENT)
            if not sts.spec.replicas:
                state = base.ObservedState.PAUSED if o.sleeping(sts) else base.ObservedState.EXITED
            else:
                state = o.pod_state(await self._read_pod(m.names_for(engine_id).pod))
            return self._observed(sts, state)

    async def list_managed(self) -> list[base.Observed]:
        """Every engine of this deployment: ONE StatefulSet list by label (desired state only)."""
        with translated("kubernetes list"):
            apps = await self._api.apps()
            result = await apps.list_namespaced_stateful_set(
                self._config.namespace,
                label_selector=f"{base.LABEL_DEPLOYMENT}={self._config.deployment}",
                _request_timeout=_T,
            )
            observed: list[base.Observed] = []
            for sts in result.items:
                if sts.metadata.deletion_timestamp is not None:
                    continue
                if sts.spec.replicas:
                    state = base.ObservedState.RUNNING
                else:
                    state = base.ObservedState.PAUSED if o.sleeping(sts) else base.ObservedState.EXITED
                observed.append(self._observed(sts, state))
            return observed
