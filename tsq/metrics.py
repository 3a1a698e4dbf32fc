"""tsq's metrics, on the Temporal SDK's own meter: one Prometheus endpoint, one registry, the
SDK's runtime metrics beside tsq's.

Workers count what the workflows do (decisions, refusals, held-up decisions) with the
workflow's replay-safe meter; the watcher reports what the database holds (commands waiting,
the oldest), how long discovery and drift took, and the notifier's deliveries. Every worker
reports the waiting gauges from the same database: take `max` over instances, not `sum`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from temporalio.common import MetricMeter
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

from tsq.contract import Metric

_LAG_BUCKETS = [0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0]


def prometheus_runtime(port: int, host: str = "0.0.0.0") -> Runtime:
    """A runtime serving every metric of this process on http://<host>:<port>/metrics."""
    return Runtime(
        telemetry=TelemetryConfig(
            metrics=PrometheusConfig(
                bind_address=f"{host}:{port}",
                counters_total_suffix=True,
                durations_as_seconds=True,
                histogram_bucket_overrides={
                    Metric.DISCOVERY_LAG.value: _LAG_BUCKETS,
                    Metric.DRIFT_LAG.value: _LAG_BUCKETS,
                },
            )
        )
    )


@dataclass
class _Gauge:
    """A gauge per label set; label sets that disappear are set back to zero."""

    meter: MetricMeter
    name: str
    description: str
    _seen: set[tuple[tuple[str, str], ...]] = field(default_factory=set)

    def report(self, values: Mapping[tuple[tuple[str, str], ...], float]) -> None:
        gauge = self.meter.create_gauge_float(self.name, self.description)
        for labels in self._seen - set(values):
            gauge.with_additional_attributes(dict(labels)).set(0.0)
        for labels, value in values.items():
            gauge.with_additional_attributes(dict(labels)).set(float(value))
        self._seen = set(values)


class WatcherMetrics:
    """What the watcher and the notifier report."""

    def __init__(self, meter: MetricMeter) -> None:
        self.waiting = _Gauge(
            meter, Metric.COMMANDS_WAITING, "Commands waiting in the troubleshooting queue"
        )
        self.oldest = _Gauge(
            meter, Metric.OLDEST_WAITING, "Age of the oldest waiting command, per domain"
        )
        self._discovery = meter.create_histogram_float(
            Metric.DISCOVERY_LAG, "From a command's parking to its workflow started", "s"
        )
        self._drift = meter.create_histogram_float(
            Metric.DRIFT_LAG,
            "From a command leaving the queue by another hand to its workflow told",
            "s",
        )
        self._notifications = meter.create_counter(Metric.NOTIFICATIONS, "Notifications, by result")
        self._skipped = meter.create_counter(
            Metric.COMMANDS_SKIPPED,
            "Parked commands that cannot have a workflow (bad rows), by domain",
        )

    def discovered(self, seconds: float) -> None:
        self._discovery.record(max(0.0, seconds))

    def drifted(self, seconds: float) -> None:
        self._drift.record(max(0.0, seconds))

    def notified(self, result: str) -> None:
        self._notifications.add(1, {"result": result})

    def skipped(self, domain: str) -> None:
        self._skipped.add(1, {"domain": domain})

    def report_waiting(self, groups: Sequence[tuple[str, str, str, int, float]]) -> None:
        """(domain, command type, error code, count, oldest age in seconds) per group."""
        self.waiting.report(
            {
                (("domain", d), ("command_type", t), ("error_code", c)): count
                for d, t, c, count, _ in groups
            }
        )
        oldest: dict[tuple[tuple[str, str], ...], float] = {}
        for domain, _, _, _, age in groups:
            key = (("domain", domain),)
            oldest[key] = max(oldest.get(key, 0.0), age)
        self.oldest.report(oldest)
