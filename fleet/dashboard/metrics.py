"""Prometheus metrics of the fleet service.

Counters are bumped by ingest; device gauges are read from the registry at scrape time, with a
cap on per-device series so a large fleet cannot blow up a Prometheus server's cardinality.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..registry import Registry

DEFAULT_DEVICE_SERIES_CAP = 500


class _RegistryCollector(Collector):
    def __init__(self, registry: Registry, cap: int) -> None:
        self.registry = registry
        self.cap = cap

    def collect(self) -> Iterator[GaugeMetricFamily]:
        devices = self.registry.devices()
        states = GaugeMetricFamily(
            "edgekit_devices", "Devices by fleet and state.", labels=["fleet", "state"]
        )
        counts: dict[tuple[str, str], int] = {}
        for d in devices:
            severity = () if d.drift_severity in (None, "ok") else (d.drift_severity.replace(" ", "_"),)
            for state in (
                "online" if d.online else "offline",
                *(("drifted",) if d.drifted else ()),
                *severity,
            ):
                counts[(d.fleet, state)] = counts.get((d.fleet, state), 0) + 1
        for (fleet, state), n in sorted(counts.items()):
            states.add_metric([fleet, state], n)
        yield states
        latency = GaugeMetricFamily(
            "edgekit_device_latency_p95_ms",
            "Last reported p95 latency per device (capped).",
            labels=["fleet", "device"],
        )
        drift = GaugeMetricFamily(
            "edgekit_device_drift_score",
            "Last reported drift score per device (capped).",
            labels=["fleet", "device"],
        )
        accuracy = GaugeMetricFamily(
            "edgekit_device_estimated_accuracy",
            "Last accuracy a device estimated without labels, 0..1 (calibrated bundles; capped).",
            labels=["fleet", "device"],
        )
        # Affected, drifted and slowest devices first, so the cap keeps the series worth watching.
        ranked = sorted(
            devices,
            key=lambda d: (
                d.drift_severity != "model affected",
                not d.drifted,
                -(d.latency_p95_ms or 0.0),
                d.id,
            ),
        )
        for d in ranked[: self.cap]:
            if d.latency_p95_ms is not None:
                latency.add_metric([d.fleet, d.id], d.latency_p95_ms)
            if d.drift_score is not None:
                drift.add_metric([d.fleet, d.id], d.drift_score)
            if d.accuracy_estimate is not None:
                accuracy.add_metric([d.fleet, d.id], d.accuracy_estimate)
        yield latency
        yield drift
        yield accuracy
        dropped = GaugeMetricFamily(
            "edgekit_device_series_capped", "Devices left out of per-device gauges by the cardinality cap."
        )
        dropped.add_metric([], max(0, len(devices) - self.cap))
        yield dropped


class FleetMetrics:
    """The fleet service's Prometheus registry."""

    def __init__(self, registry: Registry, device_series_cap: int = DEFAULT_DEVICE_SERIES_CAP) -> None:
        self.prometheus = CollectorRegistry()
        self.ingested = Counter(
            "edgekit_telemetry_ingested",
            "Telemetry records stored (duplicates excluded).",
            registry=self.prometheus,
        )
        self.duplicates = Counter(
            "edgekit_telemetry_duplicates",
            "Telemetry records seen again and ignored.",
            registry=self.prometheus,
        )
        self.events = Counter(
            "edgekit_events_ingested", "Device events stored (duplicates excluded).", registry=self.prometheus
        )
        self.states = Counter(
            "edgekit_states_ingested",
            "Device state messages applied to the registry.",
            registry=self.prometheus,
        )
        self.db_errors = Counter(
            "edgekit_ingest_db_errors",
            "Registry writes that failed and were retried (or isolated row by row).",
            registry=self.prometheus,
        )
        self.rejected = Counter(
            "edgekit_messages_rejected",
            "Messages dropped as malformed or oversized.",
            ["kind", "reason"],
            registry=self.prometheus,
        )
        self.prometheus.register(_RegistryCollector(registry, device_series_cap))

    def render(self) -> bytes:
        return generate_latest(self.prometheus)
