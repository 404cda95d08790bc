"""Several EHRs at once (issue 15): stored inputs, evaluations, CDS answer state, app views, audit
rows and exports are keyed by the EHR server the data came from. Two servers that both have a
Patient/p1 with different data never meet, through any route. Against SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from service.api.app import create_app
from service.config.ehr import FhirServerConfig
from service.config.settings import Settings
from service.security import SecurityConfigError
from service.security.config import load_security
from service.storage import repository
from service.storage.models import CdsCard, StoredResource
from tests import factories as f
from tests.api_helpers import AT, crs3_resources, transaction
from tests.auth import ISSUER, bearer
from tests.conftest import FIXED_NOW
from tests.test_cds_hooks import EHR_ISS, SERVICE_BASE, call, cards_of, case, cds_settings, full_prefetch, hook

BASE = {"a": "https://ehr-a.iectox.test/fhir", "b": "https://ehr-b.iectox.test/fhir"}
PID = f.PATIENT_ID  # both EHRs have a patient with this id: two different people


def headers(client: str, scope: str = "system/*.read system/*.write") -> dict[str, str]:
    return bearer(scope, sub=f"client-{client}")


def two_ehrs(settings: Settings, **extra: Any) -> Settings:
    return settings.model_copy(
        update={
            "ehr_servers": {name: FhirServerConfig(base_url=url) for name, url in BASE.items()},
            "auth_client_servers": {f"{ISSUER} client-a": "a", f"{ISSUER} client-b": "b"},
            **extra,
        }
    )


@pytest_asyncio.fixture
async def svc(settings: Settings, clean_engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(two_ehrs(settings), engine=clean_engine, clock=lambda: FIXED_NOW)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://iectox.test") as c:
        yield c


def b_data() -> list[dict[str, Any]]:
    """EHR b's Patient/p1: another person, afebrile, normotensive on room air."""
    return [
        f.patient(birth_date="1990-05-05"),
        f.temperature(36.8, "2026-01-06T10:00:00+00:00", id="temp1"),
        f.bp_panel(125, 90, "2026-01-06T10:00:00+00:00", id="bp1"),
        f.oxygen_device("none", "2026-01-06T10:00:00+00:00", id="o2dev1"),
    ]


def grades(bundle: dict[str, Any]) -> dict[str, str]:
    out = {}
    for e in bundle["entry"]:
        r = e["resource"]
        if r["resourceType"] == "RiskAssessment" and r["code"]["coding"][0]["code"] == "current-grade":
            out[r["method"]["coding"][0]["code"]] = r["prediction"][0]["outcome"]["coding"][0]["code"]
    return out


def ra_ids(bundle: dict[str, Any]) -> set[str]:
    return {e["resource"]["id"] for e in bundle["entry"] if e["resource"]["resourceType"] == "RiskAssessment"}


@pytest.mark.asyncio
async def test_two_ehrs_patient_p1_never_meet(svc: httpx.AsyncClient, clean_engine: Engine) -> None:
    for client, data in (("a", crs3_resources()), ("b", b_data())):
        r = await svc.post("/fhir", json=transaction(data), headers=headers(client))
        assert r.status_code == 200, r.text
    with Session(clean_engine) as s:
        rows = s.exec(select(StoredResource.server).where(col(StoredResource.id) == "temp1")).all()
    assert sorted(rows) == ["a", "b"]  # both kept: same type and id, two servers

    # reads: each client its own EHR's patient; a client of neither sees no Patient/p1 at all
    assert (await svc.get(f"/fhir/Patient/{PID}", headers=headers("a"))).json()["birthDate"] == "1970-01-01"
    assert (await svc.get(f"/fhir/Patient/{PID}", headers=headers("b"))).json()["birthDate"] == "1990-05-05"
    assert (await svc.get(f"/fhir/Patient/{PID}", headers=bearer())).status_code == 404

    # evaluations: each of its own data, results under different ids
    ev = {}
    for client in ("a", "b"):
        r = await svc.post(f"/fhir/Patient/{PID}/$evaluate", params={"at": AT}, headers=headers(client))
        assert r.status_code == 200, r.text
        ev[client] = r.json()
    assert grades(ev["a"])["astct-crs"] == "grade-3"
    assert grades(ev["b"])["astct-crs"] == "grade-0"
    assert not ra_ids(ev["a"]) & ra_ids(ev["b"])

    # stored results: searched and read only by the patient's own EHR
    for client in ("a", "b"):
        r = await svc.get("/fhir/RiskAssessment", params={"subject": f"Patient/{PID}"}, headers=headers(client))
        assert {e["resource"]["id"] for e in r.json()["entry"]} == ra_ids(ev[client])
    other = next(iter(ra_ids(ev["a"])))
    assert (await svc.get(f"/fhir/RiskAssessment/{other}", headers=headers("b"))).status_code == 404
    assert (await svc.get(f"/fhir/RiskAssessment/{other}", headers=headers("a"))).status_code == 200

    # the clinician app: worklist and page of the user's EHR
    app_scope = "user/*.rs"
    for client, crs in (("a", 3), ("b", 0)):
        (row,) = (await svc.get("/app/api/worklist", headers=headers(client, app_scope))).json()
        page = (await svc.get(f"/app/api/Patient/{PID}", headers=headers(client, app_scope))).json()
        assert row["id"] == PID and row["worst"] == crs, row
        assert page["patient"]["birthDate"] == ("1970-01-01" if client == "a" else "1990-05-05")
    r = await svc.get("/app/api/resource/Observation/temp1", headers=headers("b", app_scope))
    assert r.json()["valueQuantity"]["value"] == 36.8

    # the audit trail: each EHR's accesses to its Patient/p1, the patient named on its own base
    for client in ("a", "b"):
        r = await svc.get("/fhir/AuditEvent", params={"patient": f"Patient/{PID}"}, headers=headers(client))
        events = [e["resource"] for e in r.json()["entry"]]
        assert events, client
        patients = {x["what"].get("reference", "") for ev_ in events for x in ev_["entity"] if "what" in x}
        assert f"{BASE[client]}/Patient/{PID}" in patients
        assert not any(ref.startswith(BASE["b" if client == "a" else "a"]) for ref in patients)

    # a Bulk export: only the results of the caller's EHR
    r = await svc.get(
        "/fhir/$export", params={"_type": "RiskAssessment"}, headers={"Prefer": "respond-async", **headers("b")}
    )
    assert r.status_code == 202, r.text
    manifest = (
        await svc.get(r.headers["content-location"].removeprefix("http://iectox.test"), headers=headers("b"))
    ).json()
    exported: set[str] = set()
    for out in manifest["output"]:
        body = (await svc.get(out["url"].removeprefix("http://iectox.test"), headers=headers("b"))).text
        exported |= {line.split('"id":"')[1].split('"')[0] for line in body.splitlines() if line}
    assert exported == ra_ids(ev["b"])


@pytest.mark.asyncio
async def test_cds_hooks_of_two_ehrs_keep_their_own_patients_and_quiet_state(
    settings: Settings, clean_engine: Engine
) -> None:
    def build(**extra: Any) -> httpx.AsyncClient:
        s = cds_settings(two_ehrs(settings), **extra)
        app = create_app(s, engine=clean_engine, clock=lambda: FIXED_NOW)
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=SERVICE_BASE)

    # No client mapped to a server: a hook's patient is of the configured server its fhirServer names.
    async with build(cds_quiet={"patient-view": ["unchanged"]}, auth_client_servers={}) as svc:
        # Both EHRs' Patient/p1 at CRS grade 1 for the same user: b's card is not "unchanged" from a's.
        (card_a,) = cards_of(await call(svc, hook(prefetch=full_prefetch(case(1)), fhir_server=BASE["a"])))
        (card_b,) = cards_of(await call(svc, hook(prefetch=full_prefetch(case(1)), fhir_server=BASE["b"])))
        assert "CRS grade 1" in card_a["summary"] and "CRS grade 1" in card_b["summary"]
        assert cards_of(await call(svc, hook(prefetch=full_prefetch(case(1)), fhir_server=BASE["b"]))) == []
        # a's patient worsens: a's card; b's patient is not touched by a's data
        (card_a,) = cards_of(await call(svc, hook(prefetch=full_prefetch(case(3)), fhir_server=BASE["a"])))
        assert "CRS grade 3" in card_a["summary"]
        assert cards_of(await call(svc, hook(prefetch=full_prefetch(case(1)), fhir_server=BASE["b"]))) == []
    with Session(clean_engine) as s:
        issued = [(c.server, c.indicator) for c in s.exec(select(CdsCard).order_by(col(CdsCard.id))).all()]
    assert issued == [("a", "info"), ("b", "info"), ("a", "critical")]

    # A CDS client is mapped by its issuer (what the site trusts; it signs any `sub` it likes): mapped
    # to EHR a, it cannot name EHR b's server (it would write into b's patients), whatever its sub.
    async with build(auth_client_servers={EHR_ISS: "a"}) as svc:
        for sub in ("ehr-cds-client", "someone-else", None):
            r = await call(svc, hook(prefetch=full_prefetch(case(1)), fhir_server=BASE["b"]), sub=sub)
            assert r.status_code == 403 and r.json()["issue"][0]["expression"] == ["fhirServer"], r.text
        # no fhirServer: its own EHR's patient, whose stored pressor (from a's grade-3 call) still counts
        (card,) = cards_of(await call(svc, hook(prefetch=full_prefetch(case(2)))))
        assert "CRS grade 3" in card["summary"]
    with Session(clean_engine) as s:
        assert s.exec(select(CdsCard.server).order_by(col(CdsCard.id).desc())).first() == "a"
    # once clients are mapped, an unmapped CDS client may not name a (non-home) configured server
    async with build(auth_client_servers={"https://other-ehr.iectox.test": "b"}) as svc:
        r = await call(svc, hook(prefetch=full_prefetch(case(1)), fhir_server=BASE["a"]))
        assert r.status_code == 403 and r.json()["issue"][0]["expression"] == ["fhirServer"]


def test_unknown_server_names_refuse_to_start(settings: Settings) -> None:
    bad = two_ehrs(settings).model_copy(update={"auth_client_servers": {f"{ISSUER} client-c": "c"}})
    with pytest.raises(SecurityConfigError, match="IECTOX_AUTH_CLIENT_SERVERS"):
        load_security(bad)
    with pytest.raises(SecurityConfigError, match="IECTOX_HOME_SERVER"):
        load_security(two_ehrs(settings, home_server="c"))
    with pytest.raises(ValueError, match="1 to 64 characters"):
        Settings(ehr_servers={"x" * 65: FhirServerConfig(base_url=BASE["a"])})


def test_writeback_to_the_source_server(settings: Settings) -> None:
    from service.app.store import writeback_target

    # A namespace's results go only to its own EHR: b's Patient/p1 is another person at EHR a, and
    # so is the home namespace's (home "default", not configured here: nowhere to write them).
    s = two_ehrs(settings, writeback_target="a")
    assert [writeback_target(s, name) for name in ("", "a", "b")] == [None, "a", None]
    s = two_ehrs(settings, writeback_target="a", writeback_to_source=True)
    assert [writeback_target(s, name) for name in ("", "a", "b")] == [None, "a", "b"]
    s = two_ehrs(settings, writeback_target="a", home_server="a")
    assert [s.namespace(name) for name in ("a", "b")] == ["", "b"]
    assert [writeback_target(s, name) for name in ("", "b")] == ["a", None]
    # a single server is the home server, whatever its name: "" is its namespace
    one = settings.model_copy(update={"ehr_servers": {"ehr": FhirServerConfig(base_url=BASE["a"])}})
    assert (
        one.namespace("ehr") == "" and writeback_target(one.model_copy(update={"writeback_target": "ehr"}), "") == "ehr"
    )


@pytest.mark.asyncio
async def test_a_single_ehr_site_keeps_one_namespace(settings: Settings, clean_engine: Engine) -> None:
    """The home server ("default" unless IECTOX_HOME_SERVER says otherwise) shares the namespace ""
    with unmapped API clients, as before several EHRs were keyed: what its hooks store, an API
    client reads, and the RiskAssessment ids are those of the same patient sent by the API."""
    base = "https://ehr.iectox.test/fhir"
    s = cds_settings(settings, ehr_servers={"default": FhirServerConfig(base_url=base)})
    app = create_app(s, engine=clean_engine, clock=lambda: FIXED_NOW)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=SERVICE_BASE) as svc:
        # fhirServer as the EHR spells it: host case and a trailing slash do not make another server
        only = cards_of(
            await call(svc, hook(prefetch=full_prefetch(case(2)), fhir_server="HTTPS://EHR.iectox.test/fhir/"))
        )
        assert len(only) == 1
        r = await svc.get(f"/fhir/Patient/{PID}", headers=bearer())
        assert r.status_code == 200
        r = await svc.get("/fhir/RiskAssessment", params={"subject": f"Patient/{PID}"}, headers=bearer())
        hooked = {e["resource"]["id"] for e in r.json()["entry"]}
        assert hooked
        r = await svc.post(f"/fhir/Patient/{PID}/$evaluate", headers=bearer())
        assert hooked <= ra_ids(r.json())  # the same ids: the same patient
    with Session(clean_engine) as session:
        assert set(session.exec(select(StoredResource.server)).all()) == {""}


@pytest.mark.asyncio
async def test_refused_calls_are_audited_under_the_callers_server(svc: httpx.AsyncClient, clean_engine: Engine) -> None:
    # a 403 before the route's server dependency ran: still the mapped client's namespace
    r = await svc.get(f"/fhir/Patient/{PID}", headers=headers("b", "system/Observation.read"))
    assert r.status_code == 403
    with Session(clean_engine) as session:
        (row,) = repository.audit_events(session)
    assert (row.status, row.server) == (403, "b")
