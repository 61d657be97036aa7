"""Kubernetes benchmark (issue 5 item 5), on the test cluster of scripts/k8s-test-cluster.sh:
provision p50 and wake (scale 0 -> 1) p50, next to a bare pod of the same image reaching Ready.

Only when `scripts/k8s-test-cluster.sh env` gives a kubeconfig whose API server answers and
the kubernetes backend imports; otherwise one "kubernetes: skipped (...)" line. Engines are
reached through hostPort on 127.0.0.1 (ORCH_K8S_URL_MODE=hostport: single-node cluster
reached from outside). The bare pod has the engine's container, env, port and readiness
probe (period 2 s, as the backend sets it) with an emptyDir at /data; its time is from the
create call until the API reports the pod Ready (polled every 100 ms). Everything is labelled
with this run's id and deleted at the end.

    python bench/k8s_bench.py WORKDIR
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import subprocess
import time
from pathlib import Path

import httpx

from common import ROOT, Orchestrator, PortPicker, Table, log, main_entry, median, ms, skipped, wait_healthy
from wake import measure

IMAGE = "bap-engine/refengine:0.1.0"
NAMESPACE = "bap-engines"
STORAGE_CLASS = "bap-local"
TITLE = "Kubernetes backend (test cluster; orchestrator + Postgres on CPU 0)"
ROUNDS = 3
WAKE_ROUNDS = 3
BOOT_TIMEOUT_S = 120


def _kubeconfig() -> tuple[str | None, str]:
    """(kubeconfig path, "") when usable, else (None, why not)."""
    script = ROOT / "scripts" / "k8s-test-cluster.sh"
    try:
        out = subprocess.run(["bash", str(script), "env"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"scripts/k8s-test-cluster.sh env failed: {err}"
    if out.returncode != 0:
        return None, "test cluster not up (scripts/k8s-test-cluster.sh up)"
    path = next((line.split("=", 1)[1].strip() for line in out.stdout.splitlines()
                 if line.startswith("export KUBECONFIG=")), "")
    if not path or not Path(path).exists():
        return None, "scripts/k8s-test-cluster.sh env printed no kubeconfig"
    try:
        ready = subprocess.run(["kubectl", "--kubeconfig", path, "--request-timeout=10s", "get", "--raw", "/readyz"],
                               capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"API server check failed: {err}"
    if ready.returncode != 0:
        return None, f"API server not ready: {ready.stderr.strip()[:120]}"
    try:
        from bap_engine.backends.kubernetes import KubernetesBackend  # noqa: F401
    except Exception as err:
        return None, f"kubernetes backend not importable: {type(err).__name__}: {err}"
    return path, ""


def _pod(name: str, run_id: str, host_port: int) -> dict[str, object]:
    key_hash = hashlib.sha256(secrets.token_bytes(32)).hexdigest()
    probe = {"httpGet": {"path": "/health", "port": 8000}, "timeoutSeconds": 2}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"bap-bench": run_id}},
        "spec": {
            "containers": [{
                "name": "engine", "image": IMAGE, "imagePullPolicy": "IfNotPresent",
                "env": [{"name": "ENGINE_KEY_HASH", "value": key_hash}, {"name": "PORT", "value": "8000"},
                        {"name": "HOST", "value": "0.0.0.0"},
                        {"name": "SQLITE_DB_PATH", "value": "/data/brain.sqlite"}],
                "ports": [{"name": "http", "containerPort": 8000, "protocol": "TCP", "hostPort": host_port,
                           "hostIP": "127.0.0.1"}],
                "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                "readinessProbe": {**probe, "periodSeconds": 2, "failureThreshold": 2},
            }],
            "volumes": [{"name": "data", "emptyDir": {}}],
            "automountServiceAccountToken": False, "enableServiceLinks": False, "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 5,
        },
    }


async def _bare_pods(kubeconfig: str, run_id: str, rounds: int) -> tuple[list[float], list[float]]:
    """Per pod: (create -> /health answers through its hostPort, create -> Ready)."""
    from kubernetes_asyncio import client, config

    await config.load_kube_config(config_file=kubeconfig)
    healthy: list[float] = []
    ready: list[float] = []
    ports = PortPicker(31900, 31999)
    async with client.ApiClient() as api:
        core = client.CoreV1Api(api)
        try:
            for i in range(rounds):
                name = f"bap-bench-{run_id}-{i}"
                port = ports.take()
                t0 = time.perf_counter()
                await core.create_namespaced_pod(NAMESPACE, _pod(name, run_id, port))

                async def health(t0: float = t0, port: int = port) -> None:
                    if await wait_healthy(f"http://127.0.0.1:{port}", BOOT_TIMEOUT_S):
                        healthy.append(time.perf_counter() - t0)

                probe = asyncio.create_task(health())
                deadline = time.monotonic() + BOOT_TIMEOUT_S
                while True:
                    pod = await core.read_namespaced_pod(name, NAMESPACE)
                    conds = pod.status.conditions or []
                    if any(c.type == "Ready" and c.status == "True" for c in conds):
                        ready.append(time.perf_counter() - t0)
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"bare pod {name} not Ready within {BOOT_TIMEOUT_S}s")
                    await asyncio.sleep(0.1)
                await probe
                await core.delete_namespaced_pod(name, NAMESPACE, grace_period_seconds=0)
        finally:
            with contextlib.suppress(Exception):
                await core.delete_collection_namespaced_pod(NAMESPACE, label_selector=f"bap-bench={run_id}",
                                                            grace_period_seconds=0)
    return healthy, ready


async def _provision(o: Orchestrator, t: Table) -> list[float]:
    times: list[float] = []
    async with httpx.AsyncClient(timeout=BOOT_TIMEOUT_S + 30) as c:
        key = await o.register(c, "bench-k8s")
        for i in range(ROUNDS):
            user = f"k8s-{i}"
            o.track(key, user)
            t0 = time.perf_counter()
            r = await c.post(f"{o.base}/engines/provision", json={"user_id": user}, headers={"X-Platform-Key": key})
            if r.status_code != 200:
                raise RuntimeError(f"provision {user}: HTTP {r.status_code} {r.text[:200]}")
            times.append(time.perf_counter() - t0)
        await o.destroy_all(c, key)
    return times


async def main(workdir: Path) -> int:
    kubeconfig, why = await asyncio.to_thread(_kubeconfig)
    if kubeconfig is None:
        skipped(TITLE, "kubernetes", why)
        return 0
    run_id = secrets.token_hex(3)
    deployment = f"bench-{run_id}"
    t = Table(TITLE)
    env = {"ORCH_ENGINE_BACKEND": "kubernetes", "ORCH_ENGINE_IMAGE": IMAGE, "ORCH_DEPLOYMENT": deployment,
           "ORCH_KUBECONFIG": kubeconfig, "ORCH_K8S_URL_MODE": "hostport", "ORCH_K8S_NAMESPACE": NAMESPACE,
           "ORCH_K8S_STORAGE_CLASS": STORAGE_CLASS, "ORCH_BOOT_TIMEOUT_S": str(BOOT_TIMEOUT_S)}
    prov = Orchestrator("k8s", workdir, env={**env, "ORCH_PORT_MIN": "31400", "ORCH_PORT_MAX": "31599"})
    wake = Orchestrator("k8s-wake", workdir, env={
        **env, "ORCH_PORT_MIN": "31600", "ORCH_PORT_MAX": "31699", "ORCH_IDLE_SLEEP_AFTER_S": "1",
        "ORCH_HEALTH_CHECK_INTERVAL_S": "0.5", "ORCH_ACTIVITY_FLUSH_S": "0.25", "ORCH_SLEEP_MODE": "pause"})
    rc = 0
    try:
        await prov.start()
        orch = await _provision(prov, t)
        prov.stop()
        healthy, ready = await _bare_pods(kubeconfig, run_id, ROUNDS)
        t.add(f"provision p50 / max ({ROUNDS} users, one at a time)", f"{ms(median(orch))} / {ms(max(orch))}")
        t.add("bare pod, same image -> Ready p50 / max", f"{ms(median(ready))} / {ms(max(ready))}", "the limit")
        t.add("provision p50 minus bare pod Ready p50", ms(median(orch) - median(ready)))
        t.add("bare pod -> /health answers (hostPort) p50", ms(median(healthy)),
              "what provision waits for")
        t.add("provision p50 minus bare pod /health p50", ms(median(orch) - median(healthy)))
        await wake.start()
        await measure("k8s wake", wake, WAKE_ROUNDS, t, None, BOOT_TIMEOUT_S)
        t.note("kubernetes: provision = POST /engines/provision (StatefulSet + PVC + Service + Secret, waits for "
               "/health through the hostPort); bare pod: same container, hostPort on 127.0.0.1, emptyDir instead of "
               "a PVC, timed to /health (orchestrator's probe and cadence) and to Ready (kubelet readiness probe, "
               "period 2 s, polled every 100 ms); wake = scale 0 -> 1 (ORCH_SLEEP_MODE=pause, "
               f"ORCH_IDLE_SLEEP_AFTER_S=1); with {WAKE_ROUNDS} wakes their p99 is their max")
    except Exception as err:
        t.note(f"ERROR: {type(err).__name__}: {err}")
        rc = 1
    finally:
        for o in (prov, wake):
            if o.proc is not None and o.proc.poll() is None:
                async with httpx.AsyncClient(timeout=BOOT_TIMEOUT_S + 30) as c:
                    await o.destroy_all(c)
            o.stop()
        # what the API destroy left behind (cascading deletion is asynchronous: wait up to 60 s)
        selector = f"bap-engine.deployment={deployment}"
        deadline = time.monotonic() + 60
        remaining: list[str] = []
        while time.monotonic() < deadline:
            got = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "-n", NAMESPACE, "get",
                                  "statefulset,service,secret,pvc,pod", "-l", selector, "-o", "name"],
                                 capture_output=True, text=True, timeout=30, check=False)
            remaining = got.stdout.split()
            if got.returncode == 0 and not remaining:
                break
            await asyncio.sleep(2)
        if remaining:
            t.note(f"kubernetes: 60 s after every DELETE /engines/{{u}} answered, objects of this run were still "
                   f"there: {', '.join(remaining)} (deleted now)")
        # safety net: whatever of this run's deployment the API did not remove
        left = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "-n", NAMESPACE, "delete",
                               "statefulset,service,secret,pvc,pod", "-l", f"bap-engine.deployment={deployment}",
                               "--wait=false", "--ignore-not-found"],
                              capture_output=True, text=True, timeout=60, check=False)
        if left.stdout.strip():
            log(f"kubernetes: deleted leftovers of {deployment}: {left.stdout.strip().splitlines()}")
        t.print()
    return rc


if __name__ == "__main__":
    main_entry(main)
