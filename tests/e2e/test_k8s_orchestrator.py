"""The orchestrator image, deployed in the test cluster as two replicas, admits through both.

Needs the Kubernetes test cluster (`scripts/k8s-test-cluster.sh up`) and the locally built
orchestrator image (`scripts/build-images.sh`, `bap-engine/orchestrator:0.1.0`, or
$BAP_K8S_ORCHESTRATOR_IMAGE) in the node's dockerd. Without either it skips; with
BAP_REQUIRE_K8S=1 (or "kubernetes" in BAP_REQUIRE_BACKENDS) it fails instead.

The pods are built from deploy/kubernetes/ (the Deployment's pod template, the Role's rules, the
Secret's keys), adapted to a cluster with no DNS and no kube-proxy (see deploy/README-kubernetes.md,
"Testing the orchestrator image in the test cluster"):
- `hostNetwork: true`, so the pods reach what listens on the node's loopback: the apiserver
  (in-cluster config with KUBERNETES_SERVICE_HOST/PORT pointed at 127.0.0.1:16443), the test
  Postgres (its unix-socket directory is mounted at the same path, or its 127.0.0.1 TCP port) and
  the engines' hostPorts (`ORCH_K8S_URL_MODE=hostport`).
- Both replicas share the node's network, so they need different ports: a StatefulSet of 2 (not a
  Deployment), each pod listening on 127.0.0.1 on the port picked for its ordinal. The HTTP probes
  and the container port go (a port per replica cannot be templated; with hostNetwork a
  containerPort is also a hostPort, and two would collide); the test polls /health itself.
- The ServiceAccount gets exactly the Role of deploy/kubernetes/rbac.yaml, in the engines'
  namespace: the replicas run with the permissions the manifests grant, not as admin.

Everything lives in a fresh namespace `bap-orch-<hex>`, plus a Role/RoleBinding of the same name in
the engines' namespace; all of it, and anything labelled with the test's deployment, is removed at
the end (unless BAP_KEEP_TEST_RESOURCES=1).
"""

from __future__ import annotations

import asyncio
import copy
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
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
TEST_LABEL = "bap-engine.test"
_BROKEN = IMAGE_ERRORS | {"CrashLoopBackOff", "CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
KEEP = os.environ.get("BAP_KEEP_TEST_RESOURCES") == "1"


def _manifest(name: str, kind: str) -> dict[str, Any]:
    for doc in yaml.safe_load_all((MANIFESTS / name).read_text()):
        if doc and doc.get("kind") == kind:
            return dict(doc)
    raise AssertionError(f"no {kind} in deploy/kubernetes/{name}")


ORCH_IMAGE = os.environ.get(
    "BAP_K8S_ORCHESTRATOR_IMAGE",
    _manifest("deployment.yaml", "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"],
)


async def _image_on_node(core: Any, image: str) -> bool:
    """Whether the node's runtime has `image`: asked from the local dockerd the kubelet uses,
    else from the node status (which lists at most 50 images)."""
    def from_docker() -> bool | None:
        try:
            import docker

            api = docker.from_env(timeout=10)
        except Exception:
            return None
        try:
            api.images.get(image)
            return True
        except docker.errors.ImageNotFound:
            return False
        except Exception:
            return None
        finally:
            api.close()

    found = await asyncio.to_thread(from_docker)
    if found is not None:
        return found
    nodes = await core.list_node()
    return any(image in (img.names or []) for node in nodes.items for img in (node.status.images or []))


def _socket_dir(dsn: str) -> str | None:
    """The unix-socket directory of a libpq DSN (host=/dir, or a %2F-encoded host), if any."""
    parts = urlsplit(dsn)
    hosts = parse_qs(parts.query).get("host", [])
    host = hosts[0] if hosts else unquote(parts.hostname or "")
    return host if host.startswith("/") else None


@dataclass
class Replica:
    ordinal: int
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _statefulset(ns: str, settings: Settings, replicas: list[Replica], dsn: str) -> dict[str, Any]:
    """deploy/kubernetes/deployment.yaml's pod template as a StatefulSet of 2 on the host network."""
    deployment = _manifest("deployment.yaml", "Deployment")
    api_server = urlsplit(_api_server())
    template = copy.deepcopy(deployment["spec"]["template"])
    labels = {**template["metadata"]["labels"], TEST_LABEL: ns}
    template["metadata"]["labels"] = labels
    pod = template["spec"]
    pod.update(hostNetwork=True, dnsPolicy="ClusterFirstWithHostNet", terminationGracePeriodSeconds=15)
    (container,) = pod["containers"]
    assert container["envFrom"] == [{"secretRef": {"name": "bap-orchestrator"}}], container["envFrom"]
    container["image"] = ORCH_IMAGE
    container["imagePullPolicy"] = "Never"
    for key in ("ports", "readinessProbe", "livenessProbe"):
        container.pop(key, None)
    overrides = {
        "ORCH_HOST": "127.0.0.1",
        "ORCH_K8S_URL_MODE": "hostport",  # no kube-proxy: engines are reached on their hostPort
        "ORCH_K8S_NAMESPACE": NAMESPACE,
        "ORCH_ENGINE_IMAGE": DEFAULT_IMAGE,
        "ORCH_DEPLOYMENT": settings.deployment,
        "ORCH_PORT_MIN": str(settings.port_min),
        "ORCH_PORT_MAX": str(settings.port_max),
        # In-cluster config (the ServiceAccount's token and CA), with the apiserver where the node
        # reaches it (127.0.0.1:16443) instead of the `kubernetes` Service's ClusterIP, which
        # nothing routes here.
        "KUBERNETES_SERVICE_HOST": str(api_server.hostname),
        "KUBERNETES_SERVICE_PORT": str(api_server.port or 443),
        **{f"BAP_PORT_{r.ordinal}": str(r.port) for r in replicas},
    }
    env = [e for e in container["env"] if e["name"] not in overrides and e["name"] != "ORCH_PORT"]
    env += [{"name": k, "value": v} for k, v in overrides.items()]
    env.append({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
    container["env"] = env
    container["command"] = [
        "sh", "-c", 'eval "port=\\$BAP_PORT_${POD_NAME##*-}"; exec bap-engine serve --port "$port"',
    ]
    container["resources"] = {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}}
    socket_dir = _socket_dir(dsn)
    if socket_dir is not None:
        pod["volumes"].append({"name": "pg-socket", "hostPath": {"path": socket_dir, "type": "Directory"}})
        container["volumeMounts"].append({"name": "pg-socket", "mountPath": socket_dir, "readOnly": True})
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": deployment["metadata"]["name"], "namespace": ns, "labels": labels},
        "spec": {
            "replicas": len(replicas),
            "serviceName": deployment["metadata"]["name"],
            "podManagementPolicy": "Parallel",
            "selector": copy.deepcopy(deployment["spec"]["selector"]),
            "template": template,
        },
    }


def _api_server() -> str:
    path = kubeconfig_path()
    assert path is not None
    doc = yaml.safe_load(path.read_text())
    current = next(c for c in doc["contexts"] if c["name"] == doc["current-context"])
    cluster = next(c for c in doc["clusters"] if c["name"] == current["context"]["cluster"])
    return str(cluster["cluster"]["server"])


class Cluster:
    """Admin clients on the test cluster, and what this test created there."""

    def __init__(self, api: Any, ns: str) -> None:
        self.api = api
        self.ns = ns
        self.replicas: list[Replica] = []
        for ordinal in range(2):  # the orchestrators' ports on the node's loopback
            port = free_port()
            while any(r.port == port for r in self.replicas):
                port = free_port()
            self.replicas.append(Replica(ordinal, port))
        self.core: Any = k8s.CoreV1Api(api)  # Any: the bodies below are plain dicts
        self.apps: Any = k8s.AppsV1Api(api)
        self.rbac: Any = k8s.RbacAuthorizationV1Api(api)

    async def setup(self, settings: Settings, dsn: str) -> None:
        labels = {TEST_LABEL: self.ns}
        await self.core.create_namespace({"metadata": {"name": self.ns, "labels": labels}})
        sa = _manifest("rbac.yaml", "ServiceAccount")
        sa["metadata"]["namespace"] = self.ns
        await self.core.create_namespaced_service_account(self.ns, sa)
        role = _manifest("rbac.yaml", "Role")
        await self.rbac.create_namespaced_role(NAMESPACE, {
            "metadata": {"name": self.ns, "labels": labels}, "rules": role["rules"]})
        binding = _manifest("rbac.yaml", "RoleBinding")
        await self.rbac.create_namespaced_role_binding(NAMESPACE, {
            "metadata": {"name": self.ns, "labels": labels},
            "roleRef": {**binding["roleRef"], "name": self.ns},
            "subjects": [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": self.ns}],
        })
        secret = _manifest("secret.example.yaml", "Secret")
        values = {"ORCH_MASTER_KEY": settings.master_key, "ORCH_ADMIN_KEY": ADMIN_KEY, "ORCH_DATABASE_URL": dsn}
        assert set(secret["stringData"]) == set(values), secret["stringData"]
        await self.core.create_namespaced_secret(self.ns, {
            "metadata": {"name": secret["metadata"]["name"], "labels": labels}, "stringData": values})

        async def token_ready() -> bool:  # the ServiceAccount admission plugin needs the token secret
            account = await self.core.read_namespaced_service_account(sa["metadata"]["name"], self.ns)
            return bool(account.secrets)

        await wait_until(token_ready, 30, interval=0.2)
        await self.apps.create_namespaced_stateful_set(self.ns, _statefulset(self.ns, settings, self.replicas, dsn))

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
            try:  # orphan the pods, then delete them ourselves: one deletion each, with their grace
                await self.apps.delete_namespaced_stateful_set("bap-orchestrator", self.ns,
                                                               propagation_policy="Orphan")
            except ApiException as exc:
                if exc.status != 404:
                    raise
            for pod in await self.pods():
                await self._delete_pod(pod.metadata.name)
            ports = {f"bap-orchestrator-{r.ordinal}": r.port for r in self.replicas}

            async def all_gone() -> bool:
                pods = await self.pods()
                for pod in pods:
                    # A 1.20 kubelet may keep a terminating pod's object for a long while after its
                    # container died (waiting "ContainerCreating", last state ContainerStatusUnknown).
                    # Once the container is dead and its port closed, drop the object ourselves.
                    port = ports.get(pod.metadata.name)
                    if _dead(pod) and (port is None or not await _listening(port)):
                        # (in the body: with a body, the apiserver ignores the query parameters)
                        await self._delete_pod(pod.metadata.name, body={
                            "gracePeriodSeconds": 0, "preconditions": {"uid": pod.metadata.uid}})
                return not pods

            await wait_until(all_gone, 60, interval=0.5)
        finally:
            for delete in (self.rbac.delete_namespaced_role_binding, self.rbac.delete_namespaced_role):
                await _ignore_404(delete(self.ns, NAMESPACE))
            await _ignore_404(self.core.delete_namespace(self.ns))

    async def _delete_pod(self, name: str, **options: Any) -> None:
        try:
            await self.core.delete_namespaced_pod(name, self.ns, **options)
        except ApiException as exc:
            if exc.status not in (404, 409):  # gone already, or a newer pod (UID precondition)
                raise


async def _ignore_404(call: Any) -> None:
    try:
        await call
    except ApiException as exc:
        if exc.status != 404:
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


async def _listening(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
    except (OSError, TimeoutError):
        return False
    writer.close()
    await writer.wait_closed()
    return True


@pytest.fixture
async def cluster(settings: Settings, tmp_path: Path) -> AsyncIterator[tuple[Cluster, KubernetesBackend]]:
    """The test cluster (skip/fail as the backend suite does), with the orchestrator image on its node.
    Yields admin clients and an engine backend for `settings.deployment`, which removes every engine
    of that deployment at the end."""
    async with make_backend(tmp_path, settings.deployment) as backend:
        path = kubeconfig_path()
        assert path is not None
        api_config = k8s.Configuration()
        await k8s_config.load_kube_config(config_file=str(path), client_configuration=api_config)
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
    cluster: tuple[Cluster, KubernetesBackend], settings: Settings, pg_dsn: str
) -> None:
    c, backend = cluster
    await c.setup(settings, pg_dsn)
    try:
        await _scenario(c, backend, settings, c.replicas)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{await c.diagnostics()}") from exc


async def _scenario(
    c: Cluster, backend: KubernetesBackend, settings: Settings, replicas: list[Replica]
) -> None:
    r0, r1 = replicas
    async with httpx.AsyncClient(timeout=90) as http:
        async def healthy(replica: Replica) -> bool:
            try:
                return (await http.get(f"{replica.url}/health", timeout=2)).status_code == 200
            except httpx.TransportError:
                return False

        async def both_healthy() -> bool:
            for pod in await c.pods():  # an orchestrator that cannot start fails the test at once
                for cs in pod.status.container_statuses or []:
                    waiting = cs.state.waiting.reason if cs.state.waiting is not None else None
                    if cs.restart_count or cs.state.terminated is not None or waiting in _BROKEN:
                        raise AssertionError(f"orchestrator pod {pod.metadata.name} does not start "
                                             f"({waiting or 'exited'}, {cs.restart_count} restarts)")
            return all(await asyncio.gather(*(healthy(r) for r in replicas)))

        await wait_until(both_healthy, 90, interval=0.5)
        pods = {p.metadata.name: p for p in await c.pods()}
        assert sorted(pods) == ["bap-orchestrator-0", "bap-orchestrator-1"], sorted(pods)
        assert all(p.spec.service_account_name == "bap-orchestrator" for p in pods.values())

        # A product registered through replica 0 ...
        r = await http.post(f"{r0.url}/products/register", headers={"X-Admin-Key": ADMIN_KEY},
                            json={"slug": f"k8s-{uuid.uuid4().hex[:10]}", "display_name": "K8s orchestrator"})
        assert r.status_code == 200, r.text
        product_id, platform_key = r.json()["product_id"], r.json()["platform_api_key"]
        headers = {"X-Platform-Key": platform_key}
        user = "k8s-user-1"

        # ... admits a user through replica 1: the engine is provisioned in the engines' namespace.
        r = await http.post(f"{r1.url}/engines/{user}/admit", headers=headers, json={"auto_provision": True})
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
        r = await http.post(f"{r0.url}/engines/{user}/admit", headers=headers, json={"auto_provision": True})
        assert r.status_code == 200, r.text
        assert r.json()["admitted"] is True and r.json()["engine"]["engine_id"] == engine_id, r.json()
        assert r.json()["engine"]["url"] == url

        # Destroyed through replica 1: the StatefulSet and everything it owned are gone.
        r = await http.delete(f"{r1.url}/engines/{user}", headers=headers)
        assert r.status_code == 200, r.text
        assert r.json() == {"status": "destroyed", "engine_id": engine_id}, r.json()
        with pytest.raises(ApiException) as gone:
            await c.apps.read_namespaced_stateful_set(sts_name, NAMESPACE)
        assert gone.value.status == 404
        # The Service, Secret, pod and PVC are gone too. The PVC object may linger a moment: the
        # pvc-protection finalizer holds it until the controller-manager sees the pod gone.
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
        r = await http.get(f"{r0.url}/engines/{user}", headers=headers)
        assert r.status_code == 404, r.text
