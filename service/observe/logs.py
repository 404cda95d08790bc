"""Structured logs (structlog over the standard library's logging): JSON lines when the output is
not a terminal (containers: one object per line for the log shipper), readable lines on a
terminal; `IECTOX_LOG_FORMAT=json|console` chooses. Every line carries the request id of the
request (or outbox delivery, or poll pass) it belongs to.

The rule stays: no patient identifiers and no clinical values in logs (route templates, counts,
statuses and error classes only; tests/test_observe.py).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import structlog

REQUEST_ID_HEADER = "X-Request-ID"
# A UUID, or 16 to 64 hex digits (trace ids): a caller's id is kept only when it cannot be an
# identifier of a person (an integration engine could put a record number there).
_GOOD_ID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|[0-9a-fA-F]{16,64}")


def request_id_from(header: str | None) -> str:
    """The caller's X-Request-ID when it is a UUID or a hex trace id, else a new one (a header is
    never logged as sent: it could carry anything)."""
    return header if header is not None and _GOOD_ID.fullmatch(header) else uuid.uuid4().hex


def current_request_id() -> str | None:
    value = structlog.contextvars.get_contextvars().get("request_id")
    return value if isinstance(value, str) else None


@contextmanager
def request_context(request_id: str) -> Iterator[None]:
    """Every log line inside carries `request_id` (threads started from here inherit it)."""
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        yield


def configure_logging(level: int = logging.WARNING, service_level: int = logging.INFO, fmt: str | None = None) -> None:
    """Route the standard library's logging through structlog's renderer."""
    fmt = fmt or os.environ.get("IECTOX_LOG_FORMAT") or ("console" if sys.stderr.isatty() else "json")
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("iectox").setLevel(service_level)
