"""`GET /metrics`: write-back outbox gauges in the Prometheus text format (counts only, no ids)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from sqlmodel import Session

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
    summary="Write-back outbox metrics (Prometheus text format)",
    description="Gauges: outbox rows by status (pending, delivered, dead), rows being delivered, and the age of "
    "the oldest pending row in seconds. Counts only: no patient identifiers.",
    response_class=PlainTextResponse,
    responses={200: {"content": {PROMETHEUS_TEXT: {"schema": {"type": "string"}}}}},
)
def metrics(engine: EngineDep, clock: ClockDep) -> PlainTextResponse:
    with Session(read_only(engine)) as session:
        stats = outbox.stats(session, clock())
    return PlainTextResponse(render(stats), media_type=PROMETHEUS_TEXT)
