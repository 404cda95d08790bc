"""Prometheus metrics (prometheus-client). Correct with several server processes: when
`PROMETHEUS_MULTIPROC_DIR` is set (`iectox serve --workers N` sets it), every process writes its
samples there and `/metrics` aggregates them (`registry()`).

Labels are bounded sets (route templates, statuses, stages, outcomes, card types), never a
concrete path, an id or a value.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from .traces import span

HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

HTTP_DURATION = Histogram(
    "iectox_http_request_duration_seconds",
    "HTTP request duration, by method, route template and status.",
    ("method", "route", "status"),
    buckets=HTTP_BUCKETS,
)
EVALUATION_STAGE = Histogram(
    "iectox_evaluation_stage_seconds",
    "Evaluation time by stage: parse (normalise the inputs), grade (current grades), course (hourly "
    "grades since day 0), scores, emit (FHIR resources built and validated).",
    ("stage",),
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
DELIVERIES = Counter(
    "iectox_writeback_deliveries_total",
    "Write-back outbox deliveries by outcome (delivered, retried, dead, lost_lease).",
    ("outcome",),
)
POLL_LAST_PASS = Gauge(
    "iectox_poll_last_pass_timestamp_seconds",
    "When the reconciliation poll last finished a pass (Unix time); lag = time() - this.",
    multiprocess_mode="max",
)
POLL_CHANGED = Counter("iectox_poll_changed_patients_total", "Watched patients the poll found changed.")
CDS_CARDS = Counter(
    "iectox_cds_cards_total", "CDS Hooks cards returned, by card type and indicator.", ("type", "indicator")
)
CDS_QUIET = Counter("iectox_cds_quiet_total", "CDS hook answers kept quiet, by hook and rule.", ("hook", "rule"))


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time one evaluation stage (and trace it, when traces are on)."""
    start = time.perf_counter()
    try:
        with span(f"evaluate {name}", stage=name):
            yield
    finally:
        EVALUATION_STAGE.labels(name).observe(time.perf_counter() - start)


def registry() -> CollectorRegistry | None:
    """The registry to expose: every process's samples in multi-process mode, else None (the
    default registry of this process)."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    reg = CollectorRegistry()
    multiprocess.MultiProcessCollector(reg)
    return reg


def exposition() -> bytes:
    """The metrics in the Prometheus text format."""
    reg = registry()
    return generate_latest(reg) if reg is not None else generate_latest()


def serve(port: int) -> None:
    """Serve `/metrics` on `port` in a background thread (the worker and the poll have no HTTP
    server of their own)."""
    from prometheus_client import start_http_server

    reg = registry()
    if reg is not None:
        start_http_server(port, registry=reg)
    else:
        start_http_server(port)
