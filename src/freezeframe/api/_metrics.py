"""Prometheus metrics of one ``serve`` process (``GET /metrics``, ``prometheus-client``).

Owns the metric names and what feeds them: every snapshot job this process ran, counted once
when it ends. Each app gets a registry of its own (several apps in one test process never
collide).

- ``freezeframe_freeze_window_seconds`` (histogram): freeze sent -> thawed, per snapshot that
  froze;
- ``freezeframe_snapshots_total{outcome,level}`` (counter): snapshots by outcome code and the
  consistency level reached;
- ``freezeframe_thaw_unconfirmed_total`` (counter): snapshots whose thaw could not be
  confirmed (the guest may have stayed frozen: recover);
- ``freezeframe_verifications_total{verdict}`` (counter) and ``freezeframe_jobs_running``
  (gauge).
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

#: Freeze windows are tens to hundreds of milliseconds; a hung agent makes them seconds.
_WINDOW_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.freeze_window = Histogram(
            "freezeframe_freeze_window_seconds",
            "Freeze window of a snapshot: freeze sent to thawed.",
            buckets=_WINDOW_BUCKETS,
            registry=self.registry,
        )
        self.snapshots = Counter(
            "freezeframe_snapshots",
            "Snapshots run by this server, by outcome code and consistency level reached.",
            ("outcome", "level"),
            registry=self.registry,
        )
        self.thaw_unconfirmed = Counter(
            "freezeframe_thaw_unconfirmed",
            "Snapshots whose thaw could not be confirmed (the guest may have stayed frozen).",
            registry=self.registry,
        )
        self.verifications = Counter(
            "freezeframe_verifications",
            "Verifications run by this server, by verdict.",
            ("verdict",),
            registry=self.registry,
        )
        self.jobs_running = Gauge(
            "freezeframe_jobs_running",
            "Snapshot and verify jobs running in this server.",
            registry=self.registry,
        )

    def snapshot_done(
        self, *, outcome: str, level: str, window_ms: float | None, thaw_unconfirmed: bool
    ) -> None:
        self.snapshots.labels(outcome=outcome, level=level).inc()
        if window_ms is not None:
            self.freeze_window.observe(window_ms / 1000.0)
        if thaw_unconfirmed:
            self.thaw_unconfirmed.inc()

    def verify_done(self, verdict: str) -> None:
        self.verifications.labels(verdict=verdict).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
