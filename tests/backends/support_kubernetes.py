"""Contract-suite support for the Kubernetes backend.

Needs a reachable cluster: $KUBECONFIG, else the kubeconfig that `scripts/k8s-test-cluster.sh up`
leaves in its state dir ($BAP_K8S_STATE, default /tmp/bap-k8s). Without one the tests skip,
unless BAP_REQUIRE_K8S=1 or "kubernetes" is in BAP_REQUIRE_BACKENDS (then they fail).

Engines are reached from the test process, so the URL mode defaults to `hostport` (the pod's
hostPort on 127.0.0.1 through dockershim; the test cluster has no kube-proxy, so `service` and
`nodeport` URLs do not route from outside). BAP_K8S_URL_MODE overrides it. Images are never
pulled (imagePullPolicy Never): the kubelet uses the local dockerd, where locally built
images already are. On exit, everything labelled with the test's deployment is deleted unless
BAP_KEEP_TEST_RESOURCES=1.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NoReturn, cast

import pytest

from bap_engine.backends.base import LABEL_DEPLOYMENT, BackendError, EngineBackend, Placement
from bap_engine.backends.kubernetes import KubernetesBackend, KubernetesConfig
from bap_engine.backends.kubernetes.manifests import UrlMode, names_for

__all__ = ["kubeconfig_path", "kill_behind_back", "make_backend", "NAMESPACE"]

NAMESPACE = os.environ.get("BAP_K8S_NAMESPACE", "bap-engines")
_SKIP = "no Kubernetes test cluster; run scripts/k8s-test-cluster.sh up"


def _required() -> bool:
    wanted = {n.strip() for n in os.environ.get("BAP_REQUIRE_BACKENDS", "").split(",")}
    return os.environ.get("BAP_REQUIRE_K8S") == "1" or "kubernetes" in wanted


def _unavailable(reason: str) -> NoReturn:
    if _required():
        pytest.fail(f"{_SKIP} ({reason})")
    pytest.skip(f"{_SKIP} ({reason})")


def kubeconfig_path() -> Path | None:
    """$KUBECONFIG (first entry) if it exists, else the test cluster script's state file."""
    env = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
    if env and Path(env).is_file():
        return Path(env)
    state = Path(os.environ.get("BAP_K8S_STATE", "/tmp/bap-k8s")) / "kubeconfig"
    return state if state.is_file() else None


async def _remove_deployment(backend: KubernetesBackend, deployment: str) -> None:
    """Destroy every engine of the deployment, then anything else still carrying its label."""
    for observed in await backend.list_managed():
        await backend.destroy(observed.engine_id)
    core: Any = await backend._api.core()  # test-only reach into the adapter's client
    selector = f"{LABEL_DEPLOYMENT}={deployment}"
    for kind in ("secret", "persistent_volume_claim", "service", "pod"):
        items = await getattr(core, f"list_namespaced_{kind}")(NAMESPACE, label_selector=selector)
        for item in items.items:
            await backend._delete(kind, item.metadata.name)


@asynccontextmanager
async def make_backend(workdir: Path, deployment: str) -> AsyncIterator[KubernetesBackend]:
    """A KubernetesBackend for `deployment` on the test cluster; removes its objects on exit."""
    del workdir  # the cluster is the runtime; nothing lives in the test's directory
    path = kubeconfig_path()
    if path is None:
        state = os.environ.get("BAP_K8S_STATE", "/tmp/bap-k8s")
        _unavailable(f"no KUBECONFIG and no {state}/kubeconfig")
    url_mode = os.environ.get("BAP_K8S_URL_MODE", "hostport")
    if url_mode not in ("service", "hostport", "nodeport"):
        pytest.fail(f"BAP_K8S_URL_MODE={url_mode!r} is not service, hostport or nodeport")
    config = KubernetesConfig(
        namespace=NAMESPACE,
        deployment=deployment,
        kubeconfig=str(path),
        url_mode=cast(UrlMode, url_mode),
        image_pull_policy=os.environ.get("BAP_K8S_IMAGE_PULL_POLICY", "Never"),
        storage_class=os.environ.get("BAP_K8S_STORAGE_CLASS") or None,
    )
    backend = KubernetesBackend(config)
    try:
        await backend.ping()
    except BackendError as exc:
        await backend.close()
        _unavailable(exc.message)
    try:
        yield backend
    finally:
        try:
            if os.environ.get("BAP_KEEP_TEST_RESOURCES") != "1":
                await _remove_deployment(backend, deployment)
        finally:
            await backend.close()


async def kill_behind_back(backend: EngineBackend, placement: Placement) -> None:
    """Take the engine down without telling the backend: delete its pod, as an eviction or a
    node failure would. The StatefulSet recreates the pod by itself; inspect reports EXITED
    while the old pod terminates, then RUNNING again once the new one is up."""
    assert isinstance(backend, KubernetesBackend)
    await backend.settle(placement.engine_id)  # never delete a pod the kubelet is still starting
    await backend._delete("pod", names_for(placement.engine_id).pod)
