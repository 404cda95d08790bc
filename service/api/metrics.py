"""`GET /metrics`: the Prometheus metrics (service/observe/metrics.py) and the write-back outbox
gauges read from the database at each scrape (counts only, no ids)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from sqlmodel import Session

from ..observe.metrics import exposition
from ..storage import outbox
from ..storage.db import read_only
from .deps import ClockDep, EngineDep

router = APIRouter(tags=["health"])

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def render(stats: outbox.OutboxStats) -> str:
    lines = [
        "# HELP iectox_outbox_rows Write-back outbox rows by status.",
        "# TYPE iectox_outbox_rows gauge",
        f'iectox_outbox_rows{{status="pending"}} {stats.pending}',
        f'iectox_outbox_rows{{status="delivered"}} {stats.delivered}',
        f'iectox_outbox_rows{{status="dead"}} {stats.dead}',
        "# HELP iectox_outbox_claimed_rows Pending rows under a live worker lease (being delivered).",
        "# TYPE iectox_outbox_claimed_rows gauge",
        f"iectox_outbox_claimed_rows {stats.claimed}",
        "# HELP iectox_outbox_oldest_pending_age_seconds Age of the oldest pending row (0 when none).",
        "# TYPE iectox_outbox_oldest_pending_age_seconds gauge",
        f"iectox_outbox_oldest_pending_age_seconds {stats.oldest_pending_age_s:.3f}",
    ]
    return "\n".join(lines) + "\n"


@router.get(
    "/metrics",
    summary="Metrics (Prometheus text format)",
    description="HTTP request durations (by method, route template and status), evaluation time by stage, "
    "write-back deliveries by outcome, the reconciliation poll's last pass, CDS cards by type and indicator and "
    "quiet answers, and, read from the database at each scrape, outbox rows by status, rows being delivered and "
    "the age of the oldest pending row. Aggregated over every server process (PROMETHEUS_MULTIPROC_DIR). Labels "
    "are route templates and kinds: no patient identifiers, paths or values.",
    response_class=PlainTextResponse,
    responses={200: {"content": {PROMETHEUS_TEXT: {"schema": {"type": "string"}}}}},
)
def metrics(engine: EngineDep, clock: ClockDep) -> PlainTextResponse:
    with Session(read_only(engine)) as session:
        stats = outbox.stats(session, clock())
    return PlainTextResponse(exposition().decode() + render(stats), media_type=PROMETHEUS_TEXT)
