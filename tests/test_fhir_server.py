"""The node FHIR test server itself (tests/node/fhir-server.mjs), over real HTTP.

These pin down the behaviour the client tests (and other suites) rely on: SMART token rules,
bearer auth and scopes, CRUD / conditional / transaction semantics, paging links, validation
and the test-control endpoints.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.fhir_server import FhirTestServer

pytestmark = pytest.mark.integration  # the Node FHIR test server

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FHIR_JSON = {"Content-Type": "application/fhir+json"}
LOINC = "http://loinc.org"


@pytest.fixture
def srv(fhir_server_clean: FhirTestServer) -> FhirTestServer:
    return fhir_server_clean


@pytest.fixture
def http(srv: FhirTestServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.base_url + "/", headers=srv.headers(), timeout=30) as c:
        yield c


def patient(family: str = "Test") -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": family}]}


def observation(pid: str, code: str, when: str, value: float = 1.0) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value},
    }


def risk(pid: str, ident: str, status: str = "final") -> dict[str, Any]:
    return {
        "resourceType": "RiskAssessment",
        "status": status,
        "identifier": [{"system": "urn:iectox:test", "value": ident}],
        "subject": {"reference": f"Patient/{pid}"},
        # no probabilityDecimal: Medplum 4.5.2 would flag ras-2 here (known false positive)
        "prediction": [{"qualitativeRisk": {"coding": [{"code": "low"}]}}],
    }


def create(http: httpx.Client, resource: dict[str, Any]) -> dict[str, Any]:
    resp = http.post(resource["resourceType"], json=resource, headers=FHIR_JSON)
    assert resp.status_code == 201, resp.text
    out: dict[str, Any] = resp.json()
    return out


def token_form(assertion: str, scope: str = "system/*.rs") -> dict[str, str]:
    return {
        "grant_type": "client_credentials",
        "scope": scope,
        "client_assertion_type": JWT_BEARER,
        "client_assertion": assertion,
    }


# ---- SMART ------------------------------------------------------------------------------------


def test_smart_configuration(srv: FhirTestServer) -> None:
    for url in (f"{srv.base_url}/.well-known/smart-configuration", f"{srv.origin}/.well-known/smart-configuration"):
        doc = httpx.get(url).json()
        assert doc["token_endpoint"] == srv.token_url
        assert doc["grant_types_supported"] == ["client_credentials"]
        assert doc["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
        assert set(doc["token_endpoint_auth_signing_alg_values_supported"]) == {"RS384", "ES384"}
        assert "system/*.rs" in doc["scopes_supported"]


@pytest.mark.parametrize("which", ["client", "client_es384"])
def test_token_issued_and_accepted(srv: FhirTestServer, which: str) -> None:
    client = getattr(srv, which)
    resp = httpx.post(srv.token_url, data=token_form(srv.assertion(client), "system/Patient.rs"))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["token_type"] == "bearer"  # noqa: S105
    assert body["scope"] == "system/Patient.rs"
    assert 0 < body["expires_in"] <= 300
    assert resp.headers["cache-control"] == "no-store"
    ok = httpx.get(f"{srv.base_url}/Patient", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert ok.status_code == 200
    # scope enforcement: Patient.rs does not allow reading Observations or creating Patients
    denied = httpx.get(f"{srv.base_url}/Observation", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert denied.status_code == 403
    assert denied.json()["issue"][0]["code"] == "forbidden"
    stats = srv.stats()
    assert stats["tokens_issued"] == 1 and stats["forbidden"] == 1


def _hs384(srv: FhirTestServer) -> str:
    now = int(time.time())
    claims = {
        "iss": srv.client.client_id,
        "sub": srv.client.client_id,
        "aud": srv.token_url,
        "exp": now + 60,
        "jti": str(uuid.uuid4()),
    }
    return jwt.encode(claims, "a-shared-secret-that-is-long-enough-for-hs384-xxxxxxxxxxxxxxxxxx", algorithm="HS384")


@pytest.mark.parametrize(
    ("case", "status", "error"),
    [
        ("wrong_aud", 401, "invalid_client"),
        ("expired", 401, "invalid_client"),
        ("exp_too_far", 401, "invalid_client"),
        ("iss_not_sub", 401, "invalid_client"),
        ("unknown_client", 401, "invalid_client"),
        ("unregistered_key", 401, "invalid_client"),
        ("hmac", 401, "invalid_client"),
        ("no_jti", 401, "invalid_client"),
        ("grant_type", 400, "unsupported_grant_type"),
        ("assertion_type", 400, "invalid_request"),
        ("no_scope", 400, "invalid_scope"),
    ],
)
def test_token_rejections(srv: FhirTestServer, case: str, status: int, error: str) -> None:
    now = int(time.time())
    form = token_form(srv.assertion())
    if case == "wrong_aud":
        form["client_assertion"] = srv.assertion(aud=srv.base_url)
    elif case == "expired":
        form["client_assertion"] = srv.assertion(iat=now - 600, exp=now - 300)
    elif case == "exp_too_far":
        form["client_assertion"] = srv.assertion(exp=now + 900)
    elif case == "iss_not_sub":
        form["client_assertion"] = srv.assertion(sub="someone-else")
    elif case == "unknown_client":
        form["client_assertion"] = srv.assertion(iss="nobody", sub="nobody")
    elif case == "unregistered_key":
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        claims = jwt.decode(srv.assertion(), options={"verify_signature": False})
        form["client_assertion"] = jwt.encode(claims, other, algorithm="RS384", headers={"kid": srv.client.kid})
    elif case == "hmac":
        form["client_assertion"] = _hs384(srv)
    elif case == "no_jti":
        form["client_assertion"] = srv.assertion(jti=None)
    elif case == "grant_type":
        form["grant_type"] = "authorization_code"
    elif case == "assertion_type":
        form["client_assertion_type"] = "urn:example:other"
    elif case == "no_scope":
        del form["scope"]
    resp = httpx.post(srv.token_url, data=form)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"] == error
    assert srv.stats()["tokens_issued"] == 0


def test_token_jti_replay_rejected(srv: FhirTestServer) -> None:
    assertion = srv.assertion()
    assert httpx.post(srv.token_url, data=token_form(assertion)).status_code == 200
    again = httpx.post(srv.token_url, data=token_form(assertion))
    assert again.status_code == 401
    assert "replay" in again.json()["error_description"]


def test_fhir_needs_a_valid_bearer_token(srv: FhirTestServer) -> None:
    url = f"{srv.base_url}/Patient"
    missing = httpx.get(url)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert missing.json()["resourceType"] == "OperationOutcome"
    assert httpx.get(url, headers={"Authorization": "Bearer not-a-token"}).status_code == 401
    token = srv.token()
    assert httpx.get(url, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    srv.revoke_tokens()
    assert httpx.get(url, headers={"Authorization": f"Bearer {token}"}).status_code == 401
    srv.add_static_token("cds-token", "system/Patient.rs")
    assert httpx.get(url, headers={"Authorization": "Bearer cds-token"}).status_code == 200
    srv.configure(auth=False)
    assert httpx.get(url).status_code == 200


# ---- REST semantics ---------------------------------------------------------------------------


def test_crud_versions_and_if_match(http: httpx.Client, srv: FhirTestServer) -> None:
    resp = http.post("Patient", json=patient() | {"meta": {"versionId": "client-chosen"}}, headers=FHIR_JSON)
    assert resp.status_code == 201
    p = resp.json()
    assert p["meta"]["versionId"] != "client-chosen"  # the server owns versionId
    assert resp.headers["location"] == f"{srv.base_url}/Patient/{p['id']}/_history/{p['meta']['versionId']}"
    assert resp.headers["etag"] == f'W/"{p["meta"]["versionId"]}"'
    assert http.get(f"Patient/{p['id']}").json() == p

    updated = http.put(f"Patient/{p['id']}", json=p | {"gender": "female"}, headers=FHIR_JSON)
    assert updated.status_code == 200
    v2 = updated.json()["meta"]["versionId"]
    stale = http.put(f"Patient/{p['id']}", json=p, headers=FHIR_JSON | {"If-Match": f'W/"{p["meta"]["versionId"]}"'})
    assert stale.status_code == 412
    fresh = http.put(f"Patient/{p['id']}", json=p, headers=FHIR_JSON | {"If-Match": f'W/"{v2}"'})
    assert fresh.status_code == 200

    history = [http.get(f"Patient/{p['id']}/_history").json() for _ in range(2)]
    versions = [[e["resource"]["meta"]["versionId"] for e in h["entry"]] for h in history]
    assert versions[0] == versions[1]  # 4.5.2 reversed the stored list on every call
    assert versions[0][1] == v2 and versions[0][2] == p["meta"]["versionId"]  # newest first
    assert len(http.get(f"Patient/{p['id']}/_history", params={"_count": 1}).json()["entry"]) == 1

    assert http.delete(f"Patient/{p['id']}").status_code == 200
    assert http.get(f"Patient/{p['id']}").status_code == 404


def test_writes_are_validated(http: httpx.Client) -> None:
    bad = {"resourceType": "Observation", "code": {"text": "no status"}}
    resp = http.post("Observation", json=bad, headers=FHIR_JSON)
    assert resp.status_code == 400
    issue = resp.json()["issue"][0]
    assert issue["expression"] == ["Observation.status"]
    assert http.post("Observation", content=b"{not json", headers=FHIR_JSON).status_code == 400
    # RiskAssessment without probabilityDecimal is valid (Medplum's ras-2 false positive is ignored)
    pid = create(http, patient())["id"]
    assert http.post("RiskAssessment", json=risk(pid, "a"), headers=FHIR_JSON).status_code == 201


def test_conditional_create_and_update(http: httpx.Client) -> None:
    pid = create(http, patient())["id"]
    ident = "urn:iectox:test|x1"
    conditional = FHIR_JSON | {"If-None-Exist": f"identifier={ident}"}
    first = http.post("RiskAssessment", json=risk(pid, "x1"), headers=conditional)
    second = http.post("RiskAssessment", json=risk(pid, "x1"), headers=conditional)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"]

    up1 = http.put(
        "RiskAssessment", params={"identifier": "urn:iectox:test|x2"}, json=risk(pid, "x2"), headers=FHIR_JSON
    )
    up2 = http.put(
        "RiskAssessment",
        params={"identifier": "urn:iectox:test|x2"},
        json=risk(pid, "x2", "amended"),
        headers=FHIR_JSON,
    )
    assert (up1.status_code, up2.status_code) == (201, 200)
    assert up1.json()["id"] == up2.json()["id"]
    found = http.get("RiskAssessment", params={"identifier": "urn:iectox:test|x2"}).json()
    assert found["total"] == 1 and found["entry"][0]["resource"]["status"] == "amended"

    # A misspelt parameter must not match (and overwrite) everything: 4.5.2 ignores unknown
    # parameters, the wrapper answers 400 for conditional writes too, also inside Bundles.
    typo = http.put(
        "RiskAssessment",
        params={"identifer": "urn:iectox:test|x2"},
        json=risk(pid, "x2", "cancelled"),
        headers=FHIR_JSON,
    )
    assert typo.status_code == 400
    tx = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": risk(pid, "x2", "cancelled"),
                "request": {"method": "PUT", "url": "RiskAssessment?identifer=x"},
            }
        ],
    }
    bad_tx = http.post("", json=tx, headers=FHIR_JSON)
    assert bad_tx.status_code == 400
    assert bad_tx.json()["issue"][0]["expression"] == ["Bundle.entry[0].request"]
    assert http.get(f"RiskAssessment/{up1.json()['id']}").json()["status"] == "amended"
    # bare ids in conditional searches are normalised like in searches
    subject = http.post(
        "RiskAssessment",
        json=risk(pid, "x3"),
        headers=FHIR_JSON | {"If-None-Exist": f"subject={pid}&identifier=urn:iectox:test|x2"},
    )
    assert subject.status_code == 200 and subject.json()["id"] == up1.json()["id"]


def _tx(pid: str, ident: str) -> dict[str, Any]:
    ra_urn = f"urn:uuid:{uuid.uuid4()}"
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": ra_urn,
                "resource": risk(pid, ident),
                "request": {"method": "PUT", "url": f"RiskAssessment?identifier=urn:iectox:test|{ident}"},
            },
            {
                "resource": {
                    "resourceType": "Provenance",
                    "target": [{"reference": ra_urn}],
                    "recorded": "2026-01-01T00:00:00Z",
                    "agent": [{"who": {"display": "iectox"}}],
                },
                "request": {"method": "POST", "url": "Provenance"},
            },
        ],
    }


def test_transaction_conditional_update_and_urn_rewriting(http: httpx.Client, srv: FhirTestServer) -> None:
    pid = create(http, patient())["id"]
    r1 = http.post("", json=_tx(pid, "t1"), headers=FHIR_JSON)
    r2 = http.post("", json=_tx(pid, "t1"), headers=FHIR_JSON)
    assert r1.status_code == r2.status_code == 200
    b1, b2 = r1.json(), r2.json()
    assert b1["type"] == "transaction-response"
    assert [e["response"]["status"] for e in b1["entry"]] == ["201", "201"]
    assert [e["response"]["status"] for e in b2["entry"]] == ["200", "201"]
    ra_id = b1["entry"][0]["resource"]["id"]
    assert b2["entry"][0]["resource"]["id"] == ra_id
    assert b1["entry"][0]["fullUrl"] == f"{srv.base_url}/RiskAssessment/{ra_id}"
    assert http.get("RiskAssessment").json()["total"] == 1
    provs = http.get("Provenance").json()["entry"]
    assert [p["resource"]["target"][0]["reference"] for p in provs] == [f"RiskAssessment/{ra_id}"] * 2


def test_transaction_is_atomic(http: httpx.Client) -> None:
    p = create(http, patient())
    # The create runs first, then the update fails on its stale If-Match: nothing may remain.
    # (MemoryRepository.withTransaction is a no-op in 4.5.2; the server snapshots/restores.)
    tx = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": patient("Created"), "request": {"method": "POST", "url": "Patient"}},
            {
                "resource": p | {"gender": "male"},
                "request": {"method": "PUT", "url": f"Patient/{p['id']}", "ifMatch": 'W/"stale"'},
            },
        ],
    }
    resp = http.post("", json=tx, headers=FHIR_JSON)
    assert resp.status_code == 412
    assert http.get("Patient", params={"name": "Created"}).json()["total"] == 0
    assert "gender" not in http.get(f"Patient/{p['id']}").json()

    tx["entry"][1] = {"resource": {"resourceType": "Observation"}, "request": {"method": "POST", "url": "Observation"}}
    invalid = http.post("", json=tx, headers=FHIR_JSON)
    assert invalid.status_code == 400
    assert any(e.startswith("Bundle.entry[1].resource") for i in invalid.json()["issue"] for e in i["expression"])
    assert http.get("Patient", params={"name": "Created"}).json()["total"] == 0


def test_batch_answers_invalid_entries_separately(http: httpx.Client) -> None:
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": {"resourceType": "Observation"}, "request": {"method": "POST", "url": "Observation"}},
            {"resource": patient("Batch"), "request": {"method": "POST", "url": "Patient"}},
        ],
    }
    resp = http.post("", json=batch, headers=FHIR_JSON)
    assert resp.status_code == 200
    assert [e["response"]["status"] for e in resp.json()["entry"]] == ["400", "201"]


def test_search_paging_sort_and_filters(http: httpx.Client, srv: FhirTestServer) -> None:
    pid = create(http, patient())["id"]
    other = create(http, patient("Other"))["id"]
    for day in range(1, 8):
        create(http, observation(pid, "8310-5" if day % 2 else "8867-4", f"2026-01-0{day}T10:00:00+02:00", day))
    create(http, observation(other, "8310-5", "2026-01-03T10:00:00Z"))

    page = http.get("Observation", params={"patient": pid, "_count": 3, "_sort": "-date"}).json()
    assert page["total"] == 7
    links = {lk["relation"]: lk["url"] for lk in page["link"]}
    assert links["next"].startswith(f"{srv.base_url}/Observation?")
    dates = [e["resource"]["effectiveDateTime"] for e in page["entry"]]
    seen = 0
    url: str | None = links["self"]
    while url:  # follow the links exactly as given
        bundle = httpx.get(url, headers=srv.headers()).json()
        assert all(e["search"]["mode"] == "match" and e["fullUrl"].startswith(srv.base_url) for e in bundle["entry"])
        seen += len(bundle["entry"])
        url = next((lk["url"] for lk in bundle["link"] if lk["relation"] == "next"), None)
    assert seen == 7
    assert dates == sorted(dates, reverse=True)

    # bare ids, OR codes, date prefixes, multi-key sort (code first, then date descending)
    hits = http.get("Observation", params={"subject": pid, "code": f"{LOINC}|8310-5", "date": "ge2026-01-03"}).json()
    assert hits["total"] == 3
    multi = http.get("Observation", params={"patient": pid, "_sort": "code,-date"}).json()["entry"]
    codes = [e["resource"]["code"]["coding"][0]["code"] for e in multi]
    assert codes == ["8310-5"] * 4 + ["8867-4"] * 3
    assert [e["resource"]["valueQuantity"]["value"] for e in multi][:4] == [7, 5, 3, 1]
    # the default page size applies without _count
    srv.configure(default_count=2)
    assert len(http.get("Observation", params={"patient": pid}).json()["entry"]) == 2


def test_last_updated_search(http: httpx.Client) -> None:
    pid = create(http, patient())["id"]
    first = create(http, observation(pid, "8310-5", "2026-01-01T00:00:00Z"))
    time.sleep(0.01)
    second = create(http, observation(pid, "8310-5", "2026-01-02T00:00:00Z"))
    found = http.get("Observation", params={"_lastUpdated": f"gt{first['meta']['lastUpdated']}"}).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [second["id"]]


def test_unknown_search_parameters_are_rejected(http: httpx.Client) -> None:
    for params in ({"bogus": "1"}, {"_include": "Observation:subject"}):
        resp = http.get("Observation", params=params)
        assert resp.status_code == 400
        assert resp.json()["issue"][0]["code"] == "not-supported"


def test_search_by_post(http: httpx.Client) -> None:
    pid = create(http, patient())["id"]
    create(http, observation(pid, "8310-5", "2026-01-01T00:00:00Z"))
    resp = http.post("Observation/_search", data={"patient": pid, "code": f"{LOINC}|8310-5"})
    assert resp.status_code == 200 and resp.json()["total"] == 1


# ---- test control -----------------------------------------------------------------------------


def test_faults_and_stats(http: httpx.Client, srv: FhirTestServer) -> None:
    srv.inject_fault(429, retry_after=3, count=2, path="Patient")
    assert http.get("Observation").status_code == 200  # other paths are not affected
    for _ in range(2):
        resp = http.get("Patient")
        assert resp.status_code == 429 and resp.headers["retry-after"] == "3"
    assert http.get("Patient").status_code == 200
    srv.inject_fault(drop=True)
    with pytest.raises(httpx.RemoteProtocolError):
        http.get("Patient")
    srv.inject_fault(503, target="token")
    assert httpx.post(srv.token_url, data=token_form(srv.assertion())).status_code == 503
    stats = srv.stats()
    assert stats["faults_served"] == 4
    assert stats["token_requests"] == 0  # the fault answered before the token endpoint
    assert [e["status"] for e in stats["log"] if e["path"] == "/fhir/Patient"] == [429, 429, 200, 0]  # 0: dropped


def test_seed_keeps_ids_and_meta(http: httpx.Client, srv: FhirTestServer) -> None:
    stored = srv.seed([patient() | {"id": "p1", "meta": {"versionId": "7", "lastUpdated": "2020-01-01T00:00:00Z"}}])
    assert stored[0]["id"] == "p1"
    assert http.get("Patient/p1").json()["meta"] == {"versionId": "7", "lastUpdated": "2020-01-01T00:00:00Z"}


def test_restart_keeps_port_and_loses_data(http: httpx.Client, srv: FhirTestServer) -> None:
    pid = create(http, patient())["id"]
    port = srv.port
    srv.restart()
    assert srv.port == port
    assert http.get(f"Patient/{pid}").status_code == 404
