"""Postgres down for 10 s while admits and provisions are in flight.

Bounded concurrent clients keep calling admit with auto_provision for new users, admit for
existing users, and provision, before, during and after the outage. Accepted answers:

- a 2xx;
- 503 SERVICE_UNAVAILABLE (the contract's code for "database down");
- 504 BOOT_TIMEOUT: an admit or provision begun around the outage that waited (for its engine,
  or for the database to record it) past the boot timeout; the contract lists 504 for both calls,
  and it tells the product "retry later" without claiming the engine is broken.

502 BACKEND_ERROR is not accepted: the engine runtime is never at fault here.

Never a 500, never a body outside the envelope, never a request longer than BOUND_S. After the
outage, without restarting the orchestrator, admits succeed again within RECOVERY_S; once the
reconciler has run, no row is stuck in a transition, every running row has its process, no engine
process lacks its row, and every engine a success answer named exists and is healthy.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter

from bap_engine.config import Settings
from tests.backends.helpers import health_ok
from tests.conftest import wait_until
from tests.e2e.conftest import StartServer
from tests.faults.pgctl import FaultPostgres
from tests.faults.support import Api, Call, audit_trail, classify, engine_pids, engine_rows, register, unique_user

BOOT_TIMEOUT_S = 10.0
RECONCILE_S = 2.0
TUNING: dict[str, object] = {
    "health_check_interval_s": 1, "reconcile_interval_s": RECONCILE_S, "restart_backoff_base_s": 1,
    "health_max_failures": 2, "health_check_timeout_s": 1, "boot_timeout_s": BOOT_TIMEOUT_S,
}
ACCEPTED = {(503, "SERVICE_UNAVAILABLE"), (504, "BOOT_TIMEOUT")}
OUTAGE_S = 10  # the fault's length (the sleeps below time the fault, they do not wait for effects)
BOUND_S = 15  # no request may take longer (client timeout BOUND_S + 5, so a hang is seen as such)
RECOVERY_S = 15
# "a few reconciler intervals" after Postgres is back: one boot timeout (a provision cut by the
# outage may still be booting) plus five reconcile passes
CONVERGE_S = BOOT_TIMEOUT_S + 5 * RECONCILE_S
NEW_ENGINES_MAX = 10  # successful provisions before the provisioning clients stop (CPU and ports)
CALLS_PER_CLIENT = 150
PACE_S = 0.1


class Traffic:
    """The clients: two provisioning (admit_new, provision) and three admitting existing users."""

    def __init__(self, api: Api, existing: list[str]) -> None:
        self.api = api
        self.existing = existing
        self.calls: list[Call] = []
        self.stop = asyncio.Event()
        self.t0 = time.monotonic()

    def created(self) -> int:
        return sum(1 for c in self.calls if c.op in ("admit_new", "provision") and c.status == 200)

    async def _client(self, ops: itertools.cycle[tuple[str, str | None]]) -> None:
        async with self.api.client() as c:
            for _ in range(CALLS_PER_CLIENT):
                op, user = next(ops)
                if self.stop.is_set() or (user is None and self.created() >= NEW_ENGINES_MAX):
                    return
                self.calls.append(await self.api.call(c, op, user or unique_user("new")))
                await asyncio.sleep(PACE_S)

    def start(self) -> list[asyncio.Task[None]]:
        # (op, user); user None: a new user each time
        plans: list[list[tuple[str, str | None]]] = [[("admit_new", None)], [("provision", None)]]
        for i in range(3):
            plans.append([("admit", u) for u in self.existing[i:] + self.existing[:i]])
        return [asyncio.create_task(self._client(itertools.cycle(p))) for p in plans]


async def _converged(dsn: str, settings: Settings) -> bool:
    rows = await engine_rows(dsn, settings)
    if any(r["status"] in ("provisioning", "destroying") or r["op"] is not None for r in rows):
        return False
    processes = engine_pids(settings)
    running = {str(r["id"]) for r in rows if r["status"] == "running"}
    return set(processes) <= {str(r["id"]) for r in rows} and running <= set(processes)


async def _stuck_report(api: Api, dsn: str, settings: Settings, calls: list[Call]) -> str:
    """What is not converged: each stuck row, the answer its user got during the outage, a live
    probe of its engine and an admit of its user now."""
    rows = await engine_rows(dsn, settings)
    processes = engine_pids(settings)
    lines = [f"processes without a row: {sorted(set(processes) - {str(r['id']) for r in rows})}"]
    for r in rows:
        if r["status"] in ("provisioning", "destroying") or r["op"] is not None \
                or (r["status"] == "running" and str(r["id"]) not in processes):
            healthy = await health_ok(str(r["url"]), 2)
            async with api.client() as c:
                admit = await api.call(c, "admit", str(r["user_id"]))
            during = [(c.op, c.status, c.body[:120], round(c.seconds, 2)) for c in calls if c.user == r["user_id"]]
            lines.append(f"row {r['id']} status={r['status']} op={r['op']} process={str(r['id']) in processes} "
                         f"engine healthy={healthy}; answer during the outage: {during}; admit now → "
                         f"{admit.status} {admit.body[:160]} in {admit.seconds:.1f} s")
    return "\n".join(lines)


def _named_engines(calls: list[Call]) -> dict[str, tuple[str, Call]]:
    """engine id → (url, the call) of every engine a success answer handed out."""
    out: dict[str, tuple[str, Call]] = {}
    for c in calls:
        engine = c.doc.get("engine") if c.op.startswith("admit") else c.doc
        if c.status == 200 and isinstance(engine, dict) and engine.get("engine_id"):
            out[str(engine["engine_id"])] = (str(engine["url"]), c)
    return out


async def test_postgres_outage_during_admits_and_provisions(
    start_server: StartServer, settings: Settings, fault_pg: FaultPostgres, pg_dsn: str
) -> None:
    server = start_server(**TUNING)
    api = Api(server.url, register(server.url), timeout=BOUND_S + 5)
    existing = [unique_user("old") for _ in range(3)]
    for user in existing:
        await api.admitted(user)

    traffic = Traffic(api, existing)
    tasks = traffic.start()
    await asyncio.sleep(1)  # traffic (and provisions) in flight before the outage
    outage_at = time.monotonic()
    async with fault_pg.down():
        await asyncio.sleep(OUTAGE_S)
    back_at = time.monotonic()
    await asyncio.sleep(2)  # and after it
    traffic.stop.set()
    await asyncio.gather(*tasks)
    await _assert_answers(traffic, pg_dsn, (outage_at, back_at))

    async def admits_again() -> bool:
        async with api.client() as c:
            calls = [await api.call(c, "admit", u) for u in existing]
        return all(x.status == 200 and x.doc.get("admitted") is True for x in calls)

    await wait_until(admits_again, timeout=max(1.0, back_at + RECOVERY_S - time.monotonic()), interval=0.2)

    problems = await _problems_after(api, pg_dsn, settings, traffic, (outage_at, back_at))
    assert not problems, "\n".join(problems)
    await _cleanup(api, [str(r["user_id"]) for r in await engine_rows(pg_dsn, settings)])


async def _problems_after(api: Api, dsn: str, settings: Settings, traffic: Traffic,
                          outage: tuple[float, float]) -> list[str]:
    """Give the reconciler CONVERGE_S after the outage, then list what is wrong: rows stuck or
    without their process, processes without a row, and success answers naming an engine that is
    not a healthy running one (with its audit trail)."""
    problems: list[str] = []
    try:
        await wait_until(lambda: _converged(dsn, settings), interval=0.5,
                         timeout=max(1.0, outage[1] + CONVERGE_S - time.monotonic()))
    except AssertionError:
        problems.append(f"not converged {CONVERGE_S:g} s after Postgres came back:\n"
                        f"{await _stuck_report(api, dsn, settings, traffic.calls)}")
    rows = {str(r["id"]): r for r in await engine_rows(dsn, settings)}
    start, end = (t - traffic.t0 for t in outage)
    for engine_id, (url, call) in _named_engines(traffic.calls).items():
        if engine_id in rows and rows[engine_id]["status"] == "running" and await health_ok(url, 3):
            continue
        trail = "\n  ".join(await audit_trail(dsn, engine_id))
        problems.append(f"a success answer named engine {engine_id}, which is not a healthy running engine "
                        f"(row {rows.get(engine_id)}): {call.op} {call.user} sent at +{call.at - traffic.t0:.2f} s "
                        f"(outage +{start:.2f}..+{end:.2f} s), took {call.seconds:.2f} s; audit:\n  {trail}")
    return problems


async def _assert_answers(traffic: Traffic, dsn: str, outage: tuple[float, float]) -> None:
    calls = traffic.calls
    verdicts = Counter(classify(c, ACCEPTED) for c in calls)
    wrong = [c for c in calls if not classify(c, ACCEPTED).startswith(("ok", "error:"))]
    if wrong:
        start, end = (t - traffic.t0 for t in outage)
        lines = [f"{len(wrong)} wrong answers (outage +{start:.2f}..+{end:.2f} s); all: {dict(verdicts)}"]
        for c in wrong[:3]:
            trail = "\n    ".join(await audit_trail(dsn, user_id=c.user))
            lines.append(f"  {c.op} {c.user} sent at +{c.at - traffic.t0:.2f} s, {c.seconds:.2f} s: "
                         f"{classify(c, ACCEPTED)}; audit of the user:\n    {trail}")
        raise AssertionError("\n".join(lines))
    slow = sorted(((round(c.seconds, 1), c.op) for c in calls if c.seconds > BOUND_S), reverse=True)
    assert not slow, f"requests over {BOUND_S} s: {slow[:5]}"
    assert verdicts["error:503 SERVICE_UNAVAILABLE"] > 0, f"the outage was never seen: {dict(verdicts)}"
    assert verdicts["ok"] > 0, dict(verdicts)


async def _cleanup(api: Api, users: list[str]) -> None:
    async with api.client() as c:
        answers = await asyncio.gather(*(api.call(c, "delete", u) for u in users))
    assert all(a.status == 200 for a in answers), [(a.status, a.body) for a in answers if a.status != 200]

