"""Operating iectox: Prometheus metrics (labels are route templates and kinds, never ids or
values; correct across several server processes), structured logs with a request id carried
from the request to the outbox rows it enqueues, and the log rule (no patient identifiers or
clinical values)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select

from service.api.app import create_app
from service.config.ehr import FhirServerConfig
from service.config.settings import Settings
from service.observe.logs import configure_logging
from service.storage import outbox
from service.storage.models import OutboxRow
from tests import factories as f
from tests.auth import bearer
from tests.browser import free_port
from tests.conftest import FIXED_NOW

PID = "p-metrics-7731"  # a patient id that must never appear in /metrics or in the logs
T = "2026-01-06T10:00:00+00:00"


def _resources() -> list[dict[str, Any]]:
    ref = f"Patient/{PID}"
    return [
        f.patient(PID),
        f.administration(
            f.local("cart-infusion"), at="2026-01-03T10:00:00+00:00", status="completed", id=f"{PID}-cart", subject=ref
        ),
        f.temperature(39.4567, T, id=f"{PID}-t1", subject=ref),
        f.bp_panel(85, 60, T, id=f"{PID}-bp1", subject=ref),
    ]


async def _store_and_evaluate(client: httpx.AsyncClient, **headers: str) -> httpx.Response:
    entries = [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in _resources()
    ]
    body = orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    r = await client.post("/fhir", content=body, headers={"Content-Type": "application/fhir+json", **headers})
    assert r.status_code == 200, r.text
    return await client.post(f"/fhir/Patient/{PID}/$evaluate", headers=headers)


@pytest.mark.asyncio
async def test_metrics_name_routes_and_kinds_never_ids_or_values(client: httpx.AsyncClient) -> None:
    r = await _store_and_evaluate(client)
    assert r.status_code == 200
    assert (await client.get(f"/fhir/Patient/{PID}")).status_code == 200
    text = (await client.get("/metrics")).text
    assert re.search(
        r'iectox_http_request_duration_seconds_count\{method="GET",route="/fhir/Patient/\{rid\}",status="200"\} [1-9]',
        text,
    )
    assert 'route="/fhir/Patient/{patient_id}/$evaluate"' in text
    for stage in ("parse", "grade", "course", "scores", "emit"):
        assert f'iectox_evaluation_stage_seconds_count{{stage="{stage}"}}' in text
    assert 'iectox_outbox_rows{status="pending"}' in text  # the outbox gauges, read at the scrape
    assert PID not in text and "39.45" not in text and "Patient/p" not in text


@pytest.mark.asyncio
async def test_the_request_id_is_returned_and_carried_to_the_outbox(clean_engine: Engine, settings: Settings) -> None:
    app = create_app(
        settings.model_copy(
            update={
                "writeback_target": "ehr",
                "ehr_servers": {"ehr": FhirServerConfig(base_url="https://ehr.iectox.test/fhir")},
            }
        ),
        engine=clean_engine,
        clock=lambda: FIXED_NOW,
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://iectox.test", headers=bearer()
    ) as c:
        r = await _store_and_evaluate(c, **{"X-Request-ID": "6f1c1f52-3b0e-4c1e-9d55-2f3c8e0a7a10"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "6f1c1f52-3b0e-4c1e-9d55-2f3c8e0a7a10"
        generated = (await c.get("/fhir/metadata")).headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", generated)
        for odd in ("a b\nc" * 50, "MRN-00123456", "123456789"):  # anything but a UUID or a hex trace id
            kept = (await c.get("/fhir/metadata", headers={"X-Request-ID": odd})).headers["x-request-id"]
            assert re.fullmatch(r"[0-9a-f]{32}", kept)  # replaced, never echoed
    with Session(clean_engine) as s:
        rows = list(s.exec(select(OutboxRow)).all())
    assert rows and {row.request_id for row in rows} == {"6f1c1f52-3b0e-4c1e-9d55-2f3c8e0a7a10"}
    claims = outbox.claim(clean_engine, FIXED_NOW, 60, 10, ["ehr"])
    assert {c.request_id for c in claims} == {
        "6f1c1f52-3b0e-4c1e-9d55-2f3c8e0a7a10"
    }  # what the worker binds to its log lines


@pytest.mark.asyncio
async def test_logs_are_json_lines_with_the_request_id_and_no_patient_data(
    clean_engine: Engine, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("iectox").level)
    configure_logging(fmt="json")
    try:
        app = create_app(settings, engine=clean_engine, clock=lambda: FIXED_NOW)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://iectox.test", headers=bearer()
        ) as c:
            await _store_and_evaluate(c, **{"X-Request-ID": "0123456789abcdef0123456789abcdef"})
            await c.get(f"/fhir/Patient/{PID}", headers={"Authorization": "Bearer nope"})  # a 401, logged
    finally:
        root.handlers[:], level, service = saved[0], saved[1], saved[2]
        root.setLevel(level)
        logging.getLogger("iectox").setLevel(service)
    err = capsys.readouterr().err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert lines and all({"event", "level", "timestamp"} <= set(x) for x in lines)
    mine = [x for x in lines if x.get("request_id") == "0123456789abcdef0123456789abcdef"]
    assert any("/fhir/Patient/{patient_id}/$evaluate" in x["event"] for x in mine), mine
    assert PID not in err and "39.45" not in err


@pytest.mark.integration  # a server of two processes
def test_metrics_count_every_server_process(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "IECTOX_DATABASE_URL": f"sqlite:///{tmp_path / 'm.db'}",
        "IECTOX_AUTH_MODE": "dev",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }
    (tmp_path / "metrics").mkdir()
    server = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--workers", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        for _ in range(30):
            with httpx.Client(base_url=base, timeout=10) as fresh:  # new connections: any process answers
                assert fresh.get("/readyz").status_code == 200
        counts = set()
        for _ in range(4):
            with httpx.Client(base_url=base, timeout=10) as fresh:
                text = fresh.get("/metrics").text
            m = re.search(
                r'iectox_http_request_duration_seconds_count\{method="GET",route="/readyz",status="200"\} ([0-9.]+)',
                text,
            )
            assert m, text[:2000]
            counts.add(float(m.group(1)))
        assert counts == {30.0}  # whichever process answers, it counts every process's requests
        assert len(list((tmp_path / "metrics").glob("*.db"))) >= 2
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.asyncio
async def test_traces_when_asked_for_with_no_ids_and_nothing_when_off(tmp_path: Path, settings: Settings) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from service.observe import traces
    from service.storage.db import make_engine, migrate

    assert traces.span("off") is traces.span("also off")  # off: one shared no-op, nothing made
    exporter = InMemorySpanExporter()
    traces.configure(exporter)
    try:
        engine = make_engine(f"sqlite:///{tmp_path / 't.db'}")  # made while traces are on: statements traced
        migrate(engine)
        app = create_app(settings, engine=engine, clock=lambda: FIXED_NOW)
        from fastapi import APIRouter

        boom = APIRouter()

        @boom.get("/fhir/Patient/{patient_id}/$boom")
        def fail(patient_id: str) -> None:
            raise RuntimeError(f"a message with {patient_id}")  # never in a span: its class only

        app.include_router(boom)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://iectox.test", headers=bearer()
        ) as c:
            assert (await _store_and_evaluate(c)).status_code == 200
            assert (await c.get(f"/fhir/Patient/{PID}/$boom")).status_code == 500
    finally:
        traces.disable()
    spans = exporter.get_finished_spans()
    names = {s.name for s in spans}
    assert "POST /fhir/Patient/{patient_id}/$evaluate" in names and "POST /fhir" in names
    assert {"evaluate parse", "evaluate grade", "evaluate course", "evaluate scores", "evaluate emit"} <= names
    assert any(n.startswith("db INSERT") for n in names) and any(n.startswith("db SELECT") for n in names)
    assert "GET /fhir/Patient/{patient_id}/$boom" in names
    shown = repr(
        [(s.name, dict(s.attributes or {}), s.status.description, [e.attributes for e in s.events]) for s in spans]
    )
    assert PID not in shown and "39.45" not in shown


@pytest.mark.asyncio
async def test_a_500_is_counted_logged_and_carries_its_request_id(clean_engine: Engine, settings: Settings) -> None:
    from fastapi import APIRouter

    app = create_app(settings, engine=clean_engine, clock=lambda: FIXED_NOW)
    boom = APIRouter()

    @boom.get("/fhir/Patient/{patient_id}/$boom")
    def fail(patient_id: str) -> None:
        raise RuntimeError(f"a message with {patient_id}")

    app.include_router(boom)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://iectox.test", headers=bearer()
    ) as c:
        rid = "aaaabbbbccccdddd1111222233334444"
        r = await c.get(f"/fhir/Patient/{PID}/$boom", headers={"X-Request-ID": rid})
        assert r.status_code == 500 and r.headers["x-request-id"] == rid
        r = await c.request("FOOBAR123", "/fhir/metadata")
        text = (await c.get("/metrics")).text
    assert 'route="/fhir/Patient/{patient_id}/$boom",status="500"' in text
    assert 'method="OTHER"' in text and "FOOBAR123" not in text  # a bounded method label
    assert PID not in text


def test_the_worker_and_the_poll_serve_their_metrics() -> None:
    from service.observe.metrics import DELIVERIES, serve

    port = free_port()
    serve(port)
    DELIVERIES.labels("delivered").inc()
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert 'iectox_writeback_deliveries_total{outcome="delivered"}' in text


@pytest.mark.asyncio
async def test_ehr_calls_are_traced_by_method_and_type(fhir_server_clean) -> None:  # type: ignore[no-untyped-def]
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from service.ehr.client import FhirClient
    from service.observe import traces

    srv = fhir_server_clean
    srv.seed(f.patient(PID))
    exporter = InMemorySpanExporter()
    traces.configure(exporter)
    try:
        async with FhirClient(srv.server_config(srv.client_es384)) as client:
            assert (await client.read("Patient", PID))["id"] == PID
    finally:
        traces.disable()
    spans = exporter.get_finished_spans()
    assert "EHR GET Patient" in {s.name for s in spans}
    assert PID not in repr([(s.name, dict(s.attributes or {})) for s in spans])  # never the URL
