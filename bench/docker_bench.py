"""Docker benchmark (issue 4 item 5): provision p50 next to `docker run` of the same image until
/health answers, and wake (unpause) p50. Only when `docker info` works, the engine image
exists and the docker backend imports; otherwise one "docker: skipped (...)" line.

Engines run under dockerd (not pinned by us), for the orchestrator and the bare runs alike;
the orchestrator and its Postgres are on CPU 0, this driver on CPU 1. Everything is labelled
with this run's id and removed at the end (through the API, then by label as a safety net).

    python bench/docker_bench.py WORKDIR
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import secrets
import subprocess
import time
from pathlib import Path

import httpx

from common import Orchestrator, PortPicker, Table, log, main_entry, median, ms, pct, skipped, wait_healthy
from wake import measure

IMAGE = "bap-engine/refengine:0.1.0"
TITLE = "Docker backend (orchestrator + Postgres on CPU 0; engines under dockerd)"
ROUNDS = 8
WAKE_ROUNDS = 8
BOOT_TIMEOUT_S = 60


def _docker_ok() -> str | None:
    """None when usable, else why not."""
    try:
        info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                              timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"docker info failed: {err}"
    if info.returncode != 0:
        return f"docker info failed: {info.stderr.strip()[:120]}"
    img = subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True, text=True, timeout=20,
                         check=False)
    if img.returncode != 0:
        return f"image {IMAGE} not found; build it with scripts/build-images.sh"
    try:
        from bap_engine.backends.docker import DockerBackend  # noqa: F401
    except Exception as err:  # the backend is optional until it lands
        return f"docker backend not importable: {type(err).__name__}: {err}"
    return None


def _bare_cli(run_id: str, i: int, port: int) -> None:
    """`docker run -d` with what the backend gives a container: volume at /data, loopback port, init."""
    key_hash = hashlib.sha256(secrets.token_bytes(32)).hexdigest()
    name = f"bap-bench-{run_id}-cli-{i}"
    subprocess.run(["docker", "run", "-d", "--name", name, "--label", f"bap-bench={run_id}", "--init",
                    "--restart", "unless-stopped", "-v", f"{name}:/data", "-p", f"127.0.0.1:{port}:8000",
                    "-e", f"ENGINE_KEY_HASH={key_hash}", "-e", "SQLITE_DB_PATH=/data/brain.sqlite", IMAGE],
                   capture_output=True, text=True, timeout=60, check=True)


def _bare_sdk(client: object, run_id: str, i: int, port: int) -> None:
    """The same through the docker SDK (what the backend uses): volume, create, start."""
    key_hash = hashlib.sha256(secrets.token_bytes(32)).hexdigest()
    name = f"bap-bench-{run_id}-sdk-{i}"
    api = client.api  # type: ignore[attr-defined]
    api.create_volume(name=name, labels={"bap-bench": run_id})
    container = client.containers.create(  # type: ignore[attr-defined]
        IMAGE, name=name, labels={"bap-bench": run_id}, detach=True, init=True,
        environment={"ENGINE_KEY_HASH": key_hash, "SQLITE_DB_PATH": "/data/brain.sqlite", "PORT": "8000"},
        ports={"8000/tcp": ("127.0.0.1", port)}, volumes={name: {"bind": "/data", "mode": "rw"}},
        restart_policy={"Name": "unless-stopped"})
    api.start(container.id)


def _cleanup(run_id: str, deployment: str) -> int:
    """Remove our bare containers/volumes and anything left with our deployment label."""
    import docker

    client = docker.from_env(timeout=60)
    n = 0
    for label in (f"bap-bench={run_id}", f"bap-engine.deployment={deployment}"):
        for c in client.containers.list(all=True, filters={"label": label}):
            with contextlib.suppress(Exception):
                c.remove(force=True)
                n += 1
        for v in client.volumes.list(filters={"label": label}):
            with contextlib.suppress(Exception):
                v.remove(force=True)
    for v in client.volumes.list(filters={"name": f"bap-bench-{run_id}-"}):
        with contextlib.suppress(Exception):
            v.remove(force=True)
    client.close()
    return n


async def _provision_series(o: Orchestrator, run_id: str, t: Table) -> None:
    import docker

    client = docker.from_env(timeout=60)
    ports = PortPicker(31800, 31899)
    orch: list[float] = []
    cli: list[float] = []
    sdk: list[float] = []
    async with httpx.AsyncClient(timeout=BOOT_TIMEOUT_S + 30) as c:
        key = await o.register(c, "bench-docker")
        for i in range(ROUNDS):
            user = f"docker-{i}"
            o.track(key, user)
            t0 = time.perf_counter()
            r = await c.post(f"{o.base}/engines/provision", json={"user_id": user}, headers={"X-Platform-Key": key})
            if r.status_code != 200:
                raise RuntimeError(f"provision {user}: HTTP {r.status_code} {r.text[:200]}")
            orch.append(time.perf_counter() - t0)
            for series, start in ((cli, functools.partial(_bare_cli, run_id, i)),
                                  (sdk, functools.partial(_bare_sdk, client, run_id, i))):
                port = ports.take()
                t0 = time.perf_counter()
                await asyncio.to_thread(start, port)
                if not await wait_healthy(f"http://127.0.0.1:{port}", BOOT_TIMEOUT_S):
                    raise RuntimeError(f"bare container {i} not healthy within {BOOT_TIMEOUT_S}s")
                series.append(time.perf_counter() - t0)
        await o.destroy_all(c, key)
    client.close()
    over = median(orch) - median(cli)
    t.add(f"provision p50 / p90 ({ROUNDS} users, one at a time)", f"{ms(median(orch))} / {ms(pct(orch, 90))}")
    t.add("docker run (CLI) -> /health p50 / p90", f"{ms(median(cli))} / {ms(pct(cli, 90))}", "the limit")
    t.add("provision overhead over docker run (p50)", ms(over), "<= 100 ms", over <= 0.100)
    t.add("docker SDK volume+create+start -> /health p50", ms(median(sdk)), "(what the backend calls)")
    t.add("provision overhead over the SDK start (p50)", ms(median(orch) - median(sdk)))


async def main(workdir: Path) -> int:
    why = await asyncio.to_thread(_docker_ok)
    if why is not None:
        skipped(TITLE, "docker", why)
        return 0
    run_id = secrets.token_hex(3)
    deployment = f"bench-{run_id}"
    t = Table(TITLE)
    env = {"ORCH_ENGINE_BACKEND": "docker", "ORCH_ENGINE_IMAGE": IMAGE, "ORCH_DEPLOYMENT": deployment,
           "ORCH_BOOT_TIMEOUT_S": str(BOOT_TIMEOUT_S)}
    rc = 0
    prov = Orchestrator("docker", workdir, env={**env, "ORCH_PORT_MIN": "31100", "ORCH_PORT_MAX": "31299"})
    wake = Orchestrator("docker-wake", workdir, env={
        **env, "ORCH_PORT_MIN": "31300", "ORCH_PORT_MAX": "31399", "ORCH_IDLE_SLEEP_AFTER_S": "1",
        "ORCH_HEALTH_CHECK_INTERVAL_S": "0.5", "ORCH_ACTIVITY_FLUSH_S": "0.25", "ORCH_SLEEP_MODE": "pause"})
    try:
        await prov.start()
        await _provision_series(prov, run_id, t)
        prov.stop()
        await wake.start()
        await measure("docker wake", wake, WAKE_ROUNDS, t, 0.150, BOOT_TIMEOUT_S)
        t.note("docker: provision timed by the client (POST /engines/provision), interleaved with one `docker run -d` "
               "(same image, named volume at /data, 127.0.0.1 port, --init, restart unless-stopped) and one SDK "
               "start per round, each polled with the orchestrator's probe and cadence; wake = docker unpause "
               "(ORCH_SLEEP_MODE=pause, ORCH_IDLE_SLEEP_AFTER_S=1)")
    except Exception as err:
        t.note(f"ERROR: {type(err).__name__}: {err}")
        rc = 1
    finally:
        for o in (prov, wake):
            if o.proc is not None and o.proc.poll() is None:
                async with httpx.AsyncClient(timeout=90) as c:
                    await o.destroy_all(c)
            o.stop()
        left = await asyncio.to_thread(_cleanup, run_id, deployment)
        if left:
            log(f"docker: removed {left} bare or leftover container(s) by label")
        t.print()
    return rc


if __name__ == "__main__":
    main_entry(main)
