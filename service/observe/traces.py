"""OpenTelemetry traces, opt-in: on when the standard environment asks for them
(`OTEL_TRACES_EXPORTER` other than `none`, or `OTEL_EXPORTER_OTLP_ENDPOINT` /
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), configured by the SDK from the other `OTEL_*` variables
(service name, headers, sampler, ...). Off, `span()` is a shared no-op: nothing is imported,
allocated or exported.

Spans: the HTTP request (named by its route template), the evaluation stages (parse, grade,
course, scores, emit), database statements and EHR calls. Names and attributes are route
templates, methods, resource types, statuses and counts: never a concrete path, a statement
parameter, a header, a body or an exception's message (its class only).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

_TRACER: Any = None
_OFF: AbstractContextManager[None] = nullcontext()


def enabled_by_environment() -> bool:
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    return bool(exporter or endpoint)


def configure(exporter: Any = None) -> bool:
    """Start tracing when the environment asks for it (once per process, at start-up), or with
    `exporter` (tests: it replaces any earlier one); returns whether traces are on."""
    global _TRACER  # the process's one tracer, like its logging configuration
    if _TRACER is not None and exporter is None:
        return True
    if exporter is None and not enabled_by_environment():
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "iectox")}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _TRACER = provider.get_tracer("iectox")
    return True


def on() -> bool:
    return _TRACER is not None


def span(name: str, **attributes: str | int | float | bool) -> AbstractContextManager[Any]:
    """A span when traces are on, else a shared no-op."""
    if _TRACER is None:
        return _OFF
    return _span(name, attributes)


@contextmanager
def _span(name: str, attributes: dict[str, Any]) -> Iterator[Any]:
    # An exception's message may carry ids or values: the span records its class only.
    with _TRACER.start_as_current_span(
        name, attributes=attributes, record_exception=False, set_status_on_exception=False
    ) as s:
        try:
            yield s
        except BaseException as exc:
            from opentelemetry.trace import Status, StatusCode

            s.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise


def start(name: str, **attributes: str | int | float | bool) -> Any:
    """A span started now and ended by `end` (for callbacks that open and close in two places,
    such as the database's statement events); None when traces are off."""
    return None if _TRACER is None else _TRACER.start_span(name, attributes=attributes)


def end(s: Any) -> None:
    if s is not None:
        s.end()


def fail(s: Any, error: str) -> None:
    """End a span started by `start` as failed, naming the error's class only."""
    from opentelemetry.trace import Status, StatusCode

    s.set_status(Status(StatusCode.ERROR, error))
    s.end()


def disable() -> None:
    """Traces off again (tests)."""
    global _TRACER
    _TRACER = None
