"""The write-back worker against a real FHIR server (tests/fhir_server.py: Medplum on node over
loopback HTTP, SMART auth, fault injection) and both databases. Nothing mocks HTTP.

Time: the app and the in-process worker share a settable clock, so backoffs are stepped over
rather than waited for; the subprocess tests (kill, real `iectox worker`) use short configured
leases and backoffs and only poll for an end state.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import pytest_asyncio
from sqlalchemy import Engine, delete, text, update
from sqlmodel import Session, col, select

from service.api.app import create_app
from service.config import FhirServerConfig
from service.config.settings import Settings
from service.devtools.synth import generate_patient
from service.ehr.worker import Totals, Worker, backoff_s, check_response, classify
from service.fhir.writeback import transaction_bundles, writeback_id_system
from service.storage import outbox
from service.storage.models import OutboxRow
from tests import factories as f
from tests.auth import bearer
from tests.conftest import PG_URL
from tests.fhir_server import FhirTestServer
from tests.fhir_validators import assert_valid_fhir

AT = "2026-01-06T12:00:00+00:00"
BASE = f.BASE
RA_SYSTEM = writeback_id_system(BASE)
BUSINESS_SYSTEM = f"{BASE}/identifier/risk-assessment"
POLL_LIMIT_S = 120.0  # upper bound for subprocess end states (never a timing assertion)
# Read timeout of the in-process workers' EHR client (the FhirServerConfig maximum; default 15 s).
# Deliveries are not retried by the client (max_retries=0) and a timed-out transaction may still
# be written by the server, so a timeout would fail the exactly-once checks below for a reason
# that is not the code's: the Node server, one thread serving several concurrent transactions
# that slow down as its repository grows, can take longer than 15 s per answer on a loaded
# machine. The workers wait for it instead; a limit, never a timing assertion.
DELIVERY_TIMEOUT_S = 600.0


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime.now(UTC).replace(microsecond=0))


def wb_settings(base: Settings, server_config: FhirServerConfig, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "writeback_target": "ehr",
        "ehr_servers": {"ehr": server_config},
        "outbox_backoff_base_s": 10.0,
        "outbox_backoff_max_s": 1000.0,
        "outbox_backoff_jitter": 0.0,
        "outbox_max_attempts": 4,
        "outbox_lease_s": 60.0,
        "outbox_batch_size": 10,
    }
    return base.model_copy(update={**values, **overrides})


@pytest.fixture
def server(fhir_server_clean: FhirTestServer) -> FhirTestServer:
    return fhir_server_clean


@pytest.fixture
def wsettings(request: pytest.FixtureRequest, settings: Settings, server: FhirTestServer) -> Settings:
    """Write-back settings; the mode is the default ("conditional") unless parametrized indirectly."""
    mode = getattr(request, "param", None)
    config = server.server_config(timeout_s=DELIVERY_TIMEOUT_S)
    return wb_settings(settings, config, **({"writeback_mode": mode} if mode else {}))


@pytest_asyncio.fixture
async def api(wsettings: Settings, clean_engine: Engine, clock: Clock) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(wsettings, engine=clean_engine, clock=clock)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://iectox.test", headers=bearer()) as c:
        yield c


def resources(pid: str) -> list[dict[str, Any]]:
    ref = f"Patient/{pid}"
    return [
        f.patient(pid),
        f.administration(f.local("cart-infusion"), at="2026-01-03T10:00:00+00:00", status="completed",
                         id=f"{pid}-cart", subject=ref),
        f.temperature(38.6, "2026-01-06T10:00:00+00:00", id=f"{pid}-t1", subject=ref),
        f.bp_panel(85, 60, "2026-01-06T10:00:00+00:00", id=f"{pid}-bp1", subject=ref),
        f.administration("norepinephrine", start="2026-01-06T09:00:00+00:00", rate=(5, "ug/min"),
                         id=f"{pid}-ne1", subject=ref),
        f.ice_score(8, "2026-01-06T10:00:00+00:00", id=f"{pid}-ice1", subject=ref),
    ]  # fmt: skip


async def evaluate(api: httpx.AsyncClient, pid: str, at: str = AT, store_inputs: bool = True) -> list[str]:
    """Store a patient's inputs, evaluate and store; the ids of the RiskAssessments."""
    bundle = await evaluate_bundle(api, pid, at, store_inputs)
    return [e["resource"]["id"] for e in bundle["entry"] if e["resource"]["resourceType"] == "RiskAssessment"]


async def evaluate_bundle(api: httpx.AsyncClient, pid: str, at: str = AT, store_inputs: bool = True) -> dict[str, Any]:
    if store_inputs:
        entries = [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
            for r in resources(pid)
        ]
        body = orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries})
        assert (await api.post("/fhir", content=body)).status_code == 200
    r = await api.post(f"/fhir/Patient/{pid}/$evaluate", params={"at": at})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def rows(engine: Engine) -> list[OutboxRow]:
    with Session(engine) as s:
        return list(s.exec(select(OutboxRow).order_by(col(OutboxRow.id))).all())


def search(server: FhirTestServer, rtype: str, **params: str) -> list[dict[str, Any]]:
    resp = httpx.get(
        f"{server.base_url}/{rtype}", params={**params, "_count": "1000"}, headers=server.headers(), timeout=30
    )
    resp.raise_for_status()
    return [e["resource"] for e in resp.json().get("entry") or []]


def assert_exactly_once(server: FhirTestServer, ra_ids: list[str], pid: str) -> list[dict[str, Any]]:
    """Each RiskAssessment is on the server exactly once, and nothing else is for this patient.

    All of the patient's RiskAssessments come back in one search (a duplicate has the same
    subject); each write-back identifier occurs exactly once among them, and a search by
    identifier finds exactly one for a sample of them. Returned in the order of `ra_ids`.
    """
    ra_ids = list(dict.fromkeys(ra_ids))  # score time points can be shared by two evaluations
    on_server = search(server, "RiskAssessment", subject=f"Patient/{pid}")
    by_key: dict[str, list[dict[str, Any]]] = {}
    for r in on_server:
        [key] = [i["value"] for i in r["identifier"] if i["system"] == RA_SYSTEM]
        by_key.setdefault(key, []).append(r)
    assert sorted(by_key) == sorted(ra_ids)
    assert all(len(v) == 1 for v in by_key.values()), {k: len(v) for k, v in by_key.items() if len(v) > 1}
    business = [i["value"] for r in on_server for i in r["identifier"] if i["system"] == BUSINESS_SYSTEM]
    assert len(business) == len(set(business)) == len(ra_ids)
    for rid in ra_ids[:: max(1, len(ra_ids) // 4)]:
        assert [r["id"] for r in search(server, "RiskAssessment", identifier=f"{RA_SYSTEM}|{rid}")] == [
            by_key[rid][0]["id"]
        ]
    return [by_key[rid][0] for rid in ra_ids]


def provenances_for(server: FhirTestServer, server_ids: set[str]) -> list[dict[str, Any]]:
    return [
        p
        for p in search(server, "Provenance")
        if {t["reference"].removeprefix("RiskAssessment/") for t in p["target"]} & server_ids
    ]


def transaction_posts(server: FhirTestServer) -> int:
    return sum(1 for e in server.stats()["log"] if e["method"] == "POST" and e["path"] in ("/fhir", "/fhir/"))


# --- pure parts -----------------------------------------------------------------------------------


def test_backoff_is_exponential_capped_and_jittered(settings: Settings) -> None:
    s = settings.model_copy(
        update={"outbox_backoff_base_s": 2.0, "outbox_backoff_max_s": 60.0, "outbox_backoff_jitter": 0.5}
    )
    assert [backoff_s(n, s, lambda: 0.0) for n in (1, 2, 3, 4, 5, 6, 7)] == [2, 4, 8, 16, 32, 60, 60]
    assert backoff_s(3, s, lambda: 1.0) == 4.0  # up to half taken off
    assert backoff_s(10_000, s, lambda: 0.0) == 60.0


def test_classification_and_response_checks() -> None:
    from service.ehr.errors import FhirAuthError, FhirHttpError, FhirUnavailable
    from service.ehr.worker import EntryFailed

    assert classify(FhirHttpError(503, retryable=True)) == ("HTTP 503", True)
    assert classify(FhirHttpError(429, retryable=True)) == ("HTTP 429", True)
    assert classify(FhirHttpError(409, retryable=False)) == ("HTTP 409", True)
    assert classify(FhirHttpError(422, retryable=False)) == ("HTTP 422", False)
    assert classify(FhirHttpError(400, retryable=False)) == ("HTTP 400", False)
    assert classify(FhirAuthError(400, error="invalid_client")) == ("auth HTTP 400", True)
    assert classify(EntryFailed(412)) == ("entry HTTP 412", True)
    assert classify(EntryFailed(400)) == ("entry HTTP 400", False)
    try:
        raise FhirUnavailable("POST transaction: ConnectError after 1 attempts") from ConnectionRefusedError()
    except FhirUnavailable as exc:
        assert classify(exc) == ("FhirUnavailable (ConnectionRefusedError)", True)
    req = {"entry": [{}, {}]}

    def answer(*statuses: str) -> dict[str, Any]:
        return {"resourceType": "Bundle", "entry": [{"response": {"status": st}} for st in statuses]}

    check_response(req, answer("201 Created", "200"))
    with pytest.raises(EntryFailed):
        check_response(req, answer("200", "400 Bad Request"))
    with pytest.raises(Exception, match="entry count"):
        check_response(req, {"resourceType": "Bundle", "entry": []})


# --- delivery -------------------------------------------------------------------------------------


def assert_provenances(server: FhirTestServer, found: list[dict[str, Any]], n_bundles: int, mode: str) -> None:
    """The RiskAssessments `found` on the server are each the target of exactly one Provenance of
    theirs: one Provenance per evaluation in mode "id", one per Bundle in mode "conditional"."""
    server_refs = {f"RiskAssessment/{r['id']}" for r in found}
    provs = provenances_for(server, {r["id"] for r in found})
    assert len(provs) == (1 if mode == "id" else n_bundles)
    targets = [t["reference"] for p in provs for t in p["target"]]
    assert sorted(targets) == sorted(server_refs)


@pytest.mark.asyncio
@pytest.mark.parametrize("wsettings", ["conditional", "id"], indirect=True)
async def test_delivery_creates_each_assessment_once_and_redelivery_updates(
    api: httpx.AsyncClient, clean_engine: Engine, server: FhirTestServer, wsettings: Settings, clock: Clock
) -> None:
    mode = wsettings.writeback_mode
    ra_ids = await evaluate(api, "p1")
    n = len(rows(clean_engine))
    # conditional (default): Bundles of 7 RiskAssessments + a Provenance; id: 8 entries, Provenance last
    assert n == (-(-len(ra_ids) // 7) if mode == "conditional" else -(-(len(ra_ids) + 1) // 8)) > 1
    async with Worker(wsettings, clean_engine, clock=clock) as worker:
        t = await worker.drain()
        assert (t.delivered, t.retried, t.dead, t.lost_lease) == (n, 0, 0, 0)
        assert all(
            (r.status, r.attempts, r.claimed_until, r.last_error) == ("delivered", 0, None, "")
            for r in rows(clean_engine)
        )
        first = assert_exactly_once(server, ra_ids, "p1")
        server_ids = {r["id"] for r in first}
        if mode == "id":
            assert server_ids == set(ra_ids)  # the EHR copies keep our deterministic ids
        else:
            assert not server_ids & set(ra_ids)  # the server assigned its own
        assert_provenances(server, first, n, mode)
        assert all(r["meta"]["versionId"] for r in first)

        # the same rows again (e.g. the worker died after the POST, before marking)
        with Session(clean_engine) as s:
            s.exec(update(OutboxRow).values(status="pending", delivered_at=None))
            s.commit()
        assert (await worker.drain()).delivered == n
        again = assert_exactly_once(server, ra_ids, "p1")
        assert {r["id"] for r in again} == server_ids  # updated in place
        assert all(a["meta"]["versionId"] != b["meta"]["versionId"] for a, b in zip(first, again, strict=True))

        # a re-evaluation at the same `at`: new rows, the same resources updated
        assert await evaluate(api, "p1", store_inputs=False) == ra_ids
        assert (await worker.drain()).delivered == n
        found = assert_exactly_once(server, ra_ids, "p1")
        assert {r["id"] for r in found} == server_ids
        assert_provenances(server, found, n, mode)

        # another `at`: new resources next to the old ones
        later = await evaluate(api, "p1", at="2026-01-06T13:00:00+00:00", store_inputs=False)
        n_later = len(rows(clean_engine)) - 2 * n
        assert (await worker.drain()).delivered == n_later
        assert_exactly_once(server, ra_ids + later, "p1")
    assert len(search(server, "Provenance")) == (2 if mode == "id" else n + n_later)
    assert transaction_posts(server) == 3 * n + n_later


@pytest.mark.asyncio
async def test_conditional_mode_updates_by_identifier_and_rewrites_provenance_targets(
    api: httpx.AsyncClient, clean_engine: Engine, server: FhirTestServer, wsettings: Settings, clock: Clock
) -> None:
    evaluation = [e["resource"] for e in (await evaluate_bundle(api, "p1"))["entry"]]
    with Session(clean_engine) as s:  # drop the rows of this evaluation: hand-made Bundles below
        s.exec(delete(OutboxRow))
        s.commit()
    # One Bundle of 3 RiskAssessments + the Provenance (which then keeps its id).
    assessments = [r for r in evaluation if r["resourceType"] == "RiskAssessment"][:3]
    [prov] = [r for r in evaluation if r["resourceType"] == "Provenance"]
    prov = {**prov, "target": [{"reference": f"RiskAssessment/{a['id']}"} for a in assessments]}
    [bundle] = transaction_bundles([*assessments, prov], BASE, mode="conditional")
    with Session(clean_engine) as s:
        for _ in range(2):  # delivered twice: the second updates
            outbox.enqueue(s, "p1", "ehr", bundle, clock())
        s.commit()
    async with Worker(wsettings, clean_engine, clock=clock) as worker:
        assert (await worker.drain()).delivered == 2
    ra_ids = [a["id"] for a in assessments]
    found = assert_exactly_once(server, ra_ids, "p1")
    server_ids = {r["id"] for r in found}
    assert not server_ids & set(ra_ids)  # the server assigned its own ids
    assert all(r["meta"]["versionId"] for r in found)
    [on_server] = search(server, "Provenance")
    assert on_server["id"] == prov["id"]
    assert {t["reference"] for t in on_server["target"]} == {f"RiskAssessment/{i}" for i in server_ids}

    # why Bundles of at most 8: a whole evaluation in ONE conditional Bundle is too large for
    # Medplum's conditional transactions: rejected (400), dead at once
    [full] = transaction_bundles(evaluation, BASE, mode="conditional", max_entries=len(evaluation))
    assert len(full["entry"]) == len(evaluation) > 8
    with Session(clean_engine) as s:
        outbox.enqueue(s, "p1", "ehr", full, clock())
        s.commit()
    async with Worker(wsettings, clean_engine, clock=clock) as worker:
        assert (await worker.drain()).dead == 1
    assert rows(clean_engine)[-1].last_error == "HTTP 400"


@pytest.mark.asyncio
async def test_backoff_attempt_counting_and_dead_letter(
    api: httpx.AsyncClient, clean_engine: Engine, server: FhirTestServer, wsettings: Settings, clock: Clock
) -> None:
    ra_ids = await evaluate(api, "p1")
    n = len(rows(clean_engine))  # Bundles per evaluation (several: at most 8 entries each)
    assert n > 1
    server.inject_fault(503, count=2, method="POST", path="")  # transactions only (not the token endpoint)
    async with Worker(wsettings, clean_engine, clock=clock) as worker:
        t0 = clock()
        assert (await worker.cycle()).retried == 1  # the patient's first row only: in order
        row, *later = rows(clean_engine)
        assert (row.status, row.attempts, row.last_error, row.claimed_until) == ("pending", 1, "HTTP 503", None)
        assert outbox.utc(row.next_attempt_at) == t0 + timedelta(seconds=10)
        assert all((r.status, r.attempts, r.claimed_until) == ("pending", 0, None) for r in later)
        clock.advance(9)
        assert (await worker.cycle()).claimed == 0  # not due yet, and it holds the patient's later rows back
        clock.advance(1)
        assert (await worker.cycle()).retried == 1
        row = rows(clean_engine)[0]
        assert (row.attempts, outbox.utc(row.next_attempt_at)) == (2, clock() + timedelta(seconds=20))
        clock.advance(20)
        t = await worker.cycle()
        assert (t.claimed, t.delivered) == (1, 1)
        row = rows(clean_engine)[0]
        assert (row.status, row.attempts, row.last_error) == ("delivered", 2, "")
        assert (await worker.drain()).delivered == n - 1
        assert all(r.attempts == 0 for r in rows(clean_engine)[1:])
        assert_exactly_once(server, ra_ids, "p1")

        # dead after outbox_max_attempts (4) retryable failures
        await evaluate(api, "p1", store_inputs=False)
        server.inject_fault(500, count=4, method="POST", path="")
        totals = Totals()
        for _ in range(4):
            totals.add(await worker.cycle())
            clock.advance(1000)
        assert (totals.retried, totals.dead, totals.delivered) == (3, 1, 0)
        dead_500 = rows(clean_engine)[n]
        assert (dead_500.status, dead_500.attempts, dead_500.last_error) == ("dead", 4, "HTTP 500")
        assert (await worker.drain()).delivered == n - 1  # a dead row does not hold the later ones back

        # a Bundle the server rejects (4xx): dead at once
        await evaluate(api, "p1", store_inputs=False)
        server.inject_fault(422, count=1, method="POST", path="")
        t = await worker.cycle()
        assert (t.claimed, t.dead) == (1, 1)
        dead_422 = rows(clean_engine)[2 * n]
        assert (dead_422.status, dead_422.attempts, dead_422.last_error) == ("dead", 1, "HTTP 422")
        assert (await worker.drain()).delivered == n - 1

        # the metrics show them; requeued, they are delivered (and still never duplicate)
        metrics = (await api.get("/metrics")).text
        assert 'iectox_outbox_rows{status="dead"} 2\n' in metrics
        assert outbox.requeue_dead(clean_engine, clock()) == 2
        assert (await worker.drain()).delivered == 2
    assert all(r.status == "delivered" for r in rows(clean_engine))
    assert_exactly_once(server, ra_ids, "p1")


@pytest.mark.asyncio
async def test_unreachable_server_backs_off_and_keeps_the_row(
    api: httpx.AsyncClient, clean_engine: Engine, settings: Settings, server: FhirTestServer, clock: Clock
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = wb_settings(settings, server.server_config(base_url=f"http://127.0.0.1:{port}/fhir"))
    await evaluate(api, "p1")
    async with Worker(down, clean_engine, clock=clock) as worker:
        for _ in range(3):
            assert (await worker.cycle()).retried == 1
            clock.advance(1000)
    row, *later = rows(clean_engine)
    assert (row.status, row.attempts) == ("pending", 3)
    assert row.last_error.startswith("FhirUnavailable")
    assert later and all((r.status, r.attempts) == ("pending", 0) for r in later)  # held back, in order


@pytest.mark.asyncio
async def test_two_workers_deliver_every_row_once(
    api: httpx.AsyncClient, clean_engine: Engine, server: FhirTestServer, wsettings: Settings, clock: Clock
) -> None:
    # Evaluations split into Bundles of at most 8 entries (the default): several rows per patient,
    # delivered in order.
    patients = [f"w{i}" for i in range(6)]
    ids = {pid: await evaluate(api, pid) for pid in patients}
    n_rows = len(rows(clean_engine))
    assert n_rows > 2 * len(patients)
    s = wsettings.model_copy(update={"outbox_batch_size": 3})
    async with Worker(s, clean_engine, clock=clock) as a, Worker(s, clean_engine, clock=clock) as b:
        ta, tb = await asyncio.gather(a.drain(), b.drain())
    assert ta.delivered + tb.delivered == n_rows
    assert ta.lost_lease == tb.lost_lease == ta.dead == tb.dead == 0
    assert transaction_posts(server) == n_rows  # no row was delivered twice
    assert all(r.status == "delivered" for r in rows(clean_engine))
    for pid in patients:
        found = assert_exactly_once(server, ids[pid], pid)
        assert_provenances(server, found, n_rows // len(patients), "conditional")
    assert len(search(server, "Provenance")) == n_rows  # one per Bundle


class WorkerDied(BaseException):
    """The worker process dying: not an Exception, so nothing in the worker handles it."""


@pytest.mark.asyncio
@pytest.mark.parametrize("wsettings", ["conditional", "id"], indirect=True)
async def test_ehr_committed_but_worker_died_before_marking_is_delivered_once(
    api: httpx.AsyncClient,
    clean_engine: Engine,
    server: FhirTestServer,
    wsettings: Settings,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The hardest case: the EHR has committed the transaction, and the worker dies before it
    # marks the row delivered. The row stays leased; after the lease another worker delivers it
    # again, and the write-back ids (id mode) or identifiers (conditional mode) keep it once.
    ids = await evaluate(api, "d1")
    n_rows = len(rows(clean_engine))

    def die(*_: Any) -> bool:
        raise WorkerDied

    with monkeypatch.context() as m:
        m.setattr(outbox, "mark_delivered", die)
        with pytest.raises(WorkerDied):
            async with Worker(wsettings, clean_engine, clock=clock) as first:
                await first.drain()
    assert transaction_posts(server) == 1  # committed on the EHR ...
    assert all(r.status == "pending" for r in rows(clean_engine))  # ... never marked
    clock.advance(wsettings.outbox_lease_s + 1)
    async with Worker(wsettings, clean_engine, clock=clock) as second:
        t = await second.drain()
    assert (t.delivered, t.dead) == (n_rows, 0)
    assert transaction_posts(server) == n_rows + 1  # the first Bundle twice
    found = assert_exactly_once(server, ids, "d1")
    assert_provenances(server, found, n_rows, wsettings.writeback_mode)


@pytest.mark.asyncio
async def test_outage_nothing_lost_every_assessment_arrives_once(
    api: httpx.AsyncClient, clean_engine: Engine, server: FhirTestServer, wsettings: Settings, clock: Clock
) -> None:
    server.stop()
    patients = [f"o{i}" for i in range(4)]
    ids = {pid: await evaluate(api, pid) for pid in patients}
    table = rows(clean_engine)
    firsts = {min(r.id for r in table if r.patient_id == pid) for pid in patients}
    s = wsettings.model_copy(update={"outbox_max_attempts": 50})
    async with Worker(s, clean_engine, clock=clock) as worker:
        for _ in range(3):
            t = await worker.drain()
            assert (t.retried, t.delivered, t.dead) == (len(patients), 0, 0)  # each patient's first row
            clock.advance(1000)
        assert all(r.status == "pending" and r.attempts == (3 if r.id in firsts else 0) for r in rows(clean_engine))
        server.start()  # same port, empty repository, earlier access tokens forgotten
        t = await worker.drain()
    assert (t.delivered, t.dead) == (len(table), 0)
    assert all(r.status == "delivered" for r in rows(clean_engine))
    for pid in patients:
        found = assert_exactly_once(server, ids[pid], pid)
        assert_provenances(server, found, len(table) // len(patients), "conditional")


@pytest.mark.asyncio
async def test_full_evaluation_in_conditional_mode_arrives_in_several_bundles_once(
    clean_engine: Engine, server: FhirTestServer, wsettings: Settings, clock: Clock
) -> None:
    # The defaults: conditional updates on the write-back identifier, Bundles of at most 8 entries.
    assert (wsettings.writeback_mode, wsettings.writeback_max_bundle_entries) == ("conditional", 8)
    s = wsettings.model_copy(update={"max_body_bytes": 50_000_000, "max_bundle_entries": 5000})
    start = datetime(2026, 1, 5, tzinfo=UTC)
    sp = generate_patient(random.Random(1), 0, "crs-3", days=9, base=BASE, start=start)  # noqa: S311
    pid, inputs = sp.patient_id, [e["resource"] for e in sp.bundle["entry"]]
    app = create_app(s, engine=clean_engine, clock=clock)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://iectox.test", headers=bearer()
    ) as api:
        entries = [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in inputs
        ]
        body = orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries})
        assert (await api.post("/fhir", content=body)).status_code == 200
        r = await api.post(f"/fhir/Patient/{pid}/$evaluate", params={"at": (start + timedelta(days=10)).isoformat()})
        assert r.status_code == 200, r.text
    evaluation = [e["resource"] for e in r.json()["entry"]]
    ra_ids = [x["id"] for x in evaluation if x["resourceType"] == "RiskAssessment"]
    [local_prov] = [x for x in evaluation if x["resourceType"] == "Provenance"]
    assert len(evaluation) >= 40  # every scale, course and score
    bundles = [orjson.loads(row.body) for row in rows(clean_engine)]
    n = len(bundles)
    assert n == -(-len(ra_ids) // 7) > 5 and all(len(b["entry"]) <= 8 for b in bundles)
    prov_ids = {str(uuid.uuid5(uuid.NAMESPACE_URL, f"{local_prov['id']}/part/{k}")) for k in range(n)}

    async def deliver() -> None:
        async with Worker(s, clean_engine, clock=clock) as worker:
            t = await worker.drain()
        assert (t.delivered, t.retried, t.dead, t.lost_lease) == (n, 0, 0, 0), t.errors
        assert all(row.status == "delivered" for row in rows(clean_engine))

    def check() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        # exactly one copy of each RiskAssessment, by its write-back identifier
        found = []
        for rid in ra_ids:
            hits = search(server, "RiskAssessment", identifier=f"{RA_SYSTEM}|{rid}")
            assert len(hits) == 1, (rid, len(hits))
            found.append(hits[0])
        assert len(search(server, "RiskAssessment", subject=f"Patient/{pid}")) == len(ra_ids)
        # one Provenance per Bundle; their targets are RiskAssessments on the server, each in one
        provs = search(server, "Provenance")
        assert {p["id"] for p in provs} == prov_ids
        targets = [t["reference"] for p in provs for t in p["target"]]
        assert sorted(targets) == sorted(f"RiskAssessment/{x['id']}" for x in found)
        for ref in targets:
            resp = httpx.get(f"{server.base_url}/{ref}", headers=server.headers(), timeout=30)
            assert resp.status_code == 200 and resp.json()["resourceType"] == "RiskAssessment", ref
        return found, provs

    await deliver()
    found, provs = check()
    assert not {x["id"] for x in found} & set(ra_ids)  # server-assigned ids, resolved in each Bundle
    assert_valid_fhir([*found, *provs])

    # every Bundle delivered again (a worker that died after the POSTs): updated, nothing added
    with Session(clean_engine) as session:
        session.exec(update(OutboxRow).values(status="pending", delivered_at=None))
        session.commit()
    await deliver()
    again, _ = check()
    assert [x["id"] for x in again] == [x["id"] for x in found]
    assert transaction_posts(server) == 2 * n


# --- the real process: SIGKILL mid-delivery, restart, SIGTERM -------------------------------------


def subprocess_db_url(engine: Engine) -> str:
    if engine.dialect.name == "sqlite":
        return engine.url.render_as_string(hide_password=False)
    with engine.connect() as conn:
        schema = conn.execute(text("SELECT current_schema()")).scalar_one()
    return f"{PG_URL}?options=-csearch_path%3D{schema}"


def start_worker(engine: Engine, server: FhirTestServer, log: Path) -> subprocess.Popen[bytes]:
    # Lease (5 s) above one request's time (3 s + 1 s connect): a re-delivery never overlaps a
    # request of the killed worker that the server still holds (docs/writeback.md).
    cfg = server.server_config(timeout_s=3.0, connect_timeout_s=1.0).model_dump(mode="json")
    env = {
        **os.environ,
        "IECTOX_DATABASE_URL": subprocess_db_url(engine),
        "IECTOX_EHR_SERVERS": orjson.dumps({"ehr": cfg}).decode(),
        "IECTOX_WRITEBACK_TARGET": "ehr",
        "IECTOX_OUTBOX_LEASE_S": "5",
        "IECTOX_OUTBOX_POLL_INTERVAL_S": "0.1",
        "IECTOX_OUTBOX_BACKOFF_BASE_S": "0.1",
        "IECTOX_OUTBOX_BACKOFF_MAX_S": "0.5",
        "IECTOX_OUTBOX_MAX_ATTEMPTS": "100",
        "IECTOX_AUTO_MIGRATE": "false",
    }
    iectox = Path(sys.executable).with_name("iectox")
    with log.open("ab") as out:
        return subprocess.Popen([str(iectox), "worker"], env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL)


def wait_for(cond: Callable[[], bool], what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + POLL_LIMIT_S
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the worker exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.integration  # runs `iectox worker` processes
@pytest.mark.asyncio
async def test_worker_killed_mid_delivery_then_restarted_delivers_exactly_once(
    api: httpx.AsyncClient, clean_engine: Engine, server: FhirTestServer, clock: Clock, tmp_path: Path
) -> None:
    clock.now = datetime.now(UTC) - timedelta(seconds=1)  # the subprocess runs on the real clock: rows due
    patients = ["k1", "k2", "k3"]
    ids = {pid: await evaluate(api, pid) for pid in patients}
    # Every transaction is held 2 s by the server before it is processed.
    server.inject_fault(None, delay_ms=2000, count=len(patients), method="POST", path="")
    log = tmp_path / "worker.log"
    first = start_worker(clean_engine, server, log)
    try:
        wait_for(lambda: server.stats()["faults_served"] >= 1, "a delivery in flight", first)
        first.send_signal(signal.SIGKILL)  # mid-delivery: rows leased, nothing marked
        assert first.wait(timeout=30) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=30)
    # the first row of each patient leased (claimed together, before any delivery), the later ones
    # held back behind it
    table = rows(clean_engine)
    firsts = {min(r.id for r in table if r.patient_id == pid) for pid in patients}
    assert len(table) > len(patients)
    assert all(r.status == "pending" and (r.claimed_until is not None) == (r.id in firsts) for r in table)
    # The server may still run the killed worker's held transactions (it does for those whose body
    # it had read): written on the EHR but never marked, so delivered again below.

    second = start_worker(clean_engine, server, log)
    try:
        wait_for(lambda: all(r.status == "delivered" for r in rows(clean_engine)), "every row delivered", second)
        second.send_signal(signal.SIGTERM)  # graceful stop
        assert second.wait(timeout=60) == 0
    finally:
        if second.poll() is None:
            second.kill()
            second.wait(timeout=30)
    output = log.read_text()
    for pid in patients:
        assert pid not in output  # logs carry no patient ids
        found = assert_exactly_once(server, ids[pid], pid)
        assert_provenances(server, found, len(table) // len(patients), "conditional")
    assert "worker: stopping" in output
