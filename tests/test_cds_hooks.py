"""CDS Hooks 2.0 services (service/cds.py, service/api/cds.py): discovery, patient-view,
order-select, feedback, the CDS client JWT on every call, and the 412 rules.

The service runs in process (httpx ASGITransport); the EHR is the real FHIR test server
(tests/fhir_server.py) over loopback HTTP. Nothing mocks HTTP.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from service.api.app import create_app
from service.cdshooks.cards import ORDER_SELECT, ORDER_SIGN, PATIENT_VIEW, SUMMARY_MAX
from service.cdshooks.feedback import feedback_report
from service.cli import main as cli_main
from service.config.settings import Settings
from service.storage import repository
from service.storage.db import make_engine
from service.storage.models import AuditEvent, CdsCard, CdsFeedback, OutboxRow, WatchedPatient
from service.storage.models import StoredResource as StoredResourceRow
from tests import factories as f
from tests.auth import bearer, jwks, sign
from tests.conftest import FIXED_NOW
from tests.fhir_server import FhirTestServer

pytestmark = [pytest.mark.asyncio, pytest.mark.integration]  # the app over SQLite and PostgreSQL

SERVICE_BASE = "http://iectox.test"
EHR_ISS = "https://ehr.iectox.test"
EHR_KEY = ec.generate_private_key(ec.SECP384R1())
EHR_KID = "ehr-es384"
EHR_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EHR_RSA_KID = "ehr-rs384"
T = "2026-01-06T10:00:00+00:00"
PID = f.PATIENT_ID


def cds_token(service_id: str = PATIENT_VIEW, *, rsa_key: bool = False, path: str | None = None, **claims: Any) -> str:
    """A CDS client JWT as the EHR would send it (ES384 by default, RS384 with rsa_key)."""
    now = int(time.time())
    body: dict[str, Any] = {
        "iss": EHR_ISS,
        "sub": "ehr-cds-client",
        "aud": f"{SERVICE_BASE}{path or f'/cds-services/{service_id}'}",
        "iat": now,
        "exp": now + 300,
        "jti": str(uuid.uuid4()),
    }
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    if rsa_key:
        return sign(body, EHR_RSA, "RS384", {"kid": EHR_RSA_KID})
    return sign(body, EHR_KEY, "ES384", {"kid": EHR_KID})


def cds_headers(service_id: str = PATIENT_VIEW, **kw: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {cds_token(service_id, **kw)}"}


def cds_settings(base: Settings, **overrides: Any) -> Settings:
    clients = {EHR_ISS: {"jwks": jwks((EHR_KEY, EHR_KID), (EHR_RSA, EHR_RSA_KID))}}
    # Cards are never kept quiet here unless a test asks (the quiet rule has its own tests).
    update = {"auth_cds_clients": clients, "auth_public_base_url": SERVICE_BASE, "cds_quiet": {}, **overrides}
    return base.model_copy(update=update)


@pytest_asyncio.fixture
async def make_service(settings: Settings, clean_engine: Engine) -> AsyncIterator[Callable[..., httpx.AsyncClient]]:
    """Build the service with extra settings; an AsyncClient on it (closed at the end)."""
    opened: list[httpx.AsyncClient] = []

    def build(**overrides: Any) -> httpx.AsyncClient:
        app = create_app(cds_settings(settings, **overrides), engine=clean_engine, clock=lambda: FIXED_NOW)
        c = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=SERVICE_BASE)
        opened.append(c)
        return c

    yield build
    for c in opened:
        await c.aclose()


@pytest_asyncio.fixture
async def svc(make_service: Callable[..., httpx.AsyncClient]) -> httpx.AsyncClient:
    return make_service()


# --- clinical data -------------------------------------------------------------------------------


def cart(pid: str = PID, product: str | None = None) -> dict[str, Any]:
    med = f.local("cart-infusion") | ({"text": product} if product else {})
    return f.administration(
        med, at="2026-01-03T10:00:00+00:00", status="completed", id=f"{pid}-cart", subject=f"Patient/{pid}"
    )


def case(grade: int | None, pid: str = PID) -> list[dict[str, Any]]:
    """A patient's resources whose current ASTCT CRS grade (at T) is `grade` (None: indeterminate,
    no blood pressure and no oxygen data). ICANS grade 1 (ICE 8) with grade 3, else 0."""
    ref = f"Patient/{pid}"

    def rid(name: str) -> str:
        return f"{pid}-{name}"

    out = [f.patient(pid), cart(pid)]
    temp = 37.0 if grade == 0 else 38.6
    out.append(f.temperature(temp, T, id=rid("t1"), subject=ref))
    if grade is None:
        return out
    sbp, mean = (85, 60) if grade >= 2 else (120, 85)
    out += [
        f.bp_panel(sbp, mean, T, id=rid("bp1"), subject=ref),
        f.oxygen_device("none", T, id=rid("o2"), subject=ref),
        f.ice_score(8 if grade >= 3 else 10, T, id=rid("ice1"), subject=ref),
    ]
    if grade >= 3:
        out.append(
            f.administration(
                "norepinephrine", start="2026-01-06T09:00:00+00:00", rate=(5, "ug/min"), id=rid("ne1"), subject=ref
            )
        )
    return out


def searchset(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "entry": [{"fullUrl": f"{r['resourceType']}/{r['id']}", "resource": r} for r in resources],
    }


def of_type(resources: list[dict[str, Any]], *types: str) -> list[dict[str, Any]]:
    return [r for r in resources if r["resourceType"] in types]


def full_prefetch(resources: list[dict[str, Any]]) -> dict[str, Any]:
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    return {
        "patient": patient,
        "observations": searchset(of_type(resources, "Observation")),
        "medications": searchset(of_type(resources, "MedicationAdministration")),
        "conditions": searchset(of_type(resources, "Condition")),
        "procedures": searchset(of_type(resources, "Procedure")),
    }


def hook(
    hook_name: str = "patient-view",
    pid: str = PID,
    *,
    prefetch: dict[str, Any] | None = None,
    fhir_server: str | None = None,
    token: str | None = None,
    **context: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "hook": hook_name,
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/dr-1", "patientId": pid, **context},
    }
    if prefetch is not None:
        body["prefetch"] = prefetch
    if fhir_server is not None:
        body["fhirServer"] = fhir_server
    if token is not None:
        body["fhirAuthorization"] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "user/Patient.read user/Observation.read",
            "subject": "ehr-cds-client",
        }
    return body


async def call(
    svc: httpx.AsyncClient, body: dict[str, Any], service_id: str = PATIENT_VIEW, **token_kw: Any
) -> httpx.Response:
    return await svc.post(f"/cds-services/{service_id}", json=body, headers=cds_headers(service_id, **token_kw))


def only_card(resp: httpx.Response) -> dict[str, Any]:
    assert resp.status_code == 200, resp.text
    cards = resp.json()["cards"]
    assert len(cards) == 1, cards
    card: dict[str, Any] = cards[0]
    return card


def assert_card_shape(card: dict[str, Any], pid: str = PID) -> None:
    """CDS Hooks 2.0 Card: required fields, summary < 140 characters, a source label, a link to $course."""
    assert isinstance(card["summary"], str) and 0 < len(card["summary"]) < 140
    assert card["indicator"] in ("info", "warning", "critical")
    assert isinstance(card["source"]["label"], str) and card["source"]["label"]
    assert isinstance(card["detail"], str) and card["detail"]
    uuid.UUID(card["uuid"])
    links = card["links"]
    assert any(
        link["type"] == "absolute" and link["url"] == f"{SERVICE_BASE}/fhir/Patient/{pid}/$course" and link["label"]
        for link in links
    ), links


def assert_operation_outcome(resp: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    doc: dict[str, Any] = resp.json()
    assert doc["resourceType"] == "OperationOutcome"
    text = " ".join(str(i.get("diagnostics", "")) for i in doc["issue"])
    for w in words:
        assert w in text, (w, text)
    return doc


def rows(engine: Engine, model: Any) -> list[Any]:
    with Session(engine) as s:
        return list(s.exec(select(model)).all())


# --- discovery -----------------------------------------------------------------------------------


async def test_discovery_shape(svc: httpx.AsyncClient) -> None:
    r = await svc.get("/cds-services")
    assert r.status_code == 200
    services = r.json()["services"]
    by_id = {s["id"]: s for s in services}
    assert set(by_id) == {PATIENT_VIEW, ORDER_SELECT, ORDER_SIGN}
    assert by_id[PATIENT_VIEW]["hook"] == "patient-view"
    assert by_id[ORDER_SELECT]["hook"] == "order-select"
    assert by_id[ORDER_SIGN]["hook"] == "order-sign"
    for s in services:
        assert s["title"] and s["description"]
        prefetch = s["prefetch"]
        assert prefetch["patient"] == "Patient/{{context.patientId}}"
        assert prefetch["observations"].startswith("Observation?patient={{context.patientId}}&code=")
        assert prefetch["medications"] == "MedicationAdministration?patient={{context.patientId}}"
        # every code the grading reads is asked for (system|code tokens)
        codes = prefetch["observations"].split("&code=", 1)[1].split(",")
        assert f"{f.LOINC}|8310-5" in codes and f"{f.LOCAL}|ice-score" in codes
        assert all("|" in c for c in codes)


async def test_unknown_service_404(svc: httpx.AsyncClient) -> None:
    r = await svc.post("/cds-services/nope", json=hook(), headers=cds_headers("nope"))
    assert_operation_outcome(r, 404, "no CDS service")


# --- CDS client JWT at hook level ----------------------------------------------------------------


async def test_hook_needs_a_valid_client_jwt(svc: httpx.AsyncClient) -> None:
    body = hook(prefetch=full_prefetch(case(1)))
    url = f"/cds-services/{PATIENT_VIEW}"
    r = await svc.post(url, json=body)
    assert_operation_outcome(r, 401, "bearer token is required")
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    # a /fhir access token is not a CDS client JWT
    assert_operation_outcome(await svc.post(url, json=body, headers=bearer()), 401)
    # signed for the other service (aud is the exact URL called)
    r = await svc.post(url, json=body, headers=cds_headers(ORDER_SELECT))
    assert_operation_outcome(r, 401, "audience")
    # an issuer that is not allowlisted
    assert_operation_outcome(await call(svc, body, iss="https://stranger.example"), 401, "not an allowlisted")
    # expired
    old = int(time.time()) - 3600
    assert_operation_outcome(await call(svc, body, iat=old, exp=old + 300), 401, "expired")
    # replayed jti
    headers = cds_headers()
    assert (await svc.post(url, json=body, headers=headers)).status_code == 200
    assert_operation_outcome(await svc.post(url, json=body, headers=headers), 401, "replayed")
    # RS384 is accepted too
    assert (await call(svc, body, rsa_key=True)).status_code == 200
    # feedback needs the JWT as well
    r = await svc.post(f"{url}/feedback", json={"feedback": []})
    assert_operation_outcome(r, 401)


# --- patient-view ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("grade", "indicator"), [(0, "info"), (1, "info"), (2, "warning"), (3, "critical")])
async def test_patient_view_full_prefetch_indicator(
    svc: httpx.AsyncClient, clean_engine: Engine, grade: int, indicator: str
) -> None:
    # No fhirServer at all: the complete prefetch is enough.
    card = only_card(await call(svc, hook(prefetch=full_prefetch(case(grade)))))
    assert_card_shape(card)
    assert card["indicator"] == indicator
    icans = 1 if grade >= 3 else 0
    assert f"CRS grade {grade}" in card["summary"] and f"ICANS grade {icans}" in card["summary"]
    detail = card["detail"]
    assert f"**CRS: grade {grade}**" in detail and "ASTCT 2019" in detail
    assert "2026-01-06T10:00" in detail  # the time of the deciding values
    assert "Pre-infusion and baseline risk" in detail
    if grade == 2:
        assert "mean-arterial-pressure 60 mm[Hg]" in detail
    if grade >= 3:
        assert "norepinephrine" in detail.lower() or "vasopressor" in detail.lower()
    assert "no crs" not in detail.lower() and "no crs" not in card["summary"].lower()
    # stored, not watched (no fhirServer), audited
    assert rows(clean_engine, WatchedPatient) == []
    events = [e for e in rows(clean_engine, AuditEvent) if e.action == "hook"]
    assert [(e.patient_id, e.route, e.actor) for e in events] == [
        (PID, f"/cds-services/{PATIENT_VIEW}", f"{EHR_ISS} ehr-cds-client")
    ]


async def test_patient_view_indeterminate_names_missing_data(svc: httpx.AsyncClient) -> None:
    card = only_card(await call(svc, hook(prefetch=full_prefetch(case(None)))))
    assert_card_shape(card)
    assert card["indicator"] in ("warning", "critical")
    assert "CRS indeterminate" in card["summary"]
    detail = card["detail"]
    assert "Cannot be graded without" in detail
    for missing in ("systolic-bp", "oxygen-device", "ice-score"):
        assert missing in detail, missing
    assert "not grade 0" in detail
    for text in (card["summary"], detail):
        assert "no crs" not in text.lower()
        assert "CRS grade 0" not in text


async def test_patient_without_any_data_gets_an_indeterminate_card(
    svc: httpx.AsyncClient, clean_engine: Engine
) -> None:
    card = only_card(await call(svc, hook(prefetch=full_prefetch([f.patient()]))))
    assert_card_shape(card)
    assert card["summary"].startswith("CRS indeterminate, ICANS indeterminate")
    assert card["indicator"] == "warning"
    assert "body-temperature" in card["detail"] and "no crs" not in card["detail"].lower()
    assert rows(clean_engine, OutboxRow) == []


async def test_indeterminate_with_a_floor_of_grade_3_is_critical(svc: httpx.AsyncClient) -> None:
    # Fever, hypotension on a vasopressor, but no oxygen data: at least grade 3 from what is there.
    resources = [r for r in case(3) if not r["id"].endswith("-o2")]
    card = only_card(await call(svc, hook(prefetch=full_prefetch(resources))))
    assert card["indicator"] == "critical"
    assert "CRS indeterminate (>= grade 3)" in card["summary"]
    assert "oxygen-device" in card["detail"]


async def test_masked_fever_note(svc: httpx.AsyncClient) -> None:
    ref = f"Patient/{PID}"
    resources = [
        f.patient(),
        cart(),
        f.temperature(39.0, "2026-01-05T06:00:00+00:00", id="t0", subject=ref),
        f.administration("tocilizumab", at="2026-01-05T07:00:00+00:00", status="completed", id="toci", subject=ref),
        f.temperature(37.0, T, id="t1", subject=ref),
        f.bp_panel(85, 60, T, id="bp1", subject=ref),
        f.oxygen_device("none", T, id="o2", subject=ref),
        f.ice_score(10, T, id="ice1", subject=ref),
    ]
    card = only_card(await call(svc, hook(prefetch=full_prefetch(resources))))
    assert "CRS grade 2" in card["summary"]
    assert "Masked fever" in card["detail"]


async def test_summary_stays_under_140_characters(svc: httpx.AsyncClient) -> None:
    for grade in (None, 0, 1, 2, 3):
        card = only_card(await call(svc, hook(prefetch=full_prefetch(case(grade)))))
        assert len(card["summary"]) < 140 and len(card["summary"]) <= SUMMARY_MAX


async def test_bodies_the_standard_library_reads_are_still_read(svc: httpx.AsyncClient) -> None:
    """Bodies are parsed by orjson, and what it refuses by the standard library (api/orjson_route.py):
    a byte order mark (some .NET clients send one) or UTF-16 still gets its cards."""
    body = orjson.dumps(hook(prefetch=full_prefetch(case(2))))
    url = f"/cds-services/{PATIENT_VIEW}"
    for sent in (b"\xef\xbb\xbf" + body, body.decode().encode("utf-16")):
        r = await svc.post(url, content=sent, headers=cds_headers() | {"Content-Type": "application/json"})
        assert r.status_code == 200, r.text
        assert "CRS grade 2" in only_card(r)["summary"]


async def test_what_storage_cannot_keep_is_a_4xx_never_a_500(svc: httpx.AsyncClient) -> None:
    """Found in review: the standard library reads a lone surrogate; orjson can then not write it
    (the hook's digest, storage). Such a body is refused as JSON (4xx), with no card."""
    resources = case(2)
    bent = [dict(r) for r in resources]
    obs = next(r for r in bent if r["resourceType"] == "Observation")
    obs["id"] += "\ud800"
    url = f"/cds-services/{PATIENT_VIEW}"
    for doc in (hook(prefetch=full_prefetch(bent)), {**hook(prefetch=full_prefetch(resources)), "x": "\ud800"}):
        body = json.dumps(doc).encode()  # the standard library writes the lone surrogate as \ud800
        r = await svc.post(url, content=body, headers=cds_headers() | {"Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, r.text
        assert r.json()["resourceType"] == "OperationOutcome"


async def test_course_link_resolves(svc: httpx.AsyncClient) -> None:
    card = only_card(await call(svc, hook(prefetch=full_prefetch(case(2)))))
    url = card["links"][0]["url"]
    r = await svc.get(url.removeprefix(SERVICE_BASE), headers=bearer())
    assert r.status_code == 200, r.text
    assert r.json()["resourceType"] == "Parameters"


async def test_public_base_url_used_for_audience_and_links(make_service: Callable[..., httpx.AsyncClient]) -> None:
    svc = make_service(auth_public_base_url="https://cds.hospital.example")
    body = hook(prefetch=full_prefetch(case(1)))
    r = await call(svc, body)  # aud http://iectox.test/...: not the public URL
    assert_operation_outcome(r, 401, "audience")
    token = cds_token(aud=f"https://cds.hospital.example/cds-services/{PATIENT_VIEW}")
    r = await svc.post(f"/cds-services/{PATIENT_VIEW}", json=body, headers={"Authorization": f"Bearer {token}"})
    card = only_card(r)
    assert card["links"][0]["url"] == f"https://cds.hospital.example/fhir/Patient/{PID}/$course"


async def test_bad_requests_are_400_never_500(svc: httpx.AsyncClient) -> None:
    url = f"/cds-services/{PATIENT_VIEW}"
    bad: list[bytes] = [
        b"{not json",
        b"[]",
        b"null",
        b'"text"',
        orjson.dumps({"hook": "patient-view"}),
        orjson.dumps({**hook(), "context": {}}),
        orjson.dumps({**hook(), "context": {"patientId": 7}}),
        orjson.dumps(hook(pid="bad id!", fhir_server="http://iectox.test/fhir")),
        orjson.dumps(hook(pid="x" * 65)),
        orjson.dumps(hook("order-select")),  # the wrong hook for this service
        orjson.dumps({**hook(), "context": "Patient/p1"}),
        orjson.dumps({**hook(), "prefetch": ["not", "an", "object"]}),
        orjson.dumps({**hook(), "fhirAuthorization": {"token_type": "Bearer"}}),
        '{"hook": "patient-view", "x": "\udcff"}'.encode("utf-8", "surrogatepass"),
    ]
    for body in bad:
        r = await svc.post(url, content=body, headers=cds_headers() | {"Content-Type": "application/json"})
        assert r.status_code == 400, (body, r.status_code, r.text)
        assert r.json()["resourceType"] == "OperationOutcome"


async def test_invalid_prefetch_values_do_not_break_the_hook(svc: httpx.AsyncClient) -> None:
    resources = case(2)
    prefetch = full_prefetch(resources)
    prefetch["procedures"] = None  # CDS Hooks: a prefetch the EHR could not fill may be null
    prefetch["conditions"] = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": "junk"}, 5]}
    card = only_card(await call(svc, hook(prefetch=prefetch)))
    assert "CRS grade 2" in card["summary"]


async def test_prefetch_for_another_patient_is_refused_and_nothing_stored(
    svc: httpx.AsyncClient, clean_engine: Engine
) -> None:
    # A hook stores only its own patient's data: another patient's resource is a 400 naming it.
    prefetch = full_prefetch(case(2, pid="other"))
    r = await call(svc, hook(prefetch=prefetch))
    assert_operation_outcome(r, 400)
    assert r.json()["issue"][0]["expression"] == ["prefetch.patient"]
    mixed = full_prefetch(case(2))
    mixed["observations"]["entry"].append({"resource": f.temperature(39.0, T, id="stranger", subject="Patient/b")})
    r = await call(svc, hook(prefetch=mixed))
    assert_operation_outcome(r, 400)
    where = r.json()["issue"][0]["expression"][0]
    assert where.startswith("prefetch.observations.entry[") and where.endswith("].resource")
    with Session(clean_engine) as s:
        assert s.exec(select(StoredResourceRow)).all() == []


async def test_prefetch_over_the_limit_is_a_413(make_service: Callable[..., httpx.AsyncClient]) -> None:
    svc = make_service(cds_max_prefetch_resources=5)
    r = await call(svc, hook(prefetch=full_prefetch(case(2))))
    assert_operation_outcome(r, 413)


# --- fetching what the prefetch lacks ------------------------------------------------------------


@pytest.fixture
def ehr(fhir_server_clean: FhirTestServer) -> FhirTestServer:
    return fhir_server_clean


def fetch_log(server: FhirTestServer) -> list[dict[str, Any]]:
    return [e for e in server.stats()["log"] if e["path"].startswith("/fhir/") and "/.well-known/" not in e["path"]]


async def test_partial_prefetch_fetches_the_rest_with_fhir_authorization(
    make_service: Callable[..., httpx.AsyncClient], ehr: FhirTestServer, clean_engine: Engine
) -> None:
    resources = case(3, pid="pv1")
    ehr.seed(resources)
    token = f"ehr-user-{uuid.uuid4().hex}"
    ehr.add_static_token(token, "user/*.rs")
    # The SMART client is configured too, but the hook's fhirAuthorization token is what is used.
    svc = make_service(ehr_servers={"default": ehr.server_config()})
    prefetch = {"patient": resources[0]}
    card = only_card(await call(svc, hook(pid="pv1", prefetch=prefetch, fhir_server=ehr.base_url + "/", token=token)))
    assert_card_shape(card, "pv1")
    assert card["indicator"] == "critical" and "CRS grade 3" in card["summary"]
    stats = ehr.stats()
    assert stats["token_requests"] == 0  # no SMART token: the EHR's token was used
    log = fetch_log(ehr)
    assert log and all(e["auth"] and e["status"] == 200 for e in log)
    fetched = {e["path"] for e in log}
    # The Observation search is a POST _search once the codebook's code list is longer than a GET allows.
    assert "/fhir/Observation/_search" in fetched and "/fhir/MedicationAdministration" in fetched
    assert "/fhir/Patient/pv1" not in fetched  # the Patient came with the prefetch
    # the patient is now watched by the reconciliation poll, with the server's high-water mark
    (w,) = rows(clean_engine, WatchedPatient)
    assert (w.target, w.patient_id) == ("default", "pv1") and w.checkpoint


async def test_prefetch_key_with_operation_outcome_is_fetched(
    make_service: Callable[..., httpx.AsyncClient], ehr: FhirTestServer
) -> None:
    resources = case(2, pid="pv5")
    ehr.seed(resources)
    svc = make_service(ehr_servers={"default": ehr.server_config()})
    prefetch = full_prefetch(resources)
    prefetch["observations"] = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "too-costly", "diagnostics": "prefetch failed"}],
    }
    card = only_card(await call(svc, hook(pid="pv5", prefetch=prefetch, fhir_server=ehr.base_url)))
    assert "CRS grade 2" in card["summary"]
    assert {e["path"] for e in fetch_log(ehr)} == {"/fhir/Observation/_search"}


async def test_no_prefetch_uses_smart_backend_services(
    make_service: Callable[..., httpx.AsyncClient], ehr: FhirTestServer
) -> None:
    ehr.seed(case(2, pid="pv2"))
    svc = make_service(ehr_servers={"default": ehr.server_config()})
    card = only_card(await call(svc, hook(pid="pv2", fhir_server=ehr.base_url)))
    assert card["indicator"] == "warning" and "CRS grade 2" in card["summary"]
    assert ehr.stats()["token_requests"] == 1


async def test_fhir_server_not_configured_412(
    make_service: Callable[..., httpx.AsyncClient], ehr: FhirTestServer
) -> None:
    ehr.seed(case(2, pid="pv3"))
    resources = case(2, pid="pv3")
    partial = {"patient": resources[0]}
    svc = make_service(ehr_servers={"default": ehr.server_config()})
    # no fhirServer at all
    assert_operation_outcome(await call(svc, hook(pid="pv3", prefetch=partial)), 412, "fhirServer")
    # an unconfigured server (never contacted, no token sent: no SSRF)
    for url in ("http://169.254.169.254/fhir", "http://127.0.0.1:1/fhir", ehr.origin + "/other/fhir"):
        r = await call(svc, hook(pid="pv3", prefetch=partial, fhir_server=url, token="secret"))  # noqa: S106
        assert_operation_outcome(r, 412, "not a configured EHR server")
    assert fetch_log(ehr) == []
    # no EHR server configured at all
    svc2 = make_service()
    r = await call(svc2, hook(pid="pv3", prefetch=partial, fhir_server=ehr.base_url))
    assert_operation_outcome(r, 412)


async def test_fhir_server_down_412(make_service: Callable[..., httpx.AsyncClient], ehr: FhirTestServer) -> None:
    resources = case(2, pid="pv4")
    ehr.seed(resources)
    token = f"ehr-user-{uuid.uuid4().hex}"
    ehr.add_static_token(token)
    server = ehr.server_config(max_retries=0)
    svc = make_service(ehr_servers={"default": server})
    partial = {"patient": resources[0]}
    # the server answers 503 to everything
    ehr.inject_fault(503, count=50)
    r = await call(svc, hook(pid="pv4", prefetch=partial, fhir_server=ehr.base_url, token=token))
    assert_operation_outcome(r, 412, "could not be fetched")
    ehr.clear_faults()
    # the token is refused (401)
    r = await call(svc, hook(pid="pv4", prefetch=partial, fhir_server=ehr.base_url, token="not-a-token"))  # noqa: S106
    assert_operation_outcome(r, 412, "could not be fetched")
    # the Patient is not on the server and not in the prefetch
    r = await call(svc, hook(pid="absent", fhir_server=ehr.base_url, token=token))
    assert_operation_outcome(r, 412, "Patient")
    # nothing listens there any more
    closed = ehr.server_config(max_retries=0, base_url="http://127.0.0.1:9/fhir", connect_timeout_s=2)
    svc2 = make_service(ehr_servers={"default": closed})
    r = await call(svc2, hook(pid="pv4", prefetch=partial, fhir_server="http://127.0.0.1:9/fhir", token=token))
    assert_operation_outcome(r, 412, "could not be fetched")
    # and it works again once the server answers
    r = await call(svc, hook(pid="pv4", prefetch=partial, fhir_server=ehr.base_url, token=token))
    assert only_card(r)["indicator"] == "warning"


# --- order-select ---------------------------------------------------------------------------------


def draft(res_id: str, concept: dict[str, Any], pid: str = PID) -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest",
        "id": res_id,
        "status": "draft",
        "intent": "order",
        "medicationCodeableConcept": concept,
        "subject": {"reference": f"Patient/{pid}"},
    }


def order_hook(*orders: dict[str, Any], selections: list[str] | None = None, **kw: Any) -> dict[str, Any]:
    sel = selections if selections is not None else [f"MedicationRequest/{o['id']}" for o in orders]
    return hook(
        "order-select",
        draftOrders={"resourceType": "Bundle", "type": "collection", "entry": [{"resource": o} for o in orders]},
        selections=sel,
        **kw,
    )


async def test_order_select_with_selections_not_an_array_is_a_400(svc: httpx.AsyncClient) -> None:
    order = draft("mr-cart", {"coding": [{"system": f.LOCAL, "code": "cart-infusion"}], "text": "Yescarta"})
    body = order_hook(order, prefetch=full_prefetch(case(1)))
    body["context"]["selections"] = 5
    r = await call(svc, body, ORDER_SELECT)
    assert_operation_outcome(r, 400)
    assert r.json()["issue"][0]["expression"] == ["context.selections"]


def lbcl() -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": "dx1",
        "clinicalStatus": f.cc("http://terminology.hl7.org/CodeSystem/condition-clinical", "active"),
        "code": f.cc("http://hl7.org/fhir/sid/icd-10-cm", "C83.38", "Diffuse large B-cell lymphoma"),
        "subject": {"reference": f"Patient/{PID}"},
    }


async def test_order_select_car_t_product_shows_baseline(svc: httpx.AsyncClient) -> None:
    resources = [*case(1), lbcl()]
    order = draft("mr-cart", {"coding": [{"system": f.LOCAL, "code": "cart-infusion"}], "text": "Yescarta"})
    r = await call(svc, order_hook(order, prefetch=full_prefetch(resources)), ORDER_SELECT)
    card = only_card(r)
    assert_card_shape(card)
    assert "axicabtagene-ciloleucel" in card["detail"] and "93%" in card["detail"]  # LBCL any-grade CRS
    assert "LBCL" in card["detail"] and "neurotoxicity 64%" in card["detail"]
    assert "93%" in card["summary"] and "CRS grade 1" in card["summary"]
    assert card["indicator"] == "info"
    (suggestion,) = card["suggestions"]
    (action,) = suggestion["actions"]
    assert action["type"] == "create" and action["resource"]["resourceType"] == "ServiceRequest"
    assert action["resource"]["subject"] == {"reference": f"Patient/{PID}"}


async def test_order_select_product_without_indication_lists_every_row(svc: httpx.AsyncClient) -> None:
    order = draft("mr-cart", f.cc(f.LOCAL, "cart-infusion", "tisagenlecleucel"))
    card = only_card(await call(svc, order_hook(order, prefetch=full_prefetch(case(3))), ORDER_SELECT))
    assert card["indicator"] == "critical"
    assert card["detail"].count("- tisagenlecleucel") == 3  # B-ALL, LBCL, FL


@pytest.mark.parametrize("drug", ["tocilizumab", "dexamethasone"])
async def test_order_select_tocilizumab_or_steroid_shows_grades(svc: httpx.AsyncClient, drug: str) -> None:
    order = draft("mr-1", f.cc(f.RXNORM, f.RXCUI[drug]))
    card = only_card(await call(svc, order_hook(order, prefetch=full_prefetch(case(2))), ORDER_SELECT))
    assert card["indicator"] == "warning" and "CRS grade 2" in card["summary"]
    assert "baseline" not in card["summary"].lower()


async def test_order_select_unrelated_drug_no_cards(svc: httpx.AsyncClient, clean_engine: Engine) -> None:
    paracetamol = draft("mr-2", f.cc(f.RXNORM, "161", "acetaminophen"))
    r = await call(svc, order_hook(paracetamol, prefetch=full_prefetch(case(3))), ORDER_SELECT)
    assert r.status_code == 200 and r.json()["cards"] == []
    # a CAR T order that is in the draft but not selected does not count either
    other = draft("mr-cart", f.cc(f.LOCAL, "cart-infusion", "Kymriah"))
    body = order_hook(paracetamol, other, selections=["MedicationRequest/mr-2"], prefetch=full_prefetch(case(3)))
    r = await call(svc, body, ORDER_SELECT)
    assert r.status_code == 200 and r.json()["cards"] == []
    # without a prefetch and without fhirServer: still no cards (nothing is fetched for nothing)
    r = await call(svc, order_hook(paracetamol), ORDER_SELECT)
    assert r.status_code == 200 and r.json()["cards"] == []


# --- feedback -------------------------------------------------------------------------------------


async def test_feedback_stored(svc: httpx.AsyncClient, clean_engine: Engine) -> None:
    card = only_card(await call(svc, hook(prefetch=full_prefetch(case(2)))))
    feedback = {
        "feedback": [
            {
                "card": card["uuid"],
                "outcome": "overridden",
                "overrideReasons": [{"reason": {"code": "not-relevant", "display": "Not relevant"}}],
                "outcomeTimestamp": "2026-11-21T12:00:00Z",
            }
        ]
    }
    url = f"/cds-services/{PATIENT_VIEW}/feedback"
    r = await svc.post(url, json=feedback, headers=cds_headers(path=url))
    assert r.status_code == 200, r.text
    (row,) = rows(clean_engine, CdsFeedback)
    assert row.service_id == PATIENT_VIEW
    assert orjson.loads(row.body) == feedback
    # malformed feedback: 400 OperationOutcome, nothing stored
    for body in (b"{", b"[]", orjson.dumps({"feedback": "x"})):
        r = await svc.post(url, content=body, headers=cds_headers(path=url))
        assert_operation_outcome(r, 400)
    # unknown service
    bad = "/cds-services/nope/feedback"
    assert_operation_outcome(await svc.post(bad, json=feedback, headers=cds_headers(path=bad)), 404)
    assert len(rows(clean_engine, CdsFeedback)) == 1


async def test_a_slow_feedback_upload_holds_no_write_lock(svc: httpx.AsyncClient, clean_engine: Engine) -> None:
    """The client JWT's jti is committed before the body is read: a client that sends its body
    slowly never keeps other writers (SQLite has one) waiting."""
    url = f"/cds-services/{PATIENT_VIEW}/feedback"
    reading, send = asyncio.Event(), asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        reading.set()  # the route is reading the body
        await send.wait()
        yield orjson.dumps({"feedback": []})

    headers = {**cds_headers(path=url), "Content-Type": "application/json"}
    upload = asyncio.create_task(svc.post(url, content=slow_body(), headers=headers))
    await asyncio.wait_for(reading.wait(), 60)
    impatient = make_engine(clean_engine.url.render_as_string(hide_password=False), lock_wait_s=0.5)
    try:
        with Session(impatient) as other:  # StorageBusy if the upload held the write lock
            other.add(CdsFeedback(service_id="other-writer", received=FIXED_NOW, body=b"{}"))
            other.commit()
    finally:
        impatient.dispose()
        send.set()
        response = await upload
    assert response.status_code == 200


async def test_feedback_items_are_checked(svc: httpx.AsyncClient, clean_engine: Engine) -> None:
    """CDS Hooks 2.0 Feedback: card (uuid) and outcome (accepted | overridden) are required; a 400
    names each bad item by its path, and nothing is stored."""
    url = f"/cds-services/{PATIENT_VIEW}/feedback"
    bad = {
        "feedback": [
            {"card": "c1", "outcome": "accepted"},
            {"outcome": "overridden"},
            {"card": "c3", "outcome": "dismissed"},
            {"card": "c4", "outcome": "overridden", "overrideReason": "too many"},
            7,
        ]
    }
    doc = assert_operation_outcome(await svc.post(url, json=bad, headers=cds_headers(path=url)), 400)
    paths = [i["expression"][0] for i in doc["issue"]]
    assert paths == ["feedback[1].card", "feedback[2].outcome", "feedback[3]", "feedback[4]"]
    assert rows(clean_engine, CdsFeedback) == []


# --- cards that lead to the app, and respect attention ---------------------------------------------


async def test_cards_carry_a_smart_link_and_override_reasons(svc: httpx.AsyncClient) -> None:
    card = only_card(await call(svc, hook(prefetch=full_prefetch(case(2)))))
    smart = [link for link in card["links"] if link["type"] == "smart"]
    assert smart == [
        {"label": "Open the CRS/ICANS course (iectox app)", "url": f"{SERVICE_BASE}/app/launch", "type": "smart"}
    ]
    reasons = card["overrideReasons"]
    assert {r["code"] for r in reasons} >= {"already-managed", "not-applicable", "data-wrong"}
    assert all(r["system"] == "https://iectox.org/fhir/CodeSystem/override-reason" and r["display"] for r in reasons)


async def test_order_sign_gives_the_order_cards_without_selections(svc: httpx.AsyncClient) -> None:
    order = draft("mr-cart", f.cc(f.LOCAL, "cart-infusion", "Yescarta"))
    body = order_hook(order, prefetch=full_prefetch([*case(1), lbcl()]))
    body["hook"] = "order-sign"
    del body["context"]["selections"]  # order-sign carries none: every draft order counts
    card = only_card(await call(svc, body, ORDER_SIGN))
    assert "93%" in card["summary"] and "CRS grade 1" in card["summary"]
    assert card["suggestions"][0]["actions"][0]["resource"]["resourceType"] == "ServiceRequest"
    # the order-select service does not answer order-sign (nor the reverse)
    assert_operation_outcome(await call(svc, body, ORDER_SELECT), 400, "order-select")
    paracetamol = draft("mr-2", f.cc(f.RXNORM, "161", "acetaminophen"))
    body = order_hook(paracetamol, prefetch=full_prefetch(case(3)))
    body["hook"] = "order-sign"
    del body["context"]["selections"]
    r = await call(svc, body, ORDER_SIGN)
    assert r.status_code == 200 and r.json()["cards"] == []


def cards_of(resp: httpx.Response) -> list[dict[str, Any]]:
    assert resp.status_code == 200, resp.text
    cards: list[dict[str, Any]] = resp.json()["cards"]
    return cards


async def test_quiet_at_grade_0_and_when_nothing_changed(
    make_service: Callable[..., httpx.AsyncClient], clean_engine: Engine
) -> None:
    svc = make_service(cds_quiet={"patient-view": ["grade-0", "unchanged"]})
    assert cards_of(await call(svc, hook(prefetch=full_prefetch(case(0))))) == []  # CRS 0, ICANS 0
    # an indeterminate grade is never quiet: data are missing (another patient)
    (card,) = cards_of(await call(svc, hook(pid="p-ind", prefetch=full_prefetch(case(None, "p-ind")))))
    assert "indeterminate" in card["summary"]
    (card,) = cards_of(await call(svc, hook(prefetch=full_prefetch(case(2)))))
    assert "CRS grade 2" in card["summary"]
    # the same grades again for the same user (a new JWT, the same prefetch: the cached path) -> quiet
    assert cards_of(await call(svc, hook(prefetch=full_prefetch(case(2))))) == []
    # ... but another clinician opening the chart sees it
    (card,) = cards_of(await call(svc, hook(prefetch=full_prefetch(case(2)), userId="Practitioner/dr-2")))
    assert "CRS grade 2" in card["summary"]
    # a grade changed -> a card; a critical card is never kept quiet by "unchanged"
    for _ in range(2):
        (card,) = cards_of(await call(svc, hook(prefetch=full_prefetch(case(3)))))
        assert "CRS grade 3" in card["summary"] and card["indicator"] == "critical"
    # back to grade 0: quiet; grade 3 again after that quiet answer is a change: a card
    assert cards_of(await call(svc, hook(prefetch=full_prefetch(case(0))))) == []
    (card,) = cards_of(await call(svc, hook(prefetch=full_prefetch(case(3)))))
    with Session(clean_engine) as s:
        issued = list(s.exec(select(CdsCard).order_by(col(CdsCard.id))).all())
    assert [(c.patient_id, c.indicator) for c in issued] == [
        ("p-ind", "warning"),
        (PID, "warning"),
        (PID, "warning"),
        (PID, "critical"),
        (PID, "critical"),
        (PID, "critical"),
    ]
    assert {(c.hook, c.card_type) for c in issued} == {("patient-view", "grades")}
    # other hooks keep their own rules: order-select is not quiet here
    order = draft("mr-1", f.cc(f.RXNORM, f.RXCUI["tocilizumab"]))
    for _ in range(2):
        cards_of(await call(svc, order_hook(order, prefetch=full_prefetch(case(2))), ORDER_SELECT)).pop()


async def test_unchanged_on_an_order_hook_compares_the_orders_too(
    make_service: Callable[..., httpx.AsyncClient],
) -> None:
    svc = make_service(cds_quiet={"order-select": ["unchanged"]})
    cart = draft("mr-cart", f.cc(f.LOCAL, "cart-infusion", "Yescarta"))
    toci = draft("mr-1", f.cc(f.RXNORM, f.RXCUI["tocilizumab"]))
    only_card(await call(svc, order_hook(cart, prefetch=full_prefetch(case(1))), ORDER_SELECT))
    assert cards_of(await call(svc, order_hook(cart, prefetch=full_prefetch(case(1))), ORDER_SELECT)) == []
    # the same grades, another order: its card is shown
    only_card(await call(svc, order_hook(toci, prefetch=full_prefetch(case(1))), ORDER_SELECT))


async def test_quiet_rules_are_per_hook(make_service: Callable[..., httpx.AsyncClient]) -> None:
    svc = make_service(cds_quiet={"order-select": ["grade-0"]})
    order = draft("mr-1", f.cc(f.RXNORM, f.RXCUI["tocilizumab"]))
    assert cards_of(await call(svc, order_hook(order, prefetch=full_prefetch(case(0))), ORDER_SELECT)) == []
    only_card(await call(svc, hook(prefetch=full_prefetch(case(0)))))  # patient-view is not quiet here
    only_card(await call(svc, hook(prefetch=full_prefetch(case(0)))))


async def test_quiet_settings_name_known_hooks() -> None:
    with pytest.raises(ValueError, match="unknown hooks"):
        Settings(cds_quiet={"patient-veiw": ["grade-0"]})
    assert Settings().cds_quiet == {"patient-view": ["grade-0", "unchanged"]}


async def test_feedback_report_counts_outcomes_and_reasons(
    svc: httpx.AsyncClient, clean_engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    grades = only_card(await call(svc, hook(prefetch=full_prefetch(case(2)))))
    critical = only_card(await call(svc, hook(prefetch=full_prefetch(case(3)))))
    order = draft("mr-cart", f.cc(f.LOCAL, "cart-infusion", "Yescarta"))
    risk = only_card(await call(svc, order_hook(order, prefetch=full_prefetch(case(3))), ORDER_SELECT))
    only_card(await call(svc, order_hook(order, prefetch=full_prefetch(case(3))), ORDER_SELECT))  # no feedback
    reason = critical["overrideReasons"][0]
    url = f"/cds-services/{PATIENT_VIEW}/feedback"
    sent = [
        {"card": grades["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-01-06T10:05:00Z"},
        {"card": critical["uuid"], "outcome": "overridden", "overrideReason": {"reason": reason, "userComment": "x"}},
        {"card": "not-ours", "outcome": "accepted"},
    ]
    assert (await svc.post(url, json={"feedback": sent}, headers=cds_headers(path=url))).status_code == 200
    url = f"/cds-services/{ORDER_SELECT}/feedback"
    later = [{"card": risk["uuid"], "outcome": "accepted"}, {"card": grades["uuid"], "outcome": "accepted"}]
    assert (
        await svc.post(url, json={"feedback": later}, headers=cds_headers(ORDER_SELECT, path=url))
    ).status_code == 200

    with Session(clean_engine) as s:
        report = feedback_report(*repository.cards_and_feedback(s, None))
    counts = {(r.card_type, r.indicator): (r.cards, r.answered, r.accepted, r.overridden) for r in report.rows}
    assert counts == {
        ("grades", "critical"): (1, 1, 0, 1),
        ("grades", "warning"): (1, 1, 1, 0),  # its latest feedback (accepted) counts
        ("order-risk", "critical"): (2, 1, 1, 0),
        ("unknown", "-"): (0, 1, 1, 0),
    }
    assert report.reasons == (("grades", reason["code"], 1),)

    assert (
        cli_main(["--database-url", clean_engine.url.render_as_string(hide_password=False), "report", "feedback"]) == 0
    )
    out = capsys.readouterr().out
    assert "order-risk   critical       2        1      100%         0%" in out
    assert f"grades       {reason['code']:24}      1" in out


# --- storage side effects -------------------------------------------------------------------------


async def test_hook_stores_evaluation_and_enqueues_writeback_once(
    make_service: Callable[..., httpx.AsyncClient], ehr: FhirTestServer, clean_engine: Engine
) -> None:
    svc = make_service(ehr_servers={"ehr": ehr.server_config()}, writeback_target="ehr")
    body = hook(prefetch=full_prefetch(case(3)))
    only_card(await call(svc, body))
    first = rows(clean_engine, OutboxRow)
    assert first and {r.patient_id for r in first} == {PID}
    # the same data again (a new JWT): same evaluation, nothing new to write back
    only_card(await call(svc, body))
    with Session(clean_engine) as s:
        again = list(s.exec(select(OutboxRow).order_by(col(OutboxRow.id))).all())
    assert [r.id for r in again] == [r.id for r in first]


# --- the quiet rule as a table (pure) -------------------------------------------------------------


def _ev(crs: int | None, icans: int | None, crs_floor: int | None = None) -> Any:
    from datetime import datetime as dt

    from service.app.evaluate import Evaluation
    from service.core.astct import CRS_METHOD, CRS_SCALE, ICANS_METHOD, ICANS_SCALE
    from service.core.model import GradeResult

    at = dt(2026, 1, 6, 10, tzinfo=FIXED_NOW.tzinfo)
    results = [
        GradeResult(CRS_METHOD, CRS_SCALE, at, crs, "", (), floor=crs_floor),
        GradeResult(ICANS_METHOD, ICANS_SCALE, at, icans, "", ()),
    ]
    return Evaluation("Patient/p1", at, results, [], [], [], {}, [])


@pytest.mark.parametrize(
    ("crs", "icans", "floor", "last_state_same", "shown_hours_ago", "expected"),
    [
        (0, 0, None, False, None, "grade-0"),
        (0, None, None, True, 1.0, "unchanged"),  # ICANS indeterminate: not grade-0; unchanged since shown
        (1, 0, None, True, 1.0, "unchanged"),
        (1, 0, None, True, 7.99, "unchanged"),
        (1, 0, None, True, 8.0, None),  # the shift is over: shown again
        (1, 0, None, False, 1.0, None),  # something changed
        (1, 0, None, True, None, None),  # never shown to this user
        (2, 0, None, True, 1.0, "unchanged"),
        (3, 0, None, True, 1.0, None),  # critical: never quiet by "unchanged"
        (None, 0, 3, True, 1.0, None),  # indeterminate, at least 3: critical
        (None, 0, 2, True, 1.0, "unchanged"),
    ],
)
async def test_quiet_reason_table(
    crs: int | None,
    icans: int | None,
    floor: int | None,
    last_state_same: bool,
    shown_hours_ago: float | None,
    expected: str | None,
) -> None:
    from datetime import timedelta

    from service.cdshooks.attention import Last, quiet_reason, shown_grades

    ev = _ev(crs, icans, floor)
    state = shown_grades(ev)
    shown = None if shown_hours_ago is None else FIXED_NOW - timedelta(hours=shown_hours_ago)
    last = Last(state if last_state_same else state + "x", shown)
    rules = ["grade-0", "unchanged"]
    assert quiet_reason(rules, ev, state, last, FIXED_NOW, timedelta(hours=8)) == expected


# --- a prefetch set aside unparsed (api/orjson_route.py) --------------------------------------


async def test_the_prefetch_is_set_aside_only_from_a_plain_object_body() -> None:
    from service.api.orjson_route import split_prefetch

    doc = hook(prefetch=full_prefetch(case(1)))
    body = orjson.dumps(doc)
    rest, raw = split_prefetch(body) or pytest.fail("not set aside")
    assert rest == {k: v for k, v in doc.items() if k != "prefetch"}
    assert orjson.loads(raw.text) == doc["prefetch"]
    spaced = json.dumps(doc, indent=2).encode()  # whitespace before the object: its text starts at "{"
    assert orjson.loads((split_prefetch(spaced) or pytest.fail("not set aside"))[1].text) == doc["prefetch"]
    whole = [
        orjson.dumps({**doc, "prefetch": None}),
        orjson.dumps({**doc, "prefetch": ["not", "an", "object"]}),
        orjson.dumps({k: v for k, v in doc.items() if k != "prefetch"}),
        b'{"prefetch": {}, "prefetch": {"patient": null}}',  # a repeated key: parsed whole, as ever
        orjson.dumps({**doc, "note": "prefetch"}),  # the word elsewhere: parsed whole (only slower)
        b"\xef\xbb\xbf" + body,  # a byte order mark: the standard library's read
        body.decode().encode("utf-16"),
        body.replace(b'"hook":"patient-view"', b'"hook":NaN'),
        b"[" + body + b"]",
    ]
    for sent in whole:
        assert split_prefetch(sent) is None, sent[:60]


async def test_the_same_prefetch_bytes_again_are_answered_without_parsing_them(
    svc: httpx.AsyncClient, clean_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.cdshooks.service as hooks

    parses: list[int] = []
    real = hooks._parsed
    monkeypatch.setattr(hooks, "_parsed", lambda raw: parses.append(1) or real(raw))
    body = orjson.dumps(hook(prefetch=full_prefetch(case(3))))
    url = f"/cds-services/{PATIENT_VIEW}"

    async def send(content: bytes) -> dict[str, Any]:
        r = await svc.post(url, content=content, headers=cds_headers() | {"Content-Type": "application/json"})
        return only_card(r)

    first = await send(body)
    assert parses == [1] and "CRS grade 3" in first["summary"]
    again = await send(body)  # the very bytes: the stored evaluation answers, unparsed
    assert parses == [1] and again["summary"] == first["summary"]
    assert len([e for e in rows(clean_engine, AuditEvent) if e.action == "hook"]) == 2  # still audited
    # the same data written otherwise: parsed, then served as unchanged inputs
    assert (await send(json.dumps(orjson.loads(body), indent=1).encode()))["summary"] == first["summary"]
    assert parses == [1, 1]
    # the stored inputs changed meanwhile (another path wrote a new version): the same bytes are parsed again
    hotter = {**f.temperature(40.5, T, id=f"{PID}-fever"), "meta": {"versionId": "9"}}
    with Session(clean_engine) as s:
        from service.app.store import store_resources
        from service.codebook import load_codebook

        store_resources(s, [hotter], load_codebook(Settings().canonical_base), server="")
        s.commit()
    await send(body)
    assert parses == [1, 1, 1]


async def test_a_prefetch_set_aside_that_is_not_json_storage_keeps_is_a_400_naming_it(
    svc: httpx.AsyncClient, clean_engine: Engine
) -> None:
    # msgspec skips over invalid UTF-8 inside the prefetch; the parse refuses it: 400, nothing stored
    body = orjson.dumps(hook(prefetch=full_prefetch(case(2)))).replace(b'"Patient"', b'"Pat\xffient"', 1)
    r = await svc.post(
        f"/cds-services/{PATIENT_VIEW}", content=body, headers=cds_headers() | {"Content-Type": "application/json"}
    )
    doc = assert_operation_outcome(r, 400)
    assert doc["issue"][0]["expression"] == ["prefetch"]
    assert rows(clean_engine, StoredResourceRow) == []


async def test_a_prefetch_nested_deeper_than_a_parser_goes_is_never_a_500(svc: httpx.AsyncClient) -> None:
    """Found in review: msgspec (setting the prefetch aside) and the standard library stop at
    Python's recursion limit, orjson at 1,023 levels; neither may turn a body into a 500."""
    from service.api.orjson_route import split_prefetch

    resources = case(2)
    bent = [dict(r) for r in resources]
    next(r for r in bent if r["resourceType"] == "Observation")["note"] = "DEEP"
    template = orjson.dumps(hook(prefetch=full_prefetch(bent)))
    for depth in (900, 960, 1000, 1100):
        for leaf in (b'"x"', b'"\xed\xa0\x80"'):  # orjson refuses the encoded surrogate: the standard library reads
            body = template.replace(b'"DEEP"', b"[" * depth + leaf + b"]" * depth)
            split_prefetch(body)  # returns or declines, never raises
            r = await svc.post(
                f"/cds-services/{PATIENT_VIEW}",
                content=body,
                headers=cds_headers() | {"Content-Type": "application/json"},
            )
            assert r.status_code < 500, (depth, r.status_code, r.text[:200])
