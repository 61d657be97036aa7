"""The states an engine really goes through, through the API, stay inside states.TRANSITIONS."""

from __future__ import annotations

from pathlib import Path

from bap_engine.config import Settings
from bap_engine.states import EngineState, can_transition
from tests.conftest import ResponseLog, assert_envelope, open_app, pk, register_product


async def test_a_failed_start_of_a_stopped_engine_stays_in_the_table(
    settings: Settings, tmp_path: Path, response_log: ResponseLog
) -> None:
    async with open_app(settings, response_log) as (_, client):
        _, key = await register_product(client)
        assert (await client.post("/engines/provision", json={"user_id": "u1"}, headers=pk(key))).status_code == 200
        assert (await client.post("/engines/u1/stop", headers=pk(key))).status_code == 200
    broken = settings.model_copy(update={"engine_command": str(tmp_path / "no-such-engine-binary")})
    async with open_app(broken, response_log) as (_, client):
        assert_envelope(await client.post("/engines/u1/start", headers=pk(key)), 502, "BACKEND_ERROR")
        status = EngineState((await client.get("/engines/u1", headers=pk(key))).json()["status"])
        assert status is EngineState.STOPPED or can_transition(EngineState.STOPPED, status), status
