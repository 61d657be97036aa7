"""Webhook delivery: the leader POSTs each product's lifecycle events to its receiver, in id order.

One `WebhookWorker` per leader term (built by the factory app.py appends to `services.workers`),
looped by `workers.base.run_loop` under the supervisor. It never reads an audit row the horizon does
not call safe (`Horizon.safe_id`: every id up to it has committed) and it waits for new rows with
`Horizon.wait_past`, not by polling: an event is sent within milliseconds of its commit.

- `run_once` is the dispatcher: for the length of one interval it reads which webhooks have an event
  to send (one query per wake-up), and starts a *lane* for each that is due and has none running.
- A lane (a one-shot task under the supervisor, family `webhook-delivery`) sends one product's events
  one at a time, head first, until it is caught up or an attempt fails; so a slow or dead receiver
  holds back its own product only. A lane's exception is logged by the supervisor with its traceback;
  its product is retried after a pause.
- An attempt is acknowledged by any 2xx; anything else (another status, no answer within `timeout_s`,
  a refused connection) is retried with exponential backoff (`backoff_base_s` · 2^(n-1), capped at
  `backoff_max_s`, plus up to `jitter` of it), the state kept in the webhook's row (so a new leader
  resumes from its `cursor_id` and backoff). An event failing for `give_up_after_s` is given up: a
  warning names the product and the event, and the cursor moves on. At least once: a receiver
  dedupes by X-Bap-Event-Id.
- A leader delivers the webhooks of its deployment only (the one whose API served the PUT), as its
  other workers act on its deployment's engines only.
- The term's HTTP client (one per worker) is made by the first pass and closed when the task that
  runs the loop ends (the term is over: the leader stops its worker tasks), the lanes cancelled first.

Nothing logged here carries a secret or a URL (a URL may hold credentials): product and event ids,
statuses and error classes only.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import httpx

from bap_engine import __version__
from bap_engine.supervisor import Supervisor
from bap_engine.webhooks import Due, Head, Horizon, Webhooks, sign

__all__ = ["WebhookWorker", "LANE_FAMILY"]

log = logging.getLogger("bap_engine.webhooks")
LANE_FAMILY = "webhook-delivery"
_SLACK_S = 0.02  # a pass ends this much before its interval (run_loop then waits it out: events wait at most this)
_MIN_GAP_S = 0.01  # at most one dispatch query per this, however fast rows commit
_MAX_READ = 64 * 1024  # of a receiver's answer (read so the connection can be reused)
_LANE_PAUSE_S = (1.0, 60.0)  # after a lane failed: first pause, longest pause


class WebhookWorker:
    name = "webhooks"

    def __init__(
        self, webhooks: Webhooks, horizon: Horizon, supervisor: Supervisor, *, interval_s: float = 1.0,
        timeout_s: float = 10.0, backoff_base_s: float = 1.0, backoff_max_s: float = 600.0, jitter: float = 0.1,
        give_up_after_s: float = 24 * 3600.0, clock: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.webhooks, self.horizon, self.supervisor = webhooks, horizon, supervisor
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.backoff_base_s, self.backoff_max_s, self.jitter = backoff_base_s, backoff_max_s, jitter
        self.give_up_after_s = give_up_after_s
        self._clock = clock  # wall-clock seconds: what next_attempt_at and first_failure_at are written in
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._term: asyncio.Task[object] | None = None
        self._closed = False
        self._closing: asyncio.Task[None] | None = None
        self._lanes: dict[str, asyncio.Task[None]] = {}
        self._pause: dict[str, tuple[float, int]] = {}  # product → (monotonic until, lane failures in a row)
        self._last_query = 0.0
        self._kick = asyncio.Event()  # a lane scheduled a retry: the dispatcher's wait is shortened
        self.delivered = 0  # events acknowledged by their receivers (this term)
        self.given_up = 0

    # ---- the dispatcher ----------------------------------------------------------------------
    async def run_once(self) -> int:
        """One interval of dispatching; returns the events acknowledged meanwhile."""
        self._bind()
        before = self.delivered
        deadline = time.monotonic() + max(0.05, self.interval_s - _SLACK_S)
        since: int | None = None  # None: look at every webhook (the first look of a pass, a retry due)
        next_due = deadline
        while True:
            await asyncio.sleep(max(0.0, self._last_query + _MIN_GAP_S - time.monotonic()))
            self._last_query = now = time.monotonic()
            safe = self.horizon.safe_id
            wait_s = self._dispatch(await self.webhooks.due(safe, since))
            next_due = now + wait_s if since is None else min(next_due, now + wait_s)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            woke = await self._wait(safe, max(0.0, min(remaining, next_due - time.monotonic())))
            if woke is None and time.monotonic() >= deadline:
                break
            since = safe if woke == "rows" else None  # new rows: only their products can have new work
        return self.delivered - before

    async def _wait(self, after_id: int, timeout: float) -> str | None:
        """Until rows past `after_id` are safe ("rows"), a lane scheduled a retry ("kick"), or
        `timeout` (None)."""
        if self._kick.is_set():
            self._kick.clear()
            return "kick"
        started = time.monotonic()
        kicked = asyncio.ensure_future(self._kick.wait())
        past = asyncio.ensure_future(self.horizon.wait_past(after_id, timeout))
        try:
            await asyncio.wait((kicked, past), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            kicked.cancel()
            past.cancel()
            outcome = (await asyncio.gather(kicked, past, return_exceptions=True))[1]
        self._kick.clear()
        if isinstance(outcome, Exception):
            raise outcome
        if outcome is True:
            return "rows"
        if kicked.done() and not kicked.cancelled():
            return "kick"
        # a horizon answering False before its time (closed) is not asked again in a tight loop
        await asyncio.sleep(max(0.0, started + timeout - time.monotonic()))
        return None

    def _dispatch(self, dues: Sequence[Due]) -> float:
        """Start a lane for each webhook due; returns the seconds until the next one falls due."""
        now, mono = self._clock(), time.monotonic()
        wait_s = self.interval_s
        for due in dues:
            pid = due.product_id
            if pid in self._lanes:
                continue
            until = max(0.0, due.next_attempt_at.timestamp() - now) if due.next_attempt_at else 0.0
            until = max(until, self._pause.get(pid, (0.0, 0))[0] - mono)
            if until > 0:
                wait_s = min(wait_s, until)
                continue
            self._lanes[pid] = task = self.supervisor.spawn(f"webhook-{pid}", self._lane(pid), family=LANE_FAMILY)
            task.add_done_callback(functools.partial(self._forget, pid))
        return wait_s

    def _forget(self, pid: str, task: asyncio.Task[None]) -> None:
        if self._lanes.get(pid) is task:
            del self._lanes[pid]

    # ---- a lane --------------------------------------------------------------------------------
    async def _lane(self, pid: str) -> None:
        """Send the product's events, head first, until caught up or an attempt fails."""
        try:
            while not self._closed:
                safe = self.horizon.safe_id
                head = await self.webhooks.head(pid, safe)
                if head is None:  # deleted
                    break
                if head.event is None:
                    if self.horizon.safe_id > safe:  # rows came meanwhile (the dispatcher left them to us)
                        continue
                    break
                if head.next_attempt_at is not None and head.next_attempt_at.timestamp() > self._clock():
                    break  # backing off (another lane recorded it): the dispatcher comes back in time
                if not await self._attempt(head):
                    break
            self._pause.pop(pid, None)
        except Exception:
            _, failures = self._pause.get(pid, (0.0, 0))
            first, longest = _LANE_PAUSE_S
            self._pause[pid] = (time.monotonic() + min(longest, first * 2 ** failures), failures + 1)
            self._kick.set()
            raise  # the supervisor logs it, with its traceback
        finally:
            # with no await since the last look at safe_id: the dispatcher sees this lane gone or
            # this lane saw what the dispatcher left it
            current = asyncio.current_task()
            if current is not None:
                self._forget(pid, current)

    async def _attempt(self, head: Head) -> bool:
        """POST the head event once and record the outcome; True to go on with the next one."""
        event = head.event
        assert event is not None and self._client is not None
        secret = self.webhooks.open_secret(head.secret_enc)
        status: int | None = None
        if secret is None:  # sealed under another master key: nothing can be signed (a new PUT fixes it)
            error: str | None = "the secret cannot be decrypted with this master key"
        else:
            body = event.body()
            timestamp = str(int(self._clock()))
            headers = {"Content-Type": "application/json", "X-Bap-Event-Id": str(event.id),
                       "X-Bap-Timestamp": timestamp, "X-Bap-Signature": sign(secret, timestamp, body)}
            status, error = await self._post(self._client, head.url, body, headers)
        at = datetime.fromtimestamp(self._clock(), UTC)
        fields = {"product_id": head.product_id, "event_id": event.id, "status": status}
        if error is None:
            await self.webhooks.acknowledged(head, event.id, status, at)
            self.delivered += 1
            return True  # (if the webhook changed meanwhile, the next look sends it again)
        first = head.first_failure_at or at
        if (at - first).total_seconds() >= self.give_up_after_s:
            log.warning("webhook event given up", extra={**fields, "attempts": head.attempts + 1, "error": error})
            if await self.webhooks.acknowledged(head, event.id, status, at, error=f"given up: {error}"):
                self.given_up += 1
            return True
        delay = self.backoff_s(head.attempts + 1)
        log.log(logging.INFO if secret else logging.WARNING, "webhook attempt failed",
                extra={**fields, "attempt": head.attempts + 1, "error": error, "retry_in_s": round(delay, 3)})
        recorded = await self.webhooks.failed(head, status, error, at, first, at + timedelta(seconds=delay))
        self._kick.set()  # the dispatcher comes back for it in `delay`
        return not recorded  # the webhook changed meanwhile (a new URL): look again at once

    async def _post(self, client: httpx.AsyncClient, url: str, body: bytes,
                    headers: dict[str, str]) -> tuple[int | None, str | None]:
        """(HTTP status or None, error or None when acknowledged)."""
        try:
            async with asyncio.timeout(self.timeout_s), client.stream("POST", url, content=body,
                                                                      headers=headers) as response:
                read = 0
                async for chunk in response.aiter_raw():
                    read += len(chunk)
                    if read > _MAX_READ:
                        break
                status = response.status_code
        except (TimeoutError, httpx.TimeoutException):
            return None, f"no answer within {self.timeout_s:g} s"
        except (httpx.HTTPError, httpx.InvalidURL) as err:
            return None, type(err).__name__
        return status, None if 200 <= status < 300 else f"HTTP {status}"

    def backoff_s(self, attempt: int) -> float:
        """The wait after the `attempt`-th failure of one event: 1, 2, 4, 8 … s (by default), capped,
        plus up to `jitter` of it."""
        delay = min(self.backoff_max_s, self.backoff_base_s * 2.0 ** min(max(attempt - 1, 0), 62))
        return delay * (1 + random.uniform(0, self.jitter))

    # ---- the term ------------------------------------------------------------------------------
    def _bind(self) -> None:
        """On the first pass: the term's HTTP client, closed when the task running the loop ends."""
        if self._closed:
            raise RuntimeError("this webhook worker's term is over")
        if self._term is not None:
            return
        task = asyncio.current_task()
        assert task is not None
        self._term = task
        self._client = httpx.AsyncClient(
            transport=self._transport, timeout=httpx.Timeout(self.timeout_s), follow_redirects=False,
            headers={"User-Agent": f"bap-engine/{__version__} webhooks"},
        )
        task.add_done_callback(self._term_over)

    def _term_over(self, task: asyncio.Task[object]) -> None:
        self._closing = self.supervisor.spawn("webhook-client-close", self.aclose(), family=LANE_FAMILY)

    @property
    def lanes(self) -> frozenset[str]:
        """The products a lane is sending events of right now."""
        return frozenset(self._lanes)

    @property
    def closed(self) -> bool:
        return self._closed and (self._client is None or self._client.is_closed)

    async def aclose(self) -> None:
        """Cancel the lanes and close the HTTP client (idempotent; also done when the term ends)."""
        self._closed = True
        lanes = list(self._lanes.values())
        for lane in lanes:
            lane.cancel()
        await asyncio.gather(*lanes, return_exceptions=True)
        if self._client is not None:
            await asyncio.shield(self._client.aclose())
