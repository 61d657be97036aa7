"""Wake latency (issue 3 item 6): a sleeping (SIGSTOPped) engine -> admit with auto_wake answered.

Run pinned to CPU 1. It starts `bap-engine serve` (embedded Postgres, CPU 0) with
ORCH_IDLE_SLEEP_AFTER_S=1 and a 0.5 s health interval, so the idle worker (interval
min(health, idle_sleep/2, 60) = 0.5 s) puts an engine to sleep about a second after its
last admit. Each round waits until GET /engines/{u} says "sleeping", then times one admit
with auto_wake; after it, the same engine's bare GET /health round trip is timed.

    python bench/wake.py WORKDIR
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from common import Orchestrator, Table, log, main_entry, median, ms, pct

ROUNDS = 20
HEALTH_PER_ROUND = 10
SLEEP_WAIT_S = 15


async def wait_status(c: httpx.AsyncClient, o: Orchestrator, key: str, user: str, want: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = await c.get(f"{o.base}/engines/{user}", headers={"X-Platform-Key": key})
        if r.status_code == 200 and r.json()["status"] == want:
            return True
        await asyncio.sleep(0.05)
    return False


async def measure(title: str, o: Orchestrator, rounds: int, t: Table, target_s: float | None,
                  boot_timeout: float = 60) -> None:
    """Shared with the docker and kubernetes drivers: provision one engine, then `rounds` sleep/wake cycles."""
    async with httpx.AsyncClient(timeout=boot_timeout + 30) as c, httpx.AsyncClient(timeout=10) as engine_client:
        key = await o.register(c, "bench-wake")
        user = "wake-user"
        o.track(key, user)
        r = await c.post(f"{o.base}/engines/{user}/admit", json={"auto_provision": True},
                         headers={"X-Platform-Key": key})
        doc = r.json()
        if r.status_code != 200 or not doc.get("admitted"):
            raise RuntimeError(f"could not provision the wake engine: {r.status_code} {doc}")
        url = str(doc["engine"]["url"])
        wakes: list[float] = []
        rtts: list[float] = []
        misses = 0
        for i in range(rounds):
            if not await wait_status(c, o, key, user, "sleeping", SLEEP_WAIT_S):
                misses += 1
                log(f"{title}: round {i}: engine did not fall asleep within {SLEEP_WAIT_S}s")
                continue
            t0 = time.perf_counter()
            r = await c.post(f"{o.base}/engines/{user}/admit", json={"auto_wake": True},
                             headers={"X-Platform-Key": key})
            dt = time.perf_counter() - t0
            if r.status_code != 200 or not r.json().get("admitted"):
                raise RuntimeError(f"wake admit {i}: HTTP {r.status_code} {r.text[:200]}")
            wakes.append(dt)
            for _ in range(HEALTH_PER_ROUND):
                h0 = time.perf_counter()
                hr = await engine_client.get(url + "/health")
                if hr.status_code == 200:
                    rtts.append(time.perf_counter() - h0)
        log(f"{title}: {len(wakes)} wakes, median {median(wakes) * 1000:.1f} ms")
    p50 = median(wakes)
    t.add(f"wake p50 / p99 ({len(wakes)} wakes)", f"{ms(p50)} / {ms(pct(wakes, 99))}",
          "" if target_s is None else f"p50 <= {target_s * 1000:.0f} ms",
          None if target_s is None else (p50 <= target_s if wakes else False))
    t.add("same engine's bare GET /health round trip p50 / p99", f"{ms(median(rtts))} / {ms(pct(rtts, 99))}",
          "the floor")
    t.add("wake p50 minus bare /health p50", ms(p50 - median(rtts)))
    if misses:
        t.note(f"{misses} rounds skipped: the engine did not fall asleep within {SLEEP_WAIT_S}s")


async def main(workdir: Path) -> int:
    t = Table("Self-healing: wake from sleep (subprocess backend, SIGSTOP/SIGCONT; orchestrator on CPU 0)")
    o = Orchestrator("wake", workdir, env={
        "ORCH_PORT_MIN": "31000", "ORCH_PORT_MAX": "31099", "ORCH_IDLE_SLEEP_AFTER_S": "1",
        "ORCH_HEALTH_CHECK_INTERVAL_S": "0.5", "ORCH_ACTIVITY_FLUSH_S": "0.25", "ORCH_SLEEP_MODE": "pause"})
    rc = 0
    try:
        await o.start()
        await measure("wake", o, ROUNDS, t, 0.050)
        t.note("wake: client-timed POST /engines/{u}/admit {auto_wake: true} once GET /engines/{u} says sleeping "
               "(ORCH_IDLE_SLEEP_AFTER_S=1, ORCH_HEALTH_CHECK_INTERVAL_S=0.5); /health: httpx keep-alive "
               f"GETs to the engine, {HEALTH_PER_ROUND} after each wake")
    except Exception as err:
        t.note(f"ERROR: {type(err).__name__}: {err}")
        rc = 1
    finally:
        async with httpx.AsyncClient(timeout=60) as c:
            if o.proc is not None and o.proc.poll() is None:
                await o.destroy_all(c)
        o.stop()
        t.print()
    return rc


if __name__ == "__main__":
    main_entry(main)
