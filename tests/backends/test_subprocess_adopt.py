"""The subprocess backend adopts an engine whose spawner died before writing its pid: at once when the
spawning process is gone (a survivor must see the engine it is about to mark running), only after the
grace while the spawner may still write it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bap_engine.backends.base import ObservedState
from bap_engine.backends.subprocess import RECORD_NAME, SubprocessBackend, SubprocessConfig


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("spawner_alive", [False, True])
async def test_a_spawning_record_of_a_dead_spawner_is_adopted_at_once(tmp_path: Path, spawner_alive: bool) -> None:
    backend = SubprocessBackend(SubprocessConfig(data_dir=tmp_path, command=(sys.executable, "-c", "pass"),
                                                 deployment="adopt-test"))
    engine_id = str(uuid.uuid4())
    directory = tmp_path / "engines" / engine_id
    directory.mkdir(parents=True)
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True,
                              env={**os.environ, "BAP_ENGINE_ID": engine_id})
    record = {"engine_id": engine_id, "product_id": "p", "port": 1, "image": "v", "env": {}, "labels": {},
              "version": 1, "deployment": "adopt-test", "created_at": datetime.now(UTC).isoformat(),
              "pid": None, "starttime": None, "spawning": datetime.now(UTC).isoformat(),
              "spawner": os.getpid() if spawner_alive else _dead_pid()}
    (directory / RECORD_NAME).write_text(json.dumps(record))
    try:
        seen = await backend.inspect(engine_id)
        if spawner_alive:  # maybe still writing the pid itself: left alone within the grace
            assert seen.state == ObservedState.EXITED
            assert json.loads((directory / RECORD_NAME).read_text())["spawning"]
        else:
            assert (seen.state, seen.ref) == (ObservedState.RUNNING, str(engine.pid))
            assert json.loads((directory / RECORD_NAME).read_text())["pid"] == engine.pid
    finally:
        engine.kill()
        engine.wait()
        await backend.close()
