"""Fuzzing the live API with schemathesis: the real `st run` CLI, every check and every phase
(examples, coverage, fuzzing, stateful with the links schemathesis infers), against `/openapi.json`
of a real `bap-engine serve` (subprocess backend, reference engines), with the admin key, a platform
key and the admin bearer supplied. Any failure schemathesis reports (a 5xx, a response off its
schema, an undocumented status, valid data rejected, invalid data accepted, an Allow header off the
document, auth not enforced, ...) fails the test, with schemathesis' report in the message.

Bounds: the server runs on a throwaway database of the session's Postgres (the fuzzer registers
products and rewrites policies at will, and must see no other test's data); the fuzzed product may
hold at most 2 engines, so most provisions are `429 QUOTA_EXCEEDED`; the policy route is pinned to a
decoy product, so the fuzzer cannot lift that quota; `-n` bounds the examples per operation and
cycle, `--max-time` the whole run (fuzzing and stateful repeat until it is spent), and the process
itself is killed past a hard deadline. BAP_FUZZ_MAX_TIME, BAP_FUZZ_EXAMPLES and BAP_FUZZ_SEED
(reproduce a run from the seed it printed) tune it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx

from bap_engine.config import Settings
from tests.api.test_health import throwaway_database
from tests.conftest import ADMIN_KEY, pk, register_product, unique_slug
from tests.e2e.conftest import Server, StartServer, start_server

__all__ = ["start_server"]  # the e2e fixture, used here by name

MAX_TIME_S = int(os.environ.get("BAP_FUZZ_MAX_TIME", "75"))
EXAMPLES = int(os.environ.get("BAP_FUZZ_EXAMPLES", "40"))
SEED = os.environ.get("BAP_FUZZ_SEED")
PHASES = ("examples", "coverage", "fuzzing", "stateful")
MAX_ENGINES = 2
SEED_USER = "fuzz-seed"


def st_command(server: Server, platform_key: str, config: Path) -> list[str]:
    """The schemathesis command line (the `st` next to this interpreter)."""
    st = str(Path(sys.executable).with_name("st"))
    command = [
        st, "--config-file", str(config), "--no-color", "run", f"{server.url}/openapi.json",
        "--checks", "all", "--phases", ",".join(PHASES),
        "--max-examples", str(EXAMPLES), "--max-time", str(MAX_TIME_S),
        # one worker: requests on one product's engines are serialised anyway (ENGINE_BUSY otherwise)
        "--workers", "1", "--request-timeout", "30",
        "--generation-database", "none",  # nothing kept between runs, nothing written in the tree
        # GET /events is an endless text/event-stream: with the valid platform key every phase would wait on
        # it for good (its keep-alive comments reset the read timeout); tests/api/test_events.py covers it
        "--exclude-path", "/events",
        "-H", f"X-Admin-Key: {ADMIN_KEY}", "-H", f"X-Platform-Key: {platform_key}",
        "-H", f"Authorization: Bearer {ADMIN_KEY}",
    ]
    return [*command, "--seed", SEED] if SEED else command


def write_config(path: Path, decoy_product_id: str) -> Path:
    """schemathesis.toml: PUT /products/{product_id}/policy only ever targets the decoy product."""
    # 400s no schema can state: GET /usage refuses since >= until and windows over 400 days, GET /audit a
    # parameter of the other key's form (the fuzzer sends both keys: the admin one wins), and an
    # engine_version the backend does not have (provision, upgrade, a policy's pinned version)
    cross_field = '"2xx", "3xx", "400", "401", "403", "404", "409", "429", "5xx"'
    accept = f"checks.positive_data_acceptance.expected-statuses = [{cross_field}]\n"
    path.write_text(
        "[[operations]]\n"
        'include-path = "/products/{product_id}/policy"\n'
        f'parameters = {{ product_id = "{decoy_product_id}" }}\n' + accept
        + "".join(f'\n[[operations]]\ninclude-path = "{p}"\n' + accept
                  for p in ("/usage", "/audit", "/engines/provision", "/engines/{user_id}/upgrade",
                            "/products/register"))
    )
    return path


async def prepare(url: str) -> tuple[str, str, str]:
    """(fuzzed product's id and platform key, decoy product id); the fuzzed product already has one
    running engine, so lifecycle calls reached through links act on a real engine from the start."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        product_id, key = await register_product(client, policy={"max_engines": MAX_ENGINES}, slug=unique_slug("fz"))
        decoy_id, _ = await register_product(client, slug=unique_slug("decoy"))
        r = await client.post(f"/engines/{SEED_USER}/admit", json={"auto_provision": True}, headers=pk(key))
        assert r.status_code == 200 and r.json()["admitted"] is True, r.text
    return product_id, key, decoy_id


async def lifecycle_actions(url: str, product_id: str, key: str) -> tuple[int, set[str]]:
    """(engines the fuzzed product has now, the audit actions on them)."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        total = (await client.get("/engines", headers=pk(key))).json()["total"]
        r = await client.get(f"/products/{product_id}/audit", params={"limit": 1000},
                             headers={"X-Admin-Key": ADMIN_KEY})
    return int(total), {e["action"] for e in r.json()["events"]}


def run_schemathesis(command: list[str], cwd: Path) -> tuple[int, str]:
    """Run `st` with a hard deadline past its own budget; (exit code, its whole output)."""
    out = cwd / "schemathesis.txt"
    with out.open("wb") as sink:
        proc = subprocess.Popen(command, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            code = proc.wait(MAX_TIME_S + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            code = -9
    return code, out.read_text(errors="replace")


def summary(output: str) -> str:
    """The report from its failures section on (or the tail), for an assertion message."""
    for marker in ("=== FAILURES ===", "=== ERRORS ===", "=== WARNINGS ===", "=== SUMMARY ==="):
        if marker in output:
            return output[output.index(marker) - 30:][-12000:]
    return output[-12000:]


async def test_schemathesis_finds_nothing(
    start_server: StartServer, settings: Settings, pg_dsn: str, tmp_path: Path  # noqa: F811
) -> None:
    async with throwaway_database(pg_dsn) as dsn:
        # no workers: the fuzzer registers products asking for warm pools of up to 100 engines, which a
        # leader would boot until the 40 ports are gone, and a documented 503 PORT_EXHAUSTION counts as
        # a server error to schemathesis. The pool worker has its own tests (tests/workers/test_pool.py).
        server = start_server(database_url=dsn, workers_enabled=False)
        try:
            product_id, key, decoy_id = await prepare(server.url)
            command = st_command(server, key, write_config(tmp_path / "schemathesis.toml", decoy_id))
            code, output = await asyncio.to_thread(run_schemathesis, command, tmp_path)
            assert code == 0, f"schemathesis exited with {code}:\n{summary(output)}"
            for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
                assert f"✅ {phase}" in output, f"{phase} did not run and pass:\n{summary(output)}"
            total, actions = await lifecycle_actions(server.url, product_id, key)
            assert total <= MAX_ENGINES
            # the fuzzer drove real engines (through links to the seed engine, or ones it provisioned)
            assert actions & {"stop", "start", "rotate_key", "destroy", "wake"}, actions
        finally:
            server.proc.terminate()  # before its database is dropped; start_server's teardown is then a no-op
            server.proc.wait(30)
