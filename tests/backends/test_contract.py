"""The backend contract: one suite, run against every runtime (see conftest.py).

Runtime-agnostic: engines are reached only through Placement.url, crashes are caused by the
runtime's `support_<name>.kill_behind_back`, and nothing reads a backend's private state.
A few cases that only make sense for local processes skip on other runtimes via `backend.name`.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import sys
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bap_engine.backends.base import (
    LABEL_DEPLOYMENT,
    LABEL_ENGINE_ID,
    LABEL_PRODUCT_ID,
    BackendError,
    EngineAbsent,
    EngineBackend,
    ImageNotFound,
    ObservedState,
    PortInUse,
)
from tests.backends.helpers import (
    execute,
    free_port,
    health_ok,
    history,
    make_spec,
    support_for,
    wait_healthy,
    wait_until,
)

BOOT_S = float(os.environ.get("BAP_TEST_BOOT_TIMEOUT_S", "60"))
GONE = {ObservedState.EXITED, ObservedState.ABSENT}


async def _state(backend: EngineBackend, engine_id: str) -> ObservedState:
    return (await backend.inspect(engine_id)).state


async def _wait_state(backend: EngineBackend, engine_id: str, states: set[ObservedState]) -> None:
    async def reached() -> bool:
        return await _state(backend, engine_id) in states

    await wait_until(reached, BOOT_S, what=f"{engine_id} in {sorted(states)}")


async def test_full_lifecycle_keeps_data(backend: EngineBackend) -> None:
    new = make_spec(extra_labels={"bap-engine.test": "contract"})
    placement = await backend.create(new.spec)
    assert placement.engine_id == new.engine_id
    assert placement.url == backend.url_for(new.engine_id, new.spec.port)
    await wait_healthy(placement.url, BOOT_S)

    observed = await backend.inspect(new.engine_id)
    assert observed.state is ObservedState.RUNNING
    assert observed.ref == placement.ref
    assert observed.labels[LABEL_ENGINE_ID] == new.engine_id
    assert observed.labels[LABEL_PRODUCT_ID] == new.spec.product_id
    assert observed.labels[LABEL_DEPLOYMENT]  # stamped by the backend from its own config
    assert observed.labels["bap-engine.test"] == "contract"
    assert observed.created_at is not None and observed.created_at.utcoffset() is not None
    assert abs((datetime.now(UTC) - observed.created_at).total_seconds()) < 600

    status, events = await execute(placement.url, new.key, "remember the walrus")
    assert status == 200
    assert [e["event"] for e in events][-1] == "done"
    assert (await execute(placement.url, "not-the-key", "hi"))[0] == 401

    await backend.pause(new.engine_id)
    assert await _state(backend, new.engine_id) is ObservedState.PAUSED
    assert not await health_ok(placement.url, timeout=0.5)
    await backend.resume(new.engine_id)
    await wait_healthy(placement.url, BOOT_S)
    assert await _state(backend, new.engine_id) is ObservedState.RUNNING

    await backend.stop(new.engine_id, grace_s=10)
    assert await _state(backend, new.engine_id) is ObservedState.EXITED
    assert not await health_ok(placement.url, timeout=0.5)

    await backend.start(new.engine_id)
    await wait_healthy(placement.url, BOOT_S)
    assert await _state(backend, new.engine_id) is ObservedState.RUNNING
    contents = [m["content"] for m in await history(placement.url, new.key)]
    assert "remember the walrus" in contents

    await backend.destroy(new.engine_id)
    assert await _state(backend, new.engine_id) is ObservedState.ABSENT


async def test_absent_engine_is_idempotent(backend: EngineBackend) -> None:
    never = str(uuid.uuid4())
    assert await _state(backend, never) is ObservedState.ABSENT
    await backend.stop(never, grace_s=1)
    await backend.destroy(never)
    await backend.destroy(never)
    for action in (backend.start, backend.pause, backend.resume):
        with pytest.raises(EngineAbsent):
            await action(never)


async def test_double_destroy(backend: EngineBackend) -> None:
    new = make_spec()
    placement = await backend.create(new.spec)
    await wait_healthy(placement.url, BOOT_S)
    await backend.destroy(new.engine_id)
    await backend.destroy(new.engine_id)
    assert await _state(backend, new.engine_id) is ObservedState.ABSENT
    await backend.stop(new.engine_id, grace_s=1)  # stop of a destroyed engine is success too
    with pytest.raises(EngineAbsent):
        await backend.start(new.engine_id)


async def test_stop_a_paused_engine_and_start_again(backend: EngineBackend) -> None:
    new = make_spec()
    placement = await backend.create(new.spec)
    await wait_healthy(placement.url, BOOT_S)
    await backend.start(new.engine_id)  # already running: no-op
    assert (await backend.inspect(new.engine_id)).state is ObservedState.RUNNING
    await backend.pause(new.engine_id)
    await backend.stop(new.engine_id, grace_s=10)
    assert await _state(backend, new.engine_id) is ObservedState.EXITED
    await backend.stop(new.engine_id, grace_s=1)  # stopping a stopped engine is success
    with pytest.raises(EngineAbsent):
        await backend.pause(new.engine_id)
    await backend.start(new.engine_id)
    await wait_healthy(placement.url, BOOT_S)


async def test_crash_is_detected_and_start_recovers(backend: EngineBackend) -> None:
    new = make_spec()
    placement = await backend.create(new.spec)
    await wait_healthy(placement.url, BOOT_S)
    await support_for(backend).kill_behind_back(backend, placement)
    await _wait_state(backend, new.engine_id, GONE)
    if await _state(backend, new.engine_id) is ObservedState.EXITED:
        await backend.start(new.engine_id)
        await wait_healthy(placement.url, BOOT_S)
        assert await _state(backend, new.engine_id) is ObservedState.RUNNING


async def test_list_managed_sees_only_its_deployment(backend: EngineBackend, tmp_path: Path) -> None:
    product = str(uuid.uuid4())
    first, second = make_spec(product_id=product), make_spec(product_id=product)
    for new in (first, second):
        await backend.create(new.spec)
    listed = {o.engine_id: o for o in await backend.list_managed()}
    assert set(listed) == {first.engine_id, second.engine_id}
    for new in (first, second):
        labels = listed[new.engine_id].labels
        assert labels[LABEL_ENGINE_ID] == new.engine_id
        assert labels[LABEL_PRODUCT_ID] == product
        assert listed[new.engine_id].state in {ObservedState.RUNNING, ObservedState.EXITED}
    ours = {o.labels[LABEL_DEPLOYMENT] for o in listed.values()}
    assert len(ours) == 1

    other_deployment = f"test-other-{uuid.uuid4().hex[:8]}"
    async with support_for(backend).make_backend(tmp_path, other_deployment) as other:
        assert await other.list_managed() == []
        third = make_spec(deployment=other_deployment)
        await other.create(third.spec)
        theirs = await other.list_managed()
        assert [o.engine_id for o in theirs] == [third.engine_id]
        assert theirs[0].labels[LABEL_DEPLOYMENT] == other_deployment != next(iter(ours))
        assert {o.engine_id for o in await backend.list_managed()} == {first.engine_id, second.engine_id}


async def test_a_new_backend_instance_reattaches(backend: EngineBackend, tmp_path: Path) -> None:
    """An orchestrator restart: a fresh backend on the same runtime and deployment takes over."""
    deployment = f"test-restart-{uuid.uuid4().hex[:8]}"
    support = support_for(backend)
    async with support.make_backend(tmp_path, deployment) as before:
        new = make_spec(deployment=deployment)
        placement = await before.create(new.spec)
        await wait_healthy(placement.url, BOOT_S)
        async with support.make_backend(tmp_path, deployment) as after:
            assert [o.engine_id for o in await after.list_managed()] == [new.engine_id]
            assert await _state(after, new.engine_id) is ObservedState.RUNNING
            await after.pause(new.engine_id)
            assert await _state(before, new.engine_id) is ObservedState.PAUSED
            await after.resume(new.engine_id)
            await after.stop(new.engine_id, grace_s=10)
            assert await _state(before, new.engine_id) is ObservedState.EXITED
            await after.start(new.engine_id)
            await wait_healthy(placement.url, BOOT_S)
            assert await _state(before, new.engine_id) is ObservedState.RUNNING
            await after.destroy(new.engine_id)
        assert await _state(before, new.engine_id) is ObservedState.ABSENT


async def test_missing_engine_image(backend: EngineBackend, tmp_path: Path) -> None:
    support = support_for(backend)
    new = make_spec(image="bap-engine-test/no-such-image:missing")
    hook = getattr(support, "make_backend_missing_engine", None)
    if hook is None:  # image-based runtimes: the spec's image is what is missing
        with pytest.raises(ImageNotFound):
            await backend.create(new.spec)
        assert await _state(backend, new.engine_id) is ObservedState.ABSENT
        return
    async with hook(tmp_path, f"test-missing-{uuid.uuid4().hex[:8]}") as broken:
        with pytest.raises(ImageNotFound):
            await broken.create(new.spec)
        assert await _state(broken, new.engine_id) is ObservedState.ABSENT


# -- local-process specifics -------------------------------------------------------------------


def _only_subprocess(backend: EngineBackend) -> None:
    if backend.name != "subprocess":
        pytest.skip("local-process behaviour; other runtimes map ports differently")


async def test_create_on_a_bound_port_raises_port_in_use(backend: EngineBackend) -> None:
    _only_subprocess(backend)
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        new = make_spec(port)
        with pytest.raises(PortInUse) as caught:
            await backend.create(new.spec)
        assert caught.value.port == port and caught.value.transient
        assert await _state(backend, new.engine_id) is ObservedState.ABSENT


async def test_process_env_and_files_are_private(backend: EngineBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    _only_subprocess(backend)
    monkeypatch.setenv("ORCH_MASTER_KEY", "orchestrator-secret")
    new = make_spec()
    placement = await backend.create(new.spec)
    await wait_healthy(placement.url, BOOT_S)
    raw = Path(f"/proc/{placement.ref}/environ").read_bytes()
    env = dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
    assert "ORCH_MASTER_KEY" not in env
    assert env["PORT"] == str(new.spec.port) and env["HOST"] == "127.0.0.1"
    assert env["ENGINE_KEY_HASH"] == new.spec.env["ENGINE_KEY_HASH"]
    assert env["BAP_ENGINE_ID"] == new.engine_id and env["BAP_DEPLOYMENT"]
    data_dir = Path(env["SQLITE_DB_PATH"]).parent
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((data_dir / ".bap-process.json").stat().st_mode) == 0o600
    assert os.getsid(int(placement.ref)) == int(placement.ref)  # own session: survives the orchestrator


async def test_engine_outlives_the_orchestrator_process(backend: EngineBackend, tmp_path: Path) -> None:
    """An engine created by a process that then exits keeps running, and is managed afterwards."""
    _only_subprocess(backend)
    support = support_for(backend)
    deployment = f"test-outlive-{uuid.uuid4().hex[:8]}"
    new = make_spec(deployment=deployment)
    script = (
        "import asyncio, json, sys\n"
        "from pathlib import Path\n"
        "from bap_engine.backends.base import EngineSpec\n"
        "from bap_engine.backends.subprocess import SubprocessBackend, SubprocessConfig\n"
        "a = json.loads(sys.argv[1])\n"
        "cfg = SubprocessConfig(Path(a['data_dir']), tuple(a['command']), a['deployment'])\n"
        "p = asyncio.run(SubprocessBackend(cfg).create(EngineSpec(**a['spec'])))\n"
        "print(p.url)\n"
    )
    spec = new.spec
    args = {
        "data_dir": str(tmp_path / support.DATA_DIR_NAME),
        "command": list(support.ENGINE_COMMAND),
        "deployment": deployment,
        "spec": {
            "engine_id": spec.engine_id,
            "product_id": spec.product_id,
            "port": spec.port,
            "image": spec.image,
            "env": dict(spec.env),
            "labels": dict(spec.labels),
        },
    }
    orchestrator = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, json.dumps(args), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await orchestrator.communicate()
    assert orchestrator.returncode == 0
    url = out.decode().strip()
    async with support.make_backend(tmp_path, deployment) as heir:
        await wait_healthy(url, BOOT_S)
        assert await _state(heir, new.engine_id) is ObservedState.RUNNING
        await heir.stop(new.engine_id, grace_s=10)
        assert await _state(heir, new.engine_id) is ObservedState.EXITED
        await heir.destroy(new.engine_id)
        assert await _state(heir, new.engine_id) is ObservedState.ABSENT


async def test_create_again_while_running_returns_the_same_engine(backend: EngineBackend) -> None:
    _only_subprocess(backend)
    new = make_spec()
    placement = await backend.create(new.spec)
    assert await backend.create(new.spec) == placement
    with pytest.raises(BackendError):
        await backend.create(replace(new.spec, port=free_port()))
    assert (await backend.inspect(new.engine_id)).ref == placement.ref
