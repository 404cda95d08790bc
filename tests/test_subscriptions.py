"""Subscription notifications (POST /fhir/$subscription-notification) and the reconciliation poll
(service/ehr/poll.py), against the real FHIR test server (tests/fhir_server.py) over loopback
HTTP and both databases. Nothing mocks HTTP.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import pytest_asyncio
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from service.api.app import create_app
from service.codebook import Codebook, load_codebook
from service.config.settings import Settings
from service.ehr.client import FhirClient
from service.ehr.notifications import EVENT, HANDSHAKE, HEARTBEAT, parse_notification
from service.ehr.poll import reconcile_once, run_poll, watched
from service.storage.db import make_engine, migrate
from service.storage.models import EmittedResource, OutboxRow, StoredResource, WatchedPatient
from tests import factories as f
from tests.auth import bearer
from tests.conftest import FIXED_NOW
from tests.fhir_server import FhirTestServer

URL = "/fhir/$subscription-notification"
TOPIC = "http://hospital.example/SubscriptionTopic/observation-created"
T = "2026-01-06T10:00:00+00:00"


def clock() -> datetime:
    return FIXED_NOW


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture
def ehr(fhir_server_clean: FhirTestServer) -> FhirTestServer:
    return fhir_server_clean


@pytest.fixture
def ssettings(settings: Settings, ehr: FhirTestServer) -> Settings:
    return settings.model_copy(
        update={"ehr_servers": {"default": ehr.server_config(max_retries=0)}, "writeback_target": "default"}
    )


@pytest.fixture
def codebook(ssettings: Settings) -> Codebook:
    return load_codebook(ssettings.canonical_base, ssettings.codebook_path)


@pytest_asyncio.fixture
async def api(ssettings: Settings, clean_engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(ssettings, engine=clean_engine, clock=clock)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://iectox.test", headers=bearer()
    ) as c:
        yield c


# --- data -------------------------------------------------------------------------------------------


def patient_resources(pid: str) -> list[dict[str, Any]]:
    """CRS grade 2 at T (fever, hypotension without vasopressor, room air); ICANS 0."""
    ref = f"Patient/{pid}"
    return [
        f.patient(pid),
        f.administration(f.local("cart-infusion"), at="2026-01-03T10:00:00+00:00", status="completed",
                         id=f"{pid}-cart", subject=ref),
        f.temperature(38.6, T, id=f"{pid}-t1", subject=ref),
        f.bp_panel(85, 60, T, id=f"{pid}-bp1", subject=ref),
        f.oxygen_device("none", T, id=f"{pid}-o2", subject=ref),
        f.ice_score(10, T, id=f"{pid}-ice1", subject=ref),
    ]  # fmt: skip


def status_parameters(kind: str, *focus: str, events_since_start: int = 1, first_event: int = 1) -> dict[str, Any]:
    """A backport (R4) SubscriptionStatus as Parameters."""
    params: list[dict[str, Any]] = [
        {"name": "subscription", "valueReference": {"reference": "Subscription/sub-1"}},
        {"name": "topic", "valueCanonical": TOPIC},
        {"name": "status", "valueCode": "active"},
        {"name": "type", "valueCode": kind},
        {"name": "events-since-subscription-start", "valueString": str(events_since_start)},
    ]
    for n, ref in enumerate(focus, start=first_event):
        params.append(
            {
                "name": "notification-event",
                "part": [
                    {"name": "event-number", "valueString": str(n)},
                    {"name": "timestamp", "valueInstant": "2026-01-06T10:05:00Z"},
                    {"name": "focus", "valueReference": {"reference": ref}},
                ],
            }
        )
    return {"resourceType": "Parameters", "id": str(uuid.uuid4()), "parameter": params}


def notification(kind: str, *focus: str, resources: list[dict[str, Any]] | None = None, **kw: Any) -> dict[str, Any]:
    """A backport notification Bundle (type history, the SubscriptionStatus first)."""
    status = status_parameters(kind, *focus, **kw)
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": f"urn:uuid:{status['id']}",
            "resource": status,
            "request": {"method": "GET", "url": "Subscription/sub-1/$status"},
            "response": {"status": "200"},
        }
    ]
    for r in resources or ():
        entries.append(
            {
                "fullUrl": f"http://ehr.example/fhir/{r['resourceType']}/{r['id']}",
                "resource": r,
                "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
                "response": {"status": "201"},
            }
        )
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "history",
        "timestamp": "2026-01-06T10:05:00Z",
        "entry": entries,
    }


def count(engine: Engine, model: Any, **where: Any) -> int:
    with Session(engine) as s:
        q = select(model)
        for k, v in where.items():
            q = q.where(getattr(model, k) == v)
        return len(s.exec(q).all())


def outbox_ids(engine: Engine) -> list[int | None]:
    with Session(engine) as s:
        return [r.id for r in s.exec(select(OutboxRow).order_by(col(OutboxRow.id))).all()]


def watch_row(engine: Engine, pid: str, target: str = "default") -> WatchedPatient | None:
    with Session(engine) as s:
        return s.get(WatchedPatient, (target, pid))


def fhir_calls(server: FhirTestServer) -> list[dict[str, Any]]:
    return [e for e in server.stats()["log"] if e["path"].startswith("/fhir/") and "/.well-known/" not in e["path"]]


def assert_informational(resp: httpx.Response, *words: str) -> str:
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert doc["resourceType"] == "OperationOutcome"
    assert [i["severity"] for i in doc["issue"]] == ["information"]
    text: str = doc["issue"][0]["diagnostics"]
    for w in words:
        assert w in text, (w, text)
    return text


async def post(api: httpx.AsyncClient, body: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return await api.post(URL, content=content, headers={"Content-Type": "application/fhir+json"})


# --- pure parsing -----------------------------------------------------------------------------------


def test_parse_backport_and_classic() -> None:
    n = parse_notification(notification(HANDSHAKE, events_since_start=0))
    assert (n.kind, n.patient_ids, n.focus) == (HANDSHAKE, set(), [])
    n = parse_notification(notification(HEARTBEAT))
    assert n.kind == HEARTBEAT
    n = parse_notification(notification(EVENT, "Observation/o1", "http://ehr.example/fhir/Patient/p2/_history/3"))
    assert (n.kind, n.patient_ids, n.focus, n.events) == (EVENT, {"p2"}, ["Observation/o1"], 2)
    # full-resource payload: the focus is in the Bundle, its patient is taken from it
    obs = f.temperature(38.0, T, id="o9", subject="Patient/p9")
    n = parse_notification(notification(EVENT, "http://ehr.example/fhir/Observation/o9", resources=[obs]))
    assert (n.patient_ids, n.focus) == ({"p9"}, [])
    # R4B/R5 SubscriptionStatus resource
    status = {
        "resourceType": "SubscriptionStatus",
        "type": "event-notification",
        "notificationEvent": [{"eventNumber": "1", "focus": {"reference": "Observation/o3"}}],
    }
    n = parse_notification({"resourceType": "Bundle", "type": "history", "entry": [{"resource": status}]})
    assert (n.kind, n.focus) == (EVENT, ["Observation/o3"])
    # classic rest-hook: one resource, or a Bundle of changed resources
    n = parse_notification(f.temperature(38.0, T, id="o4", subject="Patient/p4"))
    assert (n.kind, n.patient_ids) == (EVENT, {"p4"})
    n = parse_notification(f.bundle(f.patient("p5"), f.ice_score(9, T, subject="Patient/p6")))
    assert (n.kind, n.patient_ids) == (EVENT, {"p5", "p6"})


# --- handshake, heartbeat, ping ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_handshake_heartbeat_and_ping(api: httpx.AsyncClient, ehr: FhirTestServer, clean_engine: Engine) -> None:
    assert_informational(await post(api, notification(HANDSHAKE, events_since_start=0)), "handshake")
    assert_informational(await post(api, notification(HEARTBEAT, events_since_start=4)), "heartbeat")
    assert_informational(await api.post(URL), "ping")  # classic R4 rest-hook without payload
    assert_informational(await api.post(URL, content=b"  \n"), "ping")
    assert fhir_calls(ehr) == []  # nothing was read from the EHR
    assert count(clean_engine, WatchedPatient) == count(clean_engine, OutboxRow) == 0


@pytest.mark.asyncio
async def test_notification_needs_a_token(api: httpx.AsyncClient) -> None:
    r = await api.post(URL, content=orjson.dumps(notification(HEARTBEAT)), headers={"Authorization": ""})
    assert r.status_code == 401 and r.json()["resourceType"] == "OperationOutcome"
    r = await api.post(URL, content=b"{}", headers=bearer("system/Observation.read"))
    assert r.status_code == 403


# --- events -----------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_backport_event_syncs_evaluates_and_enqueues(
    api: httpx.AsyncClient, ehr: FhirTestServer, clean_engine: Engine
) -> None:
    ehr.seed(patient_resources("s1"))
    r = await post(api, notification(EVENT, f"{ehr.base_url}/Observation/s1-t1"))
    assert_informational(r, "1 patients synchronised", "1 new evaluations")
    # read from the EHR, stored, evaluated, the write-back enqueued, the patient watched
    assert count(clean_engine, StoredResource, patient_id="s1") == len(patient_resources("s1"))
    assert count(clean_engine, EmittedResource, patient_id="s1") > 0
    assert count(clean_engine, OutboxRow, patient_id="s1") >= 1
    w = watch_row(clean_engine, "s1")
    assert w is not None and w.checkpoint
    reads = {e["path"] for e in fhir_calls(ehr)}
    assert "/fhir/Observation/s1-t1" in reads and "/fhir/Patient/s1" in reads


@pytest.mark.asyncio
async def test_event_focus_on_a_patient(api: httpx.AsyncClient, ehr: FhirTestServer, clean_engine: Engine) -> None:
    ehr.seed(patient_resources("s2"))
    assert_informational(await post(api, notification(EVENT, "Patient/s2")), "1 patients synchronised")
    assert count(clean_engine, OutboxRow, patient_id="s2") >= 1


@pytest.mark.asyncio
async def test_classic_rest_hook_with_a_resource_body(
    api: httpx.AsyncClient, ehr: FhirTestServer, clean_engine: Engine
) -> None:
    resources = patient_resources("s3")
    ehr.seed(resources)
    temp = next(r for r in resources if r["id"] == "s3-t1")
    assert_informational(await post(api, temp), "1 patients synchronised", "1 new evaluations")
    assert count(clean_engine, OutboxRow, patient_id="s3") >= 1
    # and a Bundle of changed resources (no SubscriptionStatus) names the patients too
    ehr.seed(patient_resources("s4"))
    body = f.bundle(*patient_resources("s4")[2:4], type="collection")
    assert_informational(await post(api, body), "1 patients synchronised")
    assert count(clean_engine, OutboxRow, patient_id="s4") >= 1


@pytest.mark.asyncio
async def test_same_notification_twice_and_out_of_order_change_nothing(
    api: httpx.AsyncClient, ehr: FhirTestServer, clean_engine: Engine
) -> None:
    ehr.seed(patient_resources("s5"))
    first = notification(EVENT, "Observation/s5-t1", first_event=1)
    assert_informational(await post(api, first), "1 new evaluations")
    rows_after_first = outbox_ids(clean_engine)
    emitted = count(clean_engine, EmittedResource, patient_id="s5")
    # the very same notification again
    assert_informational(await post(api, first), "0 new evaluations")
    assert outbox_ids(clean_engine) == rows_after_first
    assert count(clean_engine, EmittedResource, patient_id="s5") == emitted

    # a new observation on the EHR (ICE 6: ICANS grade 2), then its notification (event 2)
    ice = f.ice_score(6, "2026-01-06T11:00:00+00:00", id="s5-ice2", subject="Patient/s5")
    ehr.seed(ice)
    second = notification(EVENT, "Observation/s5-ice2", first_event=2, events_since_start=2)
    assert_informational(await post(api, second), "1 new evaluations")
    rows_after_second = outbox_ids(clean_engine)
    assert len(rows_after_second) > len(rows_after_first)
    emitted = count(clean_engine, EmittedResource, patient_id="s5")
    # event 1 arrives late (out of order), event 2 is repeated: nothing changes
    for late in (first, second):
        assert_informational(await post(api, late), "0 new evaluations")
    assert outbox_ids(clean_engine) == rows_after_second
    assert count(clean_engine, EmittedResource, patient_id="s5") == emitted


@pytest.mark.asyncio
async def test_event_for_unknown_resource_or_patient(
    api: httpx.AsyncClient, ehr: FhirTestServer, clean_engine: Engine
) -> None:
    # the focus is gone from the EHR (deleted since): nothing to sync, not an error
    assert_informational(await post(api, notification(EVENT, "Observation/gone")), "0 patients synchronised")
    # a patient the EHR does not have: nothing stored, not watched
    assert_informational(await post(api, notification(EVENT, "Patient/ghost")), "0 new evaluations")
    assert watch_row(clean_engine, "ghost") is None
    # a Patient with no grading data at all: stored, nothing to write back
    ehr.seed(f.patient("s6"))
    assert_informational(await post(api, notification(EVENT, "Patient/s6")), "0 new evaluations")
    assert count(clean_engine, OutboxRow) == 0


@pytest.mark.asyncio
async def test_ehr_down_503(api: httpx.AsyncClient, ehr: FhirTestServer, clean_engine: Engine) -> None:
    ehr.seed(patient_resources("s7"))
    ehr.inject_fault(503, count=20)
    r = await post(api, notification(EVENT, "Observation/s7-t1"))
    assert r.status_code == 503 and r.json()["resourceType"] == "OperationOutcome"
    assert count(clean_engine, OutboxRow) == 0
    ehr.clear_faults()
    assert_informational(await post(api, notification(EVENT, "Observation/s7-t1")), "1 new evaluations")


@pytest.mark.asyncio
async def test_no_target_configured_503(settings: Settings, clean_engine: Engine) -> None:
    app = create_app(settings, engine=clean_engine, clock=clock)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://iectox.test", headers=bearer()
    ) as c:
        r = await post(c, notification(EVENT, "Patient/x"))
        assert r.status_code == 503 and "IECTOX_EHR_SERVERS" in r.text
        # handshakes still work without a target
        assert_informational(await post(c, notification(HANDSHAKE)), "handshake")


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1, 2]",
        b"null",
        b"42",
        b'{"resourceType": 5}',
        b'{"no": "resourceType"}',
        b'{"resourceType": "Bundle", "type": "history", "entry": [{"resource": {"resourceType": "Parameters"}}]}',
        b'{"resourceType": "Bundle", "type": "history", "entry": [{"resource": {"resourceType": "Parameters",'
        b' "parameter": [{"name": "type", "valueCode": "event-notification"}, {"name": "notification-event",'
        b' "part": [{"name": "focus", "valueReference": {"reference": "Observation/bad id!"}}]}]}}]}',
        b'{"resourceType": "Bundle", "type": "history", "entry": [{"resource": {"resourceType": "Parameters",'
        b' "parameter": [{"name": "type", "valueCode": "event-notification"}, {"name": "notification-event",'
        b' "part": [{"name": "focus", "valueReference": {"reference": 7}}]}]}}]}',
        b'{"resourceType": "Bundle", "entry": "x"}',
        b'{"resourceType": "Bundle", "entry": [1, "x", {"resource": []}]}',
        b'{"resourceType": "Observation", "subject": "Patient/1"}',
        b'{"resourceType": "Observation", "subject": {"reference": ["x"]}}',
        b'{"resourceType": "Bundle", "type": "history", "entry": [{"resource": {"resourceType": "Parameters",'
        b' "parameter": [{"name": "type", "valueCode": "event-notification"}, {"name": "notification-event",'
        b' "part": [{"name": "focus", "valueReference": "Observation/x"}]}]}}]}',
        b'{"resourceType": "Bundle", "type": "history", "entry": [{"resource": {"resourceType": "SubscriptionStatus",'
        b' "type": "event-notification", "notificationEvent": [{"focus": "x"}, 3]}}]}',
    ],
)
@pytest.mark.asyncio
async def test_bad_bodies_never_500(api: httpx.AsyncClient, ehr: FhirTestServer, body: bytes) -> None:
    r = await post(api, body)
    assert r.status_code in (200, 400), (r.status_code, r.text)
    assert r.json()["resourceType"] == "OperationOutcome"
    if body.startswith((b"{not", b"[", b"null", b"42")):
        assert r.status_code == 400


# --- reconciliation poll ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_reconcile_picks_up_changes_and_advances_the_checkpoint(
    api: httpx.AsyncClient, ehr: FhirTestServer, clean_engine: Engine, ssettings: Settings, codebook: Codebook
) -> None:
    ehr.seed(patient_resources("w1"))
    ehr.seed(patient_resources("w2"))
    for pid in ("w1", "w2"):
        assert_informational(await post(api, notification(EVENT, f"Patient/{pid}")), "1 new evaluations")
    assert sorted(w.patient_id for w in watched(clean_engine, "default")) == ["w1", "w2"]
    before = watch_row(clean_engine, "w1")
    w2_before = watch_row(clean_engine, "w2")
    assert before is not None and before.checkpoint and w2_before is not None
    rows_before = outbox_ids(clean_engine)
    server = ssettings.ehr_servers["default"]
    async with FhirClient(server) as client:
        # nothing changed on the EHR since the checkpoints
        assert await reconcile_once(client, clean_engine, "default", codebook, ssettings, clock) == 0
        assert outbox_ids(clean_engine) == rows_before
        # a new Observation for w1 (a notification that never arrived)
        await asyncio.sleep(0.01)  # a later meta.lastUpdated than the checkpoint
        ehr.seed(f.ice_score(5, "2026-01-06T11:00:00+00:00", id="w1-ice2", subject="Patient/w1"))
        assert await reconcile_once(client, clean_engine, "default", codebook, ssettings, clock) == 1
        after = watch_row(clean_engine, "w1")
        assert after is not None
        assert datetime.fromisoformat(after.checkpoint.replace("Z", "+00:00")) > datetime.fromisoformat(
            before.checkpoint.replace("Z", "+00:00")
        )
        assert count(clean_engine, StoredResource, resource_type="Observation", id="w1-ice2") == 1
        new_rows = [i for i in outbox_ids(clean_engine) if i not in rows_before]
        assert new_rows
        with Session(clean_engine) as s:
            assert {s.get(OutboxRow, i).patient_id for i in new_rows} == {"w1"}  # type: ignore[union-attr]
        w2 = watch_row(clean_engine, "w2")
        assert w2 is not None and w2.checkpoint == w2_before.checkpoint  # w2 did not change
        # the incremental reads asked for _lastUpdated=gt<checkpoint>
        # (read on the MedicationAdministration search: the Observation search is a POST _search,
        # its parameters are in the body, once the codebook's code list is longer than a GET allows)
        queries = [e["query"] for e in ehr.stats()["log"] if e["path"] == "/fhir/MedicationAdministration"]
        assert any("_lastUpdated=gt" in q for q in queries)
        # and again: nothing new
        assert await reconcile_once(client, clean_engine, "default", codebook, ssettings, clock) == 0


@pytest.mark.asyncio
async def test_run_poll_once(
    ehr: FhirTestServer, clean_engine: Engine, ssettings: Settings, codebook: Codebook
) -> None:
    ehr.seed(patient_resources("w3"))
    with Session(clean_engine) as s:  # watched with no checkpoint yet: the first pass reads it all
        s.add(WatchedPatient(target="default", patient_id="w3", checkpoint="", updated=FIXED_NOW))
        s.commit()
    assert await run_poll(ssettings, clean_engine, codebook, clock, once=True) == 0
    assert count(clean_engine, OutboxRow, patient_id="w3") >= 1
    w = watch_row(clean_engine, "w3")
    assert w is not None and w.checkpoint
    # the EHR down: exit 1, the checkpoint is kept
    ehr.inject_fault(503, count=50)
    assert await run_poll(ssettings, clean_engine, codebook, clock, once=True) == 1
    assert watch_row(clean_engine, "w3").checkpoint == w.checkpoint  # type: ignore[union-attr]
    ehr.clear_faults()
    # no such target: exit 2
    other = ssettings.model_copy(update={"subscription_target": "nope"})
    assert await run_poll(other, clean_engine, codebook, clock, once=True) == 2


@pytest.mark.asyncio
async def test_poll_loop_keeps_going_when_the_ehr_is_down(
    ehr: FhirTestServer, clean_engine: Engine, ssettings: Settings, codebook: Codebook
) -> None:
    ehr.seed(patient_resources("w4"))
    with Session(clean_engine) as s:
        s.add(WatchedPatient(target="default", patient_id="w4", checkpoint="", updated=FIXED_NOW))
        s.commit()
    ehr.inject_fault(503, count=5)  # the first pass fails, a later one succeeds
    fast = ssettings.model_copy(update={"poll_interval_s": 0.05})
    task = asyncio.create_task(run_poll(fast, clean_engine, codebook, clock, once=False))
    deadline = time.monotonic() + 60
    try:
        while count(clean_engine, OutboxRow, patient_id="w4") == 0:
            assert time.monotonic() < deadline, "the poll never caught up"
            assert not task.done(), task
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert watch_row(clean_engine, "w4").checkpoint  # type: ignore[union-attr]


def test_utc_checkpoint_compare() -> None:
    # checkpoints from servers with offsets compare as instants, not as strings
    from service.ehr.sync import high_water

    marks = [
        {"meta": {"lastUpdated": "2026-01-06T10:00:00+01:00"}},
        {"meta": {"lastUpdated": "2026-01-06T09:30:00Z"}},
    ]
    assert high_water(marks) == "2026-01-06T09:30:00Z"


@pytest.mark.integration  # runs the CLI
def test_cli_poll_once(ehr: FhirTestServer, tmp_path: Path) -> None:
    """`iectox poll --once` as a process: IECTOX_EHR_SERVERS, IECTOX_SUBSCRIPTION_TARGET, a file database."""
    url = f"sqlite:///{tmp_path / 'poll.db'}"
    engine = make_engine(url)
    migrate(engine)
    with Session(engine) as s:
        s.add(WatchedPatient(target="ehr", patient_id="w5", checkpoint="", updated=FIXED_NOW))
        s.commit()
    ehr.seed(patient_resources("w5"))
    cfg = ehr.server_config().model_dump(mode="json", exclude_none=True)
    env = {
        **os.environ,
        "IECTOX_DATABASE_URL": url,
        "IECTOX_EHR_SERVERS": orjson.dumps({"ehr": cfg}).decode(),
        "IECTOX_SUBSCRIPTION_TARGET": "ehr",
        "IECTOX_WRITEBACK_TARGET": "ehr",
        "IECTOX_AUTO_MIGRATE": "false",
    }
    iectox = str(Path(sys.executable).with_name("iectox"))
    try:
        proc = subprocess.run([iectox, "poll", "--once"], env=env, capture_output=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        assert count(engine, OutboxRow, patient_id="w5") >= 1
        w = watch_row(engine, "w5", target="ehr")
        assert w is not None and w.checkpoint
        # an unknown target: exit 2
        bad = {**env, "IECTOX_SUBSCRIPTION_TARGET": "nope"}
        proc = subprocess.run([iectox, "poll", "--once"], env=bad, capture_output=True, timeout=120, check=False)
        assert proc.returncode == 2
    finally:
        engine.dispose()
