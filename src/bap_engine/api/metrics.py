"""Prometheus metrics of one app: a registry per app (never the global one), rendered at scrape time.

Where each figure comes from (deploy/README-ops.md has the list):

- from the database at scrape time, so every replica answers the same: engines by product and
  state (`bap_engines`), the seconds engines spent in each state (`bap_engine_state_seconds_total`:
  the closed intervals of table state_seconds plus the open ones of live engines; pool engines
  excluded), and from the audit log the all-time counters of provisions, provision
  failures, destroys, crashes (`health_failed`), restarts (`auto_restart_start`), wakes, admission
  denials by reason, and the boot and wake time histograms (audit `duration_ms`);
- per process, labelled `replica`: admissions by product (`bap_admits_total`) and the admit
  latency histogram, counted by `MeteredDiscovery` (one dict increment and one observe per admit),
  and the worker health read from the leader election (`bap_leader`, `bap_worker_last_sweep_seconds`).

Never imports SQL or a backend: the figures come through `Fleet` and the services.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from bap_engine.discovery import Admission, Discovery
from bap_engine.fleet import AuditTotals, Fleet
from bap_engine.supervisor import Supervisor

__all__ = ["OpsMetrics", "MeteredDiscovery", "replica_id", "BOOT_BOUNDS_MS", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BOOT_BOUNDS_MS = (100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000)
ADMIT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
OUTCOMES = ("admitted", "denied", "error")
_STATE_SECONDS_ALWAYS = ("running", "sleeping", "stopped")

# audit action → (metric name without _total, help)
_COUNTERS = {
    "provision": ("bap_provisions", "Engines provisioned (audit log, all replicas)"),
    "provision_failed": ("bap_provision_failures", "Failed provisions (audit log, all replicas)"),
    "destroy": ("bap_destroys", "Engines destroyed (audit log, all replicas)"),
    "health_failed": ("bap_crashes", "Engines marked failed by the health loop (audit log, all replicas)"),
    "auto_restart_start": ("bap_restarts", "Automatic restart attempts (audit log, all replicas)"),
    "wake": ("bap_wakes", "Sleeping engines woken (audit log, all replicas)"),
    "pool_fill": ("bap_pool_fills", "Warm-pool engines booted (audit log, all replicas)"),
    "pool_claim": ("bap_pool_claims", "Warm-pool engines handed to a new user (audit log, all replicas)"),
}
_HISTOGRAMS = {
    "provision": ("bap_engine_boot_seconds", "Provision-to-healthy time (audit log duration_ms, all replicas)"),
    "wake": ("bap_engine_wake_seconds", "Wake-to-healthy time (audit log duration_ms, all replicas)"),
}


class _Product(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def slug(self) -> str: ...


_Products = list[tuple[_Product, dict[str, int]]]


def replica_id() -> str:
    """hostname-pid: distinct per orchestrator process."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class _Snapshot:
    products: _Products
    totals: AuditTotals
    leadership: object | None
    supervisor: Supervisor | None
    state_seconds: list[tuple[str, str, float]] = field(default_factory=list)  # (product id, state, seconds)
    pool: list[tuple[str, str, int]] = field(default_factory=list)  # (product id, status, n) of pool engines


class OpsMetrics:
    """The app's registry: per-process instruments plus a collector over a scrape-time snapshot."""

    def __init__(self, replica: str | None = None) -> None:
        self.replica = replica or replica_id()
        self.registry = CollectorRegistry()
        latency = Histogram("bap_admit_latency_seconds", "Admit handling time in this replica, by outcome",
                            ["replica", "outcome"], registry=self.registry, buckets=ADMIT_BUCKETS_S)
        self._latency = {o: latency.labels(self.replica, o) for o in OUTCOMES}
        self.admits: Counter[str] = Counter()  # product id → admitted requests in this process
        self._snapshot: _Snapshot | None = None
        # the highest bap_engine_state_seconds_total this process exported, per (product id, state)
        self._state_seconds: dict[tuple[str, str], float] = {}
        self.registry.register(_ScrapeCollector(self))

    def observe_admit(self, product_id: str | None, outcome: str, seconds: float) -> None:
        """Hot path: one dict increment and one histogram observe."""
        if product_id is not None:
            self.admits[product_id] += 1
        self._latency[outcome].observe(seconds)

    async def render(self, fleet: Fleet, leadership: object | None, supervisor: Supervisor | None = None) -> bytes:
        """The Prometheus text: database reads first, then one synchronous render."""
        products: _Products = list(await fleet.products())
        totals = await fleet.audit_totals(BOOT_BOUNDS_MS)
        state_seconds = await fleet.state_seconds()
        pool = await fleet.pool_counts()
        # No await between setting the snapshot and rendering: concurrent scrapes cannot mix.
        self._snapshot = _Snapshot(products, totals, leadership, supervisor, state_seconds, pool)
        try:
            return generate_latest(self.registry)
        finally:
            self._snapshot = None

    def families(self) -> Iterable[Metric]:
        snap = self._snapshot
        if snap is None:
            return []
        slugs = {p.id: p.slug for p, _ in snap.products}
        out: list[Metric] = [_engines(snap.products), _warm(snap.pool, slugs)]
        out.extend(_audit_counters(snap.totals, slugs))
        out.extend(_audit_histograms(snap.totals, slugs))
        out.append(self._state_seconds_family(snap.state_seconds, slugs))
        admits = CounterMetricFamily("bap_admits", "Admitted requests handled by this replica",
                                     labels=["product", "replica"])
        for product_id, n in sorted(self.admits.items()):
            admits.add_metric([slugs.get(product_id, product_id), self.replica], n)
        out.append(admits)
        out.extend(_workers(snap.leadership, self.replica))
        if snap.supervisor is not None:
            out.append(_task_restarts(snap.supervisor, self.replica))
        return out

    def _state_seconds_family(self, rows: list[tuple[str, str, float]], slugs: Mapping[str, str]) -> Metric:
        """Closed plus open seconds, never below what this process exported before: a scrape that reads
        an engine's open interval while its transition commits sees up to that transaction's length
        more than the closed figure the trigger then records (it closes at the transaction's start)."""
        for product_id, state, seconds in rows:
            key = (product_id, state)
            self._state_seconds[key] = max(self._state_seconds.get(key, 0.0), seconds)
        for product_id in slugs:  # running, sleeping and stopped always; any other state once seen
            for state in _STATE_SECONDS_ALWAYS:
                self._state_seconds.setdefault((product_id, state), 0.0)
        family = CounterMetricFamily("bap_engine_state_seconds",
                                     "Seconds engines spent in each state, closed and open intervals "
                                     "(database, all replicas; warm-pool engines excluded)",
                                     labels=["product", "state"])
        for (product_id, state), seconds in sorted(self._state_seconds.items(),
                                                   key=lambda kv: (slugs.get(kv[0][0], kv[0][0]), kv[0][1])):
            family.add_metric([slugs.get(product_id, product_id), state], seconds)
        return family


class _ScrapeCollector:
    def __init__(self, metrics: OpsMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics.families()


def _engines(products: _Products) -> Metric:
    gauge = GaugeMetricFamily("bap_engines", "Engines by product and state (database, all replicas)",
                              labels=["product", "state"])
    for product, counts in products:
        for state, n in sorted(counts.items()):
            gauge.add_metric([product.slug, state], n)
    return gauge


def _warm(pool: list[tuple[str, str, int]], slugs: Mapping[str, str]) -> Metric:
    gauge = GaugeMetricFamily("bap_engines_warm", "Warm-pool engines by product and state, not counted in "
                              "bap_engines (database, all replicas)", labels=["product", "state"])
    for product_id, state, n in sorted(pool):
        if product_id in slugs:
            gauge.add_metric([slugs[product_id], state], n)
    return gauge


def _audit_counters(totals: AuditTotals, slugs: Mapping[str, str]) -> list[Metric]:
    counts = {(t.product_id, t.action): t.count for t in totals.actions}
    out: list[Metric] = []
    for action, (name, doc) in _COUNTERS.items():
        family = CounterMetricFamily(name, doc, labels=["product"])
        for product_id, slug in sorted(slugs.items(), key=lambda kv: kv[1]):
            family.add_metric([slug], counts.get((product_id, action), 0))
        out.append(family)
    denials = CounterMetricFamily("bap_admit_denials", "Admissions denied, by reason (audit log, all replicas)",
                                  labels=["product", "reason"])
    for product_id, reason, n in sorted(totals.denials):
        denials.add_metric([slugs.get(product_id, product_id), reason], n)
    out.append(denials)
    return out


def _audit_histograms(totals: AuditTotals, slugs: Mapping[str, str]) -> list[Metric]:
    out: list[Metric] = []
    for action, (name, doc) in _HISTOGRAMS.items():
        family = HistogramMetricFamily(name, doc, labels=["product"])
        for t in sorted(totals.actions, key=lambda t: t.product_id):
            if t.action != action or t.product_id not in slugs:
                continue
            buckets = [(f"{b / 1000:g}", float(n)) for b, n in zip(BOOT_BOUNDS_MS, t.buckets, strict=True)]
            buckets.append(("+Inf", float(t.duration_count)))
            family.add_metric([slugs[t.product_id]], buckets, sum_value=t.sum_ms / 1000)
        out.append(family)
    return out


def _workers(leadership: object | None, replica: str) -> list[Metric]:
    leader = GaugeMetricFamily("bap_leader", "1 when this replica holds the workers' leader lock",
                               labels=["replica"])
    leader.add_metric([replica], 1.0 if getattr(leadership, "is_leader", False) else 0.0)
    sweep = GaugeMetricFamily("bap_worker_last_sweep_seconds", "Duration of the worker's last pass (leader only)",
                              labels=["replica", "worker"])
    workers = getattr(leadership, "workers", None)
    if getattr(leadership, "is_leader", False) and isinstance(workers, dict):
        for name, worker in sorted(workers.items()):
            seconds = getattr(worker, "last_sweep_s", None)
            if isinstance(seconds, int | float):
                sweep.add_metric([replica, str(name)], float(seconds))
    return [leader, sweep]


class MeteredDiscovery(Discovery):
    """Discovery that reports each admit to `metrics` (when attached); otherwise identical."""

    metrics: OpsMetrics | None = None

    async def admit(self, platform_key: str, user_id: str, *, auto_provision: bool, auto_wake: bool) -> Admission:
        started = time.perf_counter()
        try:
            result = await super().admit(platform_key, user_id, auto_provision=auto_provision, auto_wake=auto_wake)
        except Exception:
            if self.metrics is not None:
                self.metrics.observe_admit(None, "error", time.perf_counter() - started)
            raise
        if self.metrics is not None:
            product_id = result.engine.product_id if result.admitted and result.engine else None
            self.metrics.observe_admit(product_id, "admitted" if result.admitted else "denied",
                                       time.perf_counter() - started)
        return result


def _task_restarts(supervisor: Supervisor, replica: str) -> Metric:
    restarts = CounterMetricFamily("bap_task_restarts", "Failures of a supervised task in this replica "
                                   "(each is logged with its traceback and followed by a restart)",
                                   labels=["task", "replica"])
    for name, status in sorted(supervisor.status().items()):
        restarts.add_metric([name, replica], status.restarts)
    return restarts
