"""Faults and load (issue 11): the event loop never waits on a store or an evaluation, a database
that is gone gives 503 with Retry-After (never a 500, never no reply), an unexpected error never
reaches the log with its message, rejected CDS calls are audited, `--workers` serves, and the
course of an evaluation far after its data is bounded."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import Engine
from sqlmodel import Session, col, select

import service.api.fhir as fhir_routes
from service.api.app import create_app
from service.config.settings import Settings
from service.core.course import CourseConfig, course_of
from service.storage.db import make_engine
from service.storage.models import AuditEvent
from tests import factories as f
from tests.api_helpers import transaction
from tests.conftest import FIXED_NOW

T0 = "2026-01-06T10:00:00+00:00"
CLI = [sys.executable, "-m", "service.cli"]


# --- the course is bounded --------------------------------------------------------------------


def test_course_far_after_its_data_samples_only_the_last_max_span() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    at = start + timedelta(days=3650)  # ten years after day 0
    cfg = CourseConfig(max_span=timedelta(days=100))
    seen: list[datetime] = []

    def grade_at(t: datetime) -> int | None:
        seen.append(t)
        return 0

    c = course_of("astct-crs", "ASTCT", grade_at, start, at, cfg)
    assert c.sampled_from is not None and at - c.sampled_from <= cfg.max_span
    assert (c.sampled_from - start) % cfg.step == timedelta(0)  # on day 0's grid
    assert len(seen) == c.samples <= 100 * 24 + 1
    assert c.daily_max[0][0] == 3550  # days stay counted from day 0
    assert "Sampled only from" in c.rationale(cfg)
    short = course_of("astct-crs", "ASTCT", lambda _: 0, start, start + timedelta(days=3), cfg)
    assert short.sampled_from is None and "Sampled only" not in short.rationale(cfg)


# --- the loop answers during a store ---------------------------------------------------------------


@pytest.mark.asyncio
async def test_healthz_answers_while_a_store_is_running(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store is held inside its worker thread until /healthz has answered: were it on the
    # event loop, /healthz could not answer first (deterministic, no timing).
    started, release = threading.Event(), threading.Event()
    real = fhir_routes.store_bundle

    def held(*args: Any, **kwargs: Any) -> Any:
        started.set()
        assert release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(fhir_routes, "store_bundle", held)
    store = asyncio.create_task(client.post("/fhir", content=orjson.dumps(transaction([f.patient()]))))
    assert await asyncio.to_thread(started.wait, 60)
    health = await client.get("/healthz")
    assert health.status_code == 200 and not store.done()
    release.set()
    assert (await store).status_code == 200


# --- the database is gone ----------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def gone_app() -> Iterator[Any]:
    """The app on a PostgreSQL URL where nothing listens (the database is down)."""
    engine = make_engine(f"postgresql://postgres@127.0.0.1:{_closed_port()}/test")
    yield create_app(
        Settings(database_url="sqlite://", auth_mode="dev", auto_migrate=False), engine=engine, clock=lambda: FIXED_NOW
    )
    engine.dispose()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/fhir/Patient/p1", None),
        ("POST", "/fhir", transaction([f.patient()])),
        ("PUT", "/fhir/Patient/p1", f.patient()),
        ("POST", "/fhir/Patient/p1/$evaluate", None),
        ("GET", "/fhir/RiskAssessment", None),
        ("GET", "/metrics", None),
    ],
)
async def test_database_gone_is_503_with_retry_after(
    gone_app: Any, method: str, path: str, body: dict[str, Any] | None, caplog: pytest.LogCaptureFixture
) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gone_app), base_url="http://localhost") as c:
        r = await c.request(method, path, content=orjson.dumps(body) if body else None)
        assert r.status_code == 503, r.text
        assert r.headers["Retry-After"] == "5"
        assert r.json()["issue"][0]["code"] == "transient"
        assert (await c.get("/healthz")).status_code == 200
        assert (await c.get("/readyz")).status_code == 503
    assert "p1" not in caplog.text and "postgres@" not in caplog.text


# --- an unexpected error --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_unexpected_error_is_a_500_whose_message_never_reaches_the_log(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(*_: Any, **__: Any) -> Any:
        raise RuntimeError("Patient MRN-4711 temperature 39.7")

    monkeypatch.setattr(fhir_routes, "evaluate_body", boom)
    caplog.set_level(logging.DEBUG)
    # ASGITransport re-raises an exception that escapes the app: this call would fail if it did.
    r = await client.post("/fhir/$evaluate", content=orjson.dumps(f.bundle(f.patient())))
    assert r.status_code == 500 and r.json()["issue"][0]["code"] == "exception"
    assert "RuntimeError" in caplog.text
    assert "MRN-4711" not in caplog.text and "39.7" not in caplog.text


# --- rejected CDS calls are audited ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_rejected_cds_call_is_audited(client: httpx.AsyncClient, clean_engine: Engine) -> None:
    hook = {"hook": "patient-view", "hookInstance": "x", "context": {"patientId": "p1"}}
    r = await client.post("/cds-services/iectox-patient-view", json=hook, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    with Session(clean_engine) as s:
        rows = s.exec(select(AuditEvent).where(col(AuditEvent.action) == "hook")).all()
    assert [(e.route, e.status) for e in rows] == [("/cds-services/iectox-patient-view", 401)]


# --- several processes ------------------------------------------------------------------------------


def _free_port() -> int:
    return _closed_port()


@pytest.mark.integration  # runs `iectox serve --workers 2` (uvicorn, two processes)
def test_serve_with_two_workers_stores_and_answers(tmp_path: Path) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "IECTOX_DATABASE_URL": f"sqlite:///{tmp_path / 'w.db'}",
        "IECTOX_AUTH_MODE": "dev",
    }
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", str(port), "--workers", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=30) as c:
            for _ in range(600):  # up to 60 s for both processes to start
                try:
                    if c.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                threading.Event().wait(0.1)
            stored = c.post("/fhir", content=orjson.dumps(transaction([f.patient(), f.temperature(39.0, T0, id="t")])))
            assert stored.status_code == 200, stored.text
            reads = [c.get("/fhir/Observation/t").status_code for _ in range(8)]
            assert reads == [200] * 8
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert "Started parent process" in err or "Uvicorn running" in err


# --- concurrent writes to one process ------------------------------------------------------------


@pytest.mark.asyncio
async def test_concurrent_writes_of_one_patient_to_one_process_never_fail(client: httpx.AsyncClient) -> None:
    # Each request stores the same patient's resources in a newer version; the store runs off the
    # event loop, so a request waiting for another's lock never keeps that one from committing.
    def version(n: int) -> bytes:
        resources = [
            {**f.patient(), "meta": {"versionId": str(n)}},
            *({**f.temperature(37.0 + n / 10, T0, id=f"t{i}"), "meta": {"versionId": str(n)}} for i in range(50)),
        ]
        return orjson.dumps(transaction(resources))

    answers = await asyncio.gather(*(client.post("/fhir", content=version(n)) for n in range(1, 7)))
    assert [r.status_code for r in answers] == [200] * 6, [r.text[:200] for r in answers if r.status_code != 200]
    newest = (await client.get("/fhir/Observation/t0")).json()
    assert newest["valueQuantity"]["value"] == pytest.approx(37.6)


def test_a_cut_course_never_claims_a_maximum_since_day_0() -> None:
    from service.app.evaluate import evaluate_body
    from service.codebook import load_codebook

    settings = Settings()
    day0 = "2026-01-03T10:00:00+00:00"
    late = "2026-06-01T10:00:00+00:00"  # about 150 days later
    resources = (
        f.administration(f.local("cart-infusion"), at=day0, status="completed", id="cart"),
        f.temperature(40.0, "2026-01-04T10:00:00+00:00", id="fever"),
        f.temperature(37.0, late, id="late"),
    )
    ev = evaluate_body(
        f.body(f.patient(), *resources), load_codebook(settings.canonical_base), settings, None, FIXED_NOW
    )
    course = next(ra for ra in ev.assessments if ra["code"]["coding"][0]["code"] == "max-grade")
    assert course["code"]["text"] == "Maximum grade over the sampled span only (not since day 0)"
    assert course["occurrencePeriod"]["start"] > day0


@pytest.mark.parametrize(("extra", "cut"), [(timedelta(0), False), (timedelta(hours=1), True)])
def test_course_span_boundary(extra: timedelta, cut: bool) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    cfg = CourseConfig(max_span=timedelta(days=100))
    c = course_of("astct-crs", "ASTCT", lambda _: 0, start, start + timedelta(days=100) + extra, cfg)
    assert (c.sampled_from is not None) is cut
