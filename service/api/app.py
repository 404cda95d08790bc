"""Application factory: wires settings, codebook, database and clock into app.state."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy import Engine
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..app.cache import EvaluationCache
from ..app.view import WorklistCache
from ..codebook import load_codebook
from ..config.clock import utc_now
from ..config.runtime import tune_gc
from ..config.settings import Settings
from ..fhir.errors import FhirError, Issue, operation_outcome
from ..observe.logs import REQUEST_ID_HEADER, configure_logging, request_context, request_id_from
from ..observe.metrics import HTTP_DURATION
from ..observe.traces import configure as configure_traces
from ..observe.traces import span
from ..storage.db import WalCheckpointer, make_engine, migrate
from ..storage.errors import StorageBusy
from . import bulk, cds, clinician, fhir, health, metrics, subscriptions
from .auth import install_security
from .responses import FhirResponse

log = logging.getLogger("iectox.api")

HTTP_ISSUE_CODES = {404: "not-found", 405: "not-supported", 413: "too-long", 415: "not-supported"}


def _outcome(status: int, issues: list[Issue]) -> FhirResponse:
    return FhirResponse(operation_outcome(issues), status_code=status)


class BodyLimit:
    """413 for a body over the limit, counted as it streams (Content-Length may lie or be absent)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise FhirError.one(413, "too-long", f"request body over {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        issue = Issue("too-long", f"request body over {self.max_bytes} bytes")
        await _outcome(413, [issue])(scope, receive, send)


RETRY_AFTER_S = "5"


def _retry_later(message: str) -> FhirResponse:
    """503 with Retry-After: a database fault, never the request's, so retrying is safe."""
    issue = Issue("transient", message)
    return FhirResponse(operation_outcome([issue]), status_code=503, headers={"Retry-After": RETRY_AFTER_S})


class ContainErrors:
    """Any exception the routes did not handle becomes a 500 OperationOutcome here, logged by its
    type only: its message (and uvicorn's traceback, which prints it) could carry clinical values."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            log.error("unhandled %s", type(exc).__name__)
            if not started:
                await _outcome(500, [Issue("exception", "internal error", None, "fatal")])(scope, receive, send)


METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Observe:
    """Each request's id (X-Request-ID, kept or made, returned), its log line, its duration metric
    and its span, named by the route template, never the concrete path (ids are patient data).
    Outermost, so a 500 answered by ContainErrors is counted and logged with its id too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        method = scope.get("method", "") if scope.get("method") in METHODS else "OTHER"  # a bounded label
        sent = dict(scope.get("headers") or ()).get(REQUEST_ID_HEADER.lower().encode())
        request_id = request_id_from(sent.decode("latin-1") if sent else None)
        status = 500

        async def with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        with request_context(request_id), span(f"HTTP {method}", **{"http.method": method}) as traced:
            try:
                await self.app(scope, receive, with_id)
            finally:
                route = getattr(scope.get("route"), "path", "unmatched")
                elapsed = time.perf_counter() - start
                HTTP_DURATION.labels(method, route, str(status)).observe(elapsed)
                log.info("%s %s %s %.1fms", method, route, status, elapsed * 1e3)
                if traced is not None:
                    traced.update_name(f"{method} {route}")
                    traced.set_attributes({"http.route": route, "http.status_code": status})


def create_app(
    settings: Settings | None = None,
    *,
    engine: Engine | None = None,
    clock: Callable[[], datetime] = utc_now,
) -> FastAPI:
    settings = settings or Settings()
    configure_traces()  # opt-in by the standard OTEL_* environment; off costs nothing
    engine = engine or make_engine(settings.database_url)
    if settings.auto_migrate:
        migrate(engine)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tune_gc()  # the server process has started: its start-up heap is final
        checkpointer = WalCheckpointer(engine)  # SQLite: no hook pays for a checkpoint
        checkpointer.start()
        yield
        checkpointer.stop()
        engine.dispose()

    app = FastAPI(
        title="iectox",
        version=__version__,
        summary="CRS and ICANS grading (ASTCT 2019) after immune effector cell therapy, over FHIR R4.",
        description="FHIR R4 (4.0.1) JSON in and out (application/fhir+json). Every error is an "
        "OperationOutcome whose issues name the problem and its FHIRPath.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.codebook = load_codebook(settings.canonical_base, settings.codebook_path)
    app.state.clock = clock
    app.state.evaluations = EvaluationCache()  # known patients' unchanged inputs are not graded again
    install_security(app, settings, engine)  # refuses to start on unsafe settings (docs/security.md)
    app.include_router(health.router)
    app.include_router(bulk.router)  # before fhir's /{type} routes: $export is not a resource type
    app.include_router(fhir.router)
    app.include_router(subscriptions.router)
    app.include_router(cds.router)
    app.include_router(metrics.router)
    app.state.worklist = WorklistCache()
    app.include_router(clinician.router)
    clinician.mount_static(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    @app.exception_handler(FhirError)
    async def fhir_error(_: Request, exc: FhirError) -> FhirResponse:
        return _outcome(exc.status, exc.issues)

    @app.exception_handler(RequestValidationError)
    async def bad_params(_: Request, exc: RequestValidationError) -> FhirResponse:
        issues = [
            Issue(
                "value" if e.get("type") != "missing" else "required",
                str(e.get("msg")),
                ".".join(str(p) for p in e.get("loc", ())),
            )
            for e in exc.errors()
        ]
        return _outcome(400, issues)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> FhirResponse:
        return _outcome(exc.status_code, [Issue(HTTP_ISSUE_CODES.get(exc.status_code, "processing"), str(exc.detail))])

    @app.exception_handler(OperationalError)  # the database is gone, or a connection broke
    @app.exception_handler(InterfaceError)
    @app.exception_handler(DisconnectionError)
    @app.exception_handler(PoolTimeout)  # every pooled connection busy
    async def database_error(_: Request, exc: SQLAlchemyError) -> FhirResponse:
        log.error("database error %s", type(exc).__name__)
        return _retry_later("the database is unavailable; retry later")

    @app.exception_handler(StorageBusy)
    async def storage_busy(_: Request, exc: StorageBusy) -> FhirResponse:
        # Other writers held the rows too long: nothing of this request was stored.
        log.warning("storage busy: %s", exc.reason)
        return _retry_later("the database is busy with other writes; retry later")

    app.add_middleware(ContainErrors)  # no exception reaches the server's log
    app.add_middleware(Observe)  # outermost: a 500 from ContainErrors is timed, logged and carries its id
    return app


def create_served_app() -> FastAPI:
    """The app of one `iectox serve --workers N` process (a fresh interpreter: its logs are
    configured here, as `iectox` configures its own)."""
    configure_logging()
    return create_app()
