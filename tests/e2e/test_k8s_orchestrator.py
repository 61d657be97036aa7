"""The orchestrator image, deployed in the test cluster as two replicas, admits through both.

Needs the test cluster (`scripts/k8s-test-cluster.sh up`), kubectl and the locally built orchestrator
image (`scripts/build-images.sh`; or $BAP_K8S_ORCHESTRATOR_IMAGE) in the node's dockerd; without them
it skips, or fails with BAP_REQUIRE_K8S=1 (or "kubernetes" in BAP_REQUIRE_BACKENDS).

`kubectl apply -k` deploys deploy/kubernetes/overlays/production through a test overlay in the tmp
dir that adds only what a cluster with no DNS and no kube-proxy, and the test, need (see "Testing the
orchestrator image in the test cluster" in deploy/README-kubernetes.md): its own namespace and Secret,
the Role renamed and bound there, `hostNetwork` with one port per ordinal (so the Deployment becomes a
StatefulSet, without container port and probes), the local image, and the PodDisruptionBudget as
policy/v1beta1 where policy/v1 is not served (1.20). All is removed at the end (unless
BAP_KEEP_TEST_RESOURCES=1).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import time
import uuid
from asyncio.subprocess import DEVNULL, PIPE
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import pytest
import yaml
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException

from bap_engine.backends.base import LABEL_DEPLOYMENT
from bap_engine.backends.kubernetes import KubernetesBackend
from bap_engine.backends.kubernetes.manifests import names_for
from bap_engine.backends.kubernetes.observe import IMAGE_ERRORS, starting
from bap_engine.config import Settings
from tests.backends.helpers import DEFAULT_IMAGE, execute
from tests.backends.support_kubernetes import NAMESPACE, _unavailable, kubeconfig_path, make_backend
from tests.conftest import ADMIN_KEY, wait_until
from tests.e2e.conftest import free_port

MANIFESTS = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
OVERLAY = MANIFESTS / "overlays" / "production"
NAME = "bap-orchestrator"  # the Deployment, ServiceAccount, Role, Secret and PDB of the manifests
TEST_LABEL = "bap-engine.test"
_DELETE_NAMESPACE = "{$patch: delete, apiVersion: v1, kind: Namespace, metadata: {name: any}}"
_BROKEN = IMAGE_ERRORS | {"CrashLoopBackOff", "CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
KEEP = os.environ.get("BAP_KEEP_TEST_RESOURCES") == "1"


def _manifest(name: str, kind: str) -> dict[str, Any]:
    for doc in yaml.safe_load_all((MANIFESTS / name).read_text()):
        if doc and doc.get("kind") == kind:
            return dict(doc)
    raise AssertionError(f"no {kind} in deploy/kubernetes/{name}")


_BASE_POD = _manifest("base/deployment.yaml", "Deployment")["spec"]["template"]["spec"]
ORCH_IMAGE = os.environ.get("BAP_K8S_ORCHESTRATOR_IMAGE", _BASE_POD["containers"][0]["image"])


async def _image_on_node(core: Any, image: str) -> bool:
    """Whether the node has `image`: the local dockerd the kubelet uses, else the node status (≤ 50 images)."""
    docker = shutil.which("docker")
    if docker is not None:
        proc = await asyncio.create_subprocess_exec(docker, "image", "inspect", image, stdout=DEVNULL, stderr=DEVNULL)
        if await proc.wait() == 0:
            return True
    nodes = await core.list_node()
    return any(image in (img.names or []) for node in nodes.items for img in (node.status.images or []))


def _socket_dir(dsn: str) -> str | None:
    """The unix-socket directory of a libpq DSN (host=/dir, or a %2F-encoded host), if any."""
    parts = urlsplit(dsn)
    hosts = parse_qs(parts.query).get("host", [])
    host = hosts[0] if hosts else unquote(parts.hostname or "")
    return host if host.startswith("/") else None


async def kubectl(*args: str) -> str:
    """Run kubectl on the test cluster; its stdout, or an AssertionError with its stderr."""
    exe = shutil.which("kubectl") or "kubectl"
    env = {**os.environ, "KUBECONFIG": str(kubeconfig_path())}
    proc = await asyncio.create_subprocess_exec(exe, *args, env=env, stdout=PIPE, stderr=PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, f"kubectl {' '.join(args)} exited {proc.returncode}: {err.decode()}"
    return out.decode()


def _json_patch(target: dict[str, str], *ops: tuple[str, ...]) -> dict[str, Any]:
    """A JSON 6902 patch of the resources `target` selects; ops are (op, path[, value])."""
    patch = [{"op": op[0], "path": op[1], **({"value": op[2]} if len(op) > 2 else {})} for op in ops]
    return {"target": target, "patch": yaml.safe_dump(patch)}


def _pod_patch(ns: str, settings: Settings, ports: list[int], dsn: str, api_host: str) -> dict[str, Any]:
    """The pod template on the host network, one port per ordinal, the local image, the test's env."""
    api_server = urlsplit(api_host)
    env = {
        "ORCH_HOST": "127.0.0.1", "ORCH_K8S_URL_MODE": "hostport",  # no kube-proxy: engines on their hostPort
        "ORCH_K8S_NAMESPACE": NAMESPACE, "ORCH_ENGINE_IMAGE": DEFAULT_IMAGE, "ORCH_DEPLOYMENT": settings.deployment,
        "ORCH_PORT_MIN": str(settings.port_min), "ORCH_PORT_MAX": str(settings.port_max),
        # In-cluster config (the ServiceAccount's token and CA), with the apiserver where the node reaches it
        # (127.0.0.1:16443) instead of the `kubernetes` Service's ClusterIP, which nothing routes here.
        "KUBERNETES_SERVICE_HOST": str(api_server.hostname), "KUBERNETES_SERVICE_PORT": str(api_server.port or 443),
        **{f"BAP_PORT_{ordinal}": str(port) for ordinal, port in enumerate(ports)},
    }
    container: dict[str, Any] = {
        "name": "orchestrator", "image": ORCH_IMAGE, "imagePullPolicy": "Never",
        "ports": None, "readinessProbe": None, "livenessProbe": None,  # null: removed
        "env": [{"name": "ORCH_PORT", "$patch": "delete"}, *({"name": k, "value": v} for k, v in env.items()),
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "command": ["sh", "-c", 'eval "port=\\$BAP_PORT_${POD_NAME##*-}"; exec bap-engine serve --port "$port"'],
    }
    pod: dict[str, Any] = {"hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet",
                           "terminationGracePeriodSeconds": 15, "containers": [container]}
    socket_dir = _socket_dir(dsn)
    if socket_dir is not None:
        pod["volumes"] = [{"name": "pg-socket", "hostPath": {"path": socket_dir, "type": "Directory"}}]
        container["volumeMounts"] = [{"name": "pg-socket", "mountPath": socket_dir, "readOnly": True}]
    patch = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": NAME, "namespace": ns},
             "spec": {"template": {"spec": pod}}}
    return {"target": {"kind": "Deployment", "name": NAME}, "patch": yaml.safe_dump(patch)}


class Cluster:
    """Admin clients on the test cluster, and what this test created there."""

    def __init__(self, api: Any, ns: str) -> None:
        self.api = api
        self.ns = ns
        self.ports: list[int] = []  # the orchestrators' ports on the node's loopback, by ordinal
        while len(self.ports) < 2:
            if (port := free_port()) not in self.ports:
                self.ports.append(port)
        self.urls = [f"http://127.0.0.1:{port}" for port in self.ports]
        self.core: Any = k8s.CoreV1Api(api)  # Any: the bodies below are plain dicts
        self.apps: Any = k8s.AppsV1Api(api)
        self.rbac: Any = k8s.RbacAuthorizationV1Api(api)

    async def setup(self, settings: Settings, dsn: str, workdir: Path) -> None:
        # policy/v1 where the cluster serves it (>= 1.21), else policy/v1beta1 (the 1.20 test cluster)
        pdb = "policy/v1" if "policy/v1" in (await kubectl("api-versions")).split() else "policy/v1beta1"
        await kubectl("apply", "-k", str(self.write_overlay(workdir / "overlay", settings, dsn, pdb)))

    def write_overlay(self, root: Path, settings: Settings, dsn: str, pdb: str) -> Path:
        """The test overlay in `root`: the production overlay plus the test cluster's patches."""
        root.mkdir()
        ns, secret = self.ns, _manifest("secret.example.yaml", "Secret")
        values = {"ORCH_MASTER_KEY": str(settings.master_key), "ORCH_ADMIN_KEY": ADMIN_KEY, "ORCH_DATABASE_URL": dsn}
        assert set(secret["stringData"]) == set(values), secret["stringData"]
        (root / "secret.env").touch(mode=0o600)
        (root / "secret.env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [os.path.relpath(OVERLAY, root)],
            "labels": [{"pairs": {TEST_LABEL: ns}, "includeTemplates": True}],
            "secretGenerator": [{"name": secret["metadata"]["name"], "namespace": ns, "envs": ["secret.env"],
                                 "options": {"disableNameSuffixHash": True}}],
            "patches": [  # applied in this order
                # bap-system becomes the test's namespace; bap-engines exists already (and is shared)
                _json_patch({"kind": "Namespace", "name": "bap-system"}, ("replace", "/metadata/name", ns)),
                {"target": {"kind": "Namespace", "name": "bap-engines"}, "patch": _DELETE_NAMESPACE},
                _json_patch({"namespace": "bap-system"}, ("replace", "/metadata/namespace", ns)),
                _json_patch({"kind": "Role|RoleBinding", "name": NAME}, ("replace", "/metadata/name", ns)),
                _json_patch({"kind": "RoleBinding"}, ("replace", "/roleRef/name", ns),
                            ("replace", "/subjects/0/namespace", ns)),
                _json_patch({"kind": "PodDisruptionBudget"}, ("replace", "/apiVersion", pdb)),
                _pod_patch(ns, settings, self.ports, dsn, self.api.configuration.host),
                _json_patch({"kind": "Deployment", "name": NAME}, ("replace", "/kind", "StatefulSet"),
                            ("remove", "/spec/strategy"), ("add", "/spec/serviceName", NAME),
                            ("add", "/spec/podManagementPolicy", "Parallel")),
            ],
        }
        (root / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
        return root

    async def pods(self) -> list[Any]:
        return list((await self.core.list_namespaced_pod(self.ns)).items)

    async def diagnostics(self) -> str:
        """Pod states and the tail of each orchestrator's log, for failure messages."""
        out = []
        try:
            for pod in await self.pods():
                states = [(cs.name, cs.state.to_dict(), cs.restart_count) for cs in pod.status.container_statuses or []]
                out.append(f"--- pod {pod.metadata.name}: {pod.status.phase} {states}")
                try:
                    out.append(await self.core.read_namespaced_pod_log(pod.metadata.name, self.ns, tail_lines=40))
                except ApiException as exc:
                    out.append(f"(no log: {exc.reason})")
        except Exception as exc:  # diagnostics must never hide the real failure
            out.append(f"(diagnostics failed: {exc!r})")
        return "\n".join(out)

    async def teardown(self) -> None:
        """Stop the orchestrators (their containers dead, so they let go of Postgres and their
        ports), then delete the Role/RoleBinding and the namespace (even if stopping failed)."""
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and any(starting(p) for p in await self.pods()):
                await asyncio.sleep(0.5)  # a 1.20 kubelet must not get a delete mid container creation
            # orphan the pods, then delete them ourselves: one deletion each, with their grace
            await _ignoring(self.apps.delete_namespaced_stateful_set(NAME, self.ns, propagation_policy="Orphan"), 404)
            for pod in await self.pods():  # (404: gone already; 409 below: a newer pod, the UID precondition)
                await _ignoring(self.core.delete_namespaced_pod(pod.metadata.name, self.ns), 404)
            ports = {f"{NAME}-{ordinal}": port for ordinal, port in enumerate(self.ports)}

            async def all_gone() -> bool:
                pods = await self.pods()
                for pod in pods:
                    # A 1.20 kubelet may keep a terminating pod's object long after its container died (waiting
                    # "ContainerCreating", last state ContainerStatusUnknown): once dead and its port closed, drop it.
                    port = ports.get(pod.metadata.name)
                    if _dead(pod) and (port is None or not _listening(port)):
                        # (in the body: with a body, the apiserver ignores the query parameters)
                        await _ignoring(self.core.delete_namespaced_pod(pod.metadata.name, self.ns, body={
                            "gracePeriodSeconds": 0, "preconditions": {"uid": pod.metadata.uid}}), 404, 409)
                return not pods

            await wait_until(all_gone, 60, interval=0.5)
        finally:
            for delete in (self.rbac.delete_namespaced_role_binding, self.rbac.delete_namespaced_role):
                await _ignoring(delete(self.ns, NAMESPACE), 404)
            await _ignoring(self.core.delete_namespace(self.ns), 404)


async def _ignoring(call: Awaitable[Any], *statuses: int) -> None:
    try:
        await call
    except ApiException as exc:
        if exc.status not in statuses:
            raise


def _dead(pod: Any) -> bool:
    """Terminating, and no container of it runs or may still be started for the first time."""
    if pod.metadata.deletion_timestamp is None:
        return False
    if not pod.spec.node_name:
        return True
    statuses = pod.status.container_statuses or []
    for cs in statuses:
        if cs.state.running is not None:
            return False
        ran = cs.state.terminated is not None or cs.last_state.terminated is not None or cs.restart_count
        if not ran and (cs.state.waiting is None or cs.state.waiting.reason in (None, "ContainerCreating")):
            return False  # never ran: the kubelet may be creating it right now
    return bool(statuses)


def _listening(port: int) -> bool:
    with socket.socket() as sock:  # on the loopback: answered at once
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
async def cluster(settings: Settings, tmp_path: Path) -> AsyncIterator[tuple[Cluster, KubernetesBackend]]:
    """The test cluster (skip/fail as the backend suite does), with kubectl and the orchestrator image.
    Yields admin clients and an engine backend for `settings.deployment`, which removes every engine
    of that deployment at the end."""
    async with make_backend(tmp_path, settings.deployment) as backend:
        if shutil.which("kubectl") is None:
            _unavailable("kubectl not found (it applies the kustomize overlay)")
        api_config = k8s.Configuration()  # make_backend skipped unless there is a kubeconfig
        await k8s_config.load_kube_config(config_file=str(kubeconfig_path()), client_configuration=api_config)
        async with k8s.ApiClient(api_config) as api:
            c = Cluster(api, f"bap-orch-{uuid.uuid4().hex[:10]}")
            if not await _image_on_node(c.core, ORCH_IMAGE):
                _unavailable(f"image {ORCH_IMAGE} is not on the node; run scripts/build-images.sh")
            try:
                yield c, backend
            finally:
                if not KEEP:
                    await c.teardown()


async def test_two_orchestrator_replicas_in_the_cluster_admit(
    cluster: tuple[Cluster, KubernetesBackend], settings: Settings, pg_dsn: str, tmp_path: Path
) -> None:
    c, backend = cluster
    await c.setup(settings, pg_dsn, tmp_path)
    try:
        await _wait_for_replicas(c)
        await _scenario(c, backend, settings)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{await c.diagnostics()}") from exc


async def _wait_for_replicas(c: Cluster) -> None:
    """Both replicas answer /health; they run what the production overlay says, under its PDB."""
    async with httpx.AsyncClient() as http:
        async def healthy(url: str) -> bool:
            try:
                return (await http.get(f"{url}/health", timeout=2)).status_code == 200
            except httpx.TransportError:
                return False

        async def both_healthy() -> bool:
            for pod in await c.pods():  # an orchestrator that cannot start fails the test at once
                for cs in pod.status.container_statuses or []:
                    waiting = cs.state.waiting.reason if cs.state.waiting is not None else None
                    if cs.restart_count or cs.state.terminated is not None or waiting in _BROKEN:
                        raise AssertionError(f"orchestrator pod {pod.metadata.name} does not start "
                                             f"({waiting or 'exited'}, {cs.restart_count} restarts)")
            return all(await asyncio.gather(*(healthy(url) for url in c.urls)))

        await wait_until(both_healthy, 90, interval=0.5)
    pods = {p.metadata.name: p for p in await c.pods()}
    assert sorted(pods) == [f"{NAME}-0", f"{NAME}-1"], sorted(pods)
    for pod in pods.values():
        assert pod.spec.service_account_name == NAME
        assert pod.spec.affinity.pod_anti_affinity.preferred_during_scheduling_ignored_during_execution
        assert pod.spec.containers[0].resources.limits["memory"] == "1Gi", pod.spec.containers[0].resources
    pdb: dict[str, Any] = {}

    async def pdb_covers_both() -> bool:  # the disruption controller sees both replicas healthy
        pdb.update(json.loads(await kubectl("-n", c.ns, "get", "poddisruptionbudget", NAME, "-o", "json")))
        return bool((st := pdb.get("status", {})).get("expectedPods") == 2 and st.get("disruptionsAllowed") == 1)

    try:
        await wait_until(pdb_covers_both, 30, interval=0.5)
    except AssertionError as exc:
        raise AssertionError(f"PodDisruptionBudget: {pdb}") from exc
    assert pdb["spec"]["minAvailable"] == 1, pdb["spec"]


async def _scenario(c: Cluster, backend: KubernetesBackend, settings: Settings) -> None:
    r0, r1 = c.urls
    async with httpx.AsyncClient(timeout=90) as http:
        # A product registered through replica 0 ...
        r = await http.post(f"{r0}/products/register", headers={"X-Admin-Key": ADMIN_KEY},
                            json={"slug": f"k8s-{uuid.uuid4().hex[:10]}", "display_name": "K8s orchestrator"})
        assert r.status_code == 200, r.text
        product_id, platform_key = r.json()["product_id"], r.json()["platform_api_key"]
        headers, user = {"X-Platform-Key": platform_key}, "k8s-user-1"

        # ... admits a user through replica 1: the engine is provisioned in the engines' namespace.
        r = await http.post(f"{r1}/engines/{user}/admit", headers=headers, json={"auto_provision": True})
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["admitted"] is True, doc
        engine = doc["engine"]
        engine_id, url, key = engine["engine_id"], engine["url"], engine["api_key"]
        port = int(urlsplit(url).port or 0)
        assert url == f"http://127.0.0.1:{port}" and settings.port_min <= port <= settings.port_max, url
        sts_name = names_for(engine_id).statefulset
        sts = await c.apps.read_namespaced_stateful_set(sts_name, NAMESPACE)
        assert sts.metadata.labels[LABEL_DEPLOYMENT] == settings.deployment
        assert sts.metadata.labels["bap-engine.product_id"] == product_id
        assert [o.engine_id for o in await backend.list_managed()] == [engine_id]

        # The engine answers at the URL and key it was admitted with.
        status, events = await execute(url, key, "hello from the cluster")
        assert status == 200, status
        assert events and events[-1]["event"] == "done", events

        # Replica 0 admits the same user to the same engine.
        r = await http.post(f"{r0}/engines/{user}/admit", headers=headers, json={"auto_provision": True})
        assert r.status_code == 200, r.text
        assert r.json()["admitted"] is True and r.json()["engine"]["engine_id"] == engine_id, r.json()
        assert r.json()["engine"]["url"] == url

        # Destroyed through replica 1: the StatefulSet and everything it owned are gone.
        r = await http.delete(f"{r1}/engines/{user}", headers=headers)
        assert r.status_code == 200, r.text
        assert r.json() == {"status": "destroyed", "engine_id": engine_id}, r.json()
        with pytest.raises(ApiException) as gone:
            await c.apps.read_namespaced_stateful_set(sts_name, NAMESPACE)
        assert gone.value.status == 404
        await _nothing_left(c, settings)
        r = await http.get(f"{r0}/engines/{user}", headers=headers)
        assert r.status_code == 404, r.text


async def _nothing_left(c: Cluster, settings: Settings) -> None:
    """The engine's Service, Secret, pod and PVC are gone (the PVC after its pvc-protection finalizer)."""
    selector = f"{LABEL_DEPLOYMENT}={settings.deployment}"
    left: dict[str, list[str]] = {}

    async def nothing_left() -> bool:
        for kind in ("secret", "persistent_volume_claim", "service", "pod"):
            items = await getattr(c.core, f"list_namespaced_{kind}")(NAMESPACE, label_selector=selector)
            left[kind] = [i.metadata.name for i in items.items]
            if kind in ("secret", "service"):
                assert left[kind] == [], (kind, left[kind])  # no finalizers: gone when destroy returns
        return not any(left.values())

    try:
        await wait_until(nothing_left, 30, interval=0.25)
    except AssertionError as exc:
        raise AssertionError(f"engine objects left after destroy: {left}") from exc
