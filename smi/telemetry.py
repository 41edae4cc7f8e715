"""Worker metrics: the Temporal SDK's own, and ours, on one Prometheus port per worker process.

Ours are recorded through Temporal's metric meter, so they leave by the same exporter as
the SDK's: from workflow code (stage times, outcomes, webhook-vs-poll; the SDK drops them
while a workflow replays, so a restarted worker counts nothing twice) and from activities
(Upsampler requests, bytes downloaded, credits booked). The API's /metrics adds the
database totals (named `smi_db_...`: those are for all processes, ours here for this one) and
the task queues' backlog (api/metrics.py).

Names follow Prometheus' conventions: counters end in `_total`, durations are seconds and end
in `_seconds` (the SDK's `temporal_activity_execution_latency_seconds`, our
`smi_stage_duration_seconds`).
"""

from __future__ import annotations

from temporalio import activity
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

# Seconds. A stage lasts from well under a second (received) to days (manual review).
STAGE_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600, 21600, 86400, 604800]


def worker_runtime(metrics_address: str) -> Runtime:
    """A runtime whose Prometheus exporter listens on `metrics_address` (host:port)."""
    prometheus = PrometheusConfig(
        bind_address=metrics_address,
        counters_total_suffix=True,
        unit_suffix=True,
        durations_as_seconds=True,
        # Keyed by the name as recorded: the exporter adds `_seconds` after choosing the buckets.
        histogram_bucket_overrides={"smi_stage_duration": STAGE_BUCKETS},
    )
    return Runtime(telemetry=TelemetryConfig(metrics=prometheus))


def count(name: str, value: int, description: str, **attributes: str) -> None:
    """Add to one of our counters from an activity; outside an activity (a unit test) it does nothing."""
    if value > 0 and activity.in_activity():
        activity.metric_meter().create_counter(name, description).add(value, attributes or None)
