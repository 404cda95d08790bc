"""The clinician app's data and pages (service/api/clinician.py, service/app/view.py): what the
pages read agrees with `$evaluate`, values point at their stored source, the API needs read
scopes, and every script and style is served by iectox (no CDN). The browser tests are in
tests/test_app_browser.py."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import pytest_asyncio
from sqlalchemy import Engine

from service.api.app import create_app
from service.app.evaluate import evaluate_body
from service.codebook import load_codebook
from service.config.settings import Settings
from service.core.astct import CRS_METHOD, ICANS_METHOD
from service.security.errors import SecurityConfigError
from tests import factories as f
from tests.auth import bearer
from tests.conftest import FIXED_NOW

WEB = Path(__file__).resolve().parent.parent / "service" / "web"


def transaction(resources: list[dict[str, Any]]) -> bytes:
    entries = [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in resources
    ]
    return orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries})


async def store(client: httpx.AsyncClient, resources: list[dict[str, Any]]) -> None:
    r = await client.post("/fhir", content=transaction(resources), headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 200, r.text


@pytest.fixture
def roomy(settings: Settings) -> Settings:
    return settings.model_copy(update={"max_body_bytes": 20_000_000, "max_bundle_entries": 20_000})


@pytest_asyncio.fixture
async def app_client(roomy: Settings, clean_engine: Engine):  # type: ignore[no-untyped-def]
    app = create_app(roomy, engine=clean_engine, clock=lambda: FIXED_NOW)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://iectox.test", headers=bearer()
    ) as c:
        yield c


@pytest.mark.asyncio
async def test_worklist_and_patient_view_agree_with_evaluate(app_client: httpx.AsyncClient, roomy: Settings) -> None:
    codebook = load_codebook(roomy.canonical_base)
    stored = {}
    for i, scenario in enumerate(("crs-3", "no-crs")):
        pid, resources, _ = f.synthetic_at_peak(scenario, i, seed=i, base=roomy.canonical_base)
        await store(app_client, resources)
        body = orjson.dumps(
            {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}
        )
        stored[pid] = evaluate_body(body, codebook, roomy, None, FIXED_NOW)

    r = await app_client.get("/app/api/worklist")
    assert r.status_code == 200, r.text
    rows = r.json()
    assert [row["id"] for row in rows] == sorted(stored, key=lambda p: -(stored[p].results[0].grade or 0))
    for row in rows:
        ev = stored[row["id"]]
        by = {x.method: x for x in ev.results}
        assert row["crs"]["grade"] == by[CRS_METHOD].grade and row["icans"]["grade"] == by[ICANS_METHOD].grade
        assert row["at"] == ev.at.isoformat()
        assert row["day"] is not None and row["product"]
    top = rows[0]
    assert top["crs"]["grade"] == 3 and top["worst"] == 3
    assert any(c.startswith("CRS ") and c.endswith("→ 3") for c in top["changes"]), top["changes"]
    assert rows[1]["crs"]["grade"] == 0

    pid = top["id"]
    r = await app_client.get(f"/app/api/Patient/{pid}")
    assert r.status_code == 200, r.text
    view = r.json()
    ev = stored[pid]
    assert view["at"] == ev.at.isoformat() and view["patient"]["id"] == pid
    current = {x.method: x for x in ev.results}
    courses = {c.method: c for c in ev.courses}
    assert [s["method"] for s in view["scales"]] == [x.method for x in ev.results]
    for s in view["scales"]:
        assert s["current"]["grade"] == current[s["method"]].grade
        assert s["current"]["basis"] == list(current[s["method"]].basis)
        assert len(s["hourly"]) == len(view["hours"]) == courses[s["method"]].samples
        assert s["course"]["peak_grade"] == courses[s["method"]].peak_grade
        assert [(d["day"], d["grade"]) for d in s["course"]["daily_max"]] == list(courses[s["method"]].daily_max)
        known = [g for g in s["hourly"] if g is not None]
        assert max(known, default=None) == courses[s["method"]].peak_grade
    assert view["hours"][-1] == view["at"]
    # one canonical unit per concept, the value as sent kept beside it
    temps = next(x for x in view["series"] if x["concept"] == "body-temperature")
    assert temps["unit"] == "°C" and all(isinstance(p["v"], float) and p["shown"] for p in temps["points"])
    # every value points at the stored resource it came from
    refs = {p["ref"] for x in view["series"] for p in x["points"]} | {d["ref"] for d in view["drugs"]}
    for ref in sorted(refs)[:25]:
        res = (await app_client.get(f"/app/api/resource/{ref}")).json()
        assert f"{res['resourceType']}/{res['id']}" == ref
    assert any(d["kind"] == "vasopressor" and d["rate"] is not None for d in view["drugs"])
    assert view["scores"] and all(s["citation"] for s in view["scores"])


@pytest.mark.asyncio
async def test_app_api_needs_a_token_with_read_scopes(app_client: httpx.AsyncClient) -> None:
    r = await app_client.get("/app/api/worklist", headers={"Authorization": ""})
    assert r.status_code == 401 and r.json()["resourceType"] == "OperationOutcome"
    r = await app_client.get("/app/api/worklist", headers=bearer("system/Patient.read system/Observation.read"))
    assert r.status_code == 403
    assert "MedicationAdministration" in r.json()["issue"][0]["diagnostics"]
    r = await app_client.get("/app/api/worklist", headers=bearer("user/*.rs"))
    assert r.status_code == 200 and r.json() == []
    assert (await app_client.get("/app/api/Patient/nobody")).status_code == 404
    for path in ("/app/api/resource/RiskAssessment/x", "/app/api/resource/Observation/none"):
        r = await app_client.get(path)
        assert r.status_code == 404 and r.json()["resourceType"] == "OperationOutcome"
    # one resource needs read on its own type too (the page's scopes do not cover Medication)
    page_scopes = "user/Patient.rs user/Observation.rs user/MedicationAdministration.rs user/Condition.rs "
    page_scopes += "user/Procedure.rs user/RiskAssessment.rs"
    r = await app_client.get("/app/api/resource/Medication/m1", headers=bearer(page_scopes))
    assert r.status_code == 403 and "Medication" in r.json()["issue"][0]["diagnostics"]


@pytest.mark.asyncio
async def test_every_app_view_is_audited(app_client: httpx.AsyncClient, clean_engine: Engine) -> None:
    from sqlmodel import Session, select

    from service.storage.models import AuditEvent

    pid, resources, _ = f.synthetic_at_peak()
    await store(app_client, resources)
    obs = next(r for r in resources if r["resourceType"] == "Observation")
    for path in ("/app/api/worklist", f"/app/api/Patient/{pid}", f"/app/api/resource/Observation/{obs['id']}"):
        assert (await app_client.get(path)).status_code == 200
    assert (await app_client.get("/app/api/Patient/nobody")).status_code == 404
    with Session(clean_engine) as s:
        rows = [e for e in s.exec(select(AuditEvent)).all() if e.route.startswith("/app/")]
    seen = sorted((e.action, e.resource_type, e.patient_id, e.status) for e in rows)
    assert seen == sorted(
        [
            ("app-search", None, None, 200),
            ("app-view", "Patient", pid, 200),
            ("app-view", "Observation", pid, 200),  # the resource's patient, from storage
            ("app-view", "Patient", "nobody", 404),
        ]
    )
    assert all(e.actor.startswith("https://idp.iectox.test") for e in rows)


@pytest.mark.asyncio
async def test_pages_and_configuration(app_client: httpx.AsyncClient) -> None:
    for path in ("/app/", "/app/Patient/p1", "/app/launch", "/app/callback"):
        r = await app_client.get(path, headers={"Authorization": ""})  # a page is a shell: no data, no token
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in r.headers["content-security-policy"]
    assert "connect-src 'self';" in r.headers["content-security-policy"]  # no EHR configured: iectox only
    cfg = (await app_client.get("/app/config.json")).json()
    assert cfg["dev"] is False and cfg["smart"] is False  # jwt mode, the app not configured
    assert "user/Observation.rs" in cfg["needs"]
    r = await app_client.get("/app/static/vendor/uplot/uPlot.iife.min.js")
    assert r.status_code == 200 and "javascript" in r.headers["content-type"]


def test_every_script_and_style_is_served_by_iectox() -> None:
    """No CDN: hospital networks block them. Pages load only /app/static/...; scripts fetch only
    iectox (/app, /fhir) and the EHR addresses the launch discovers."""
    for page in WEB.glob("*.html"):
        text = page.read_text()
        for attr in re.findall(r'(?:src|href)="([^"]*)"', text):
            assert attr.startswith("/app/") or attr == "data:,", (page.name, attr)
    for script in (WEB / "static").glob("*.js"):
        text = script.read_text()
        assert not re.search(r"https?://", text), script.name
        assert "import" not in text or all(m.startswith("./") for m in re.findall(r"from '([^']+)'", text))


def test_vendored_chart_library_is_the_released_package(repo_root: Path) -> None:
    """uPlot 1.6.32 (MIT) as published on npm: tests/node installs the same version; the copy
    served by iectox must be byte for byte the package's."""
    package = repo_root / "tests" / "node" / "node_modules" / "uplot"
    assert orjson.loads((package / "package.json").read_bytes())["version"] == "1.6.32"
    vendored = WEB / "static" / "vendor" / "uplot"
    for ours, theirs in (
        ("uPlot.iife.min.js", "dist/uPlot.iife.min.js"),
        ("uPlot.min.css", "dist/uPlot.min.css"),
        ("LICENSE", "LICENSE"),
    ):
        digest = hashlib.sha256((vendored / ours).read_bytes()).hexdigest()
        assert digest == hashlib.sha256((package / theirs).read_bytes()).hexdigest(), ours


@pytest.mark.parametrize(
    "update",
    [
        {"app_client_id": "iectox"},
        {
            "app_client_id": "c",
            "app_fhir_base": "http://ehr.example/fhir",
            "app_issuer": "i",
            "app_jwks_url": "https://x",
        },
        {
            "app_client_id": "c",
            "app_fhir_base": "https://e/fhir",
            "app_issuer": "i",
            "app_jwks_url": "https://x",
            "app_algorithms": ("HS256",),
        },
    ],
)
def test_app_settings_are_checked_at_start(settings: Settings, update: dict[str, Any]) -> None:
    with pytest.raises(SecurityConfigError):
        create_app(settings.model_copy(update={**update, "auto_migrate": False}))


def test_changes_in_the_24_hours_before_the_latest_input() -> None:
    """From the last sample at or before the window's start to now; a higher grade in between is
    said even when the ends are equal; drugs started in the window are named."""
    from datetime import timedelta
    from types import SimpleNamespace

    from service.app.view import _changes
    from service.core.model import Administration, PatientData

    at = datetime(2026, 1, 10, 12, tzinfo=UTC)
    times = [at - timedelta(hours=h) for h in range(30, -1, -1)]  # 31 hourly samples ending at `at`
    start = times.index(at - timedelta(hours=24))
    crs = [1] * len(times)
    crs[start + 5 : start + 9] = [3, 3, 3, 3]  # CRS 3 for 4 h, back to 1 by now
    icans = [0] * start + [None] * (len(times) - start)  # indeterminate from the window's start
    icans[start - 1] = 2  # a grade 2 just before the window does not count
    data = PatientData("Patient/p")
    data.administrations = {
        "tocilizumab": [Administration("tocilizumab", at - timedelta(hours=3), None, "MedicationAdministration/t")],
        "dexamethasone": [
            Administration("dexamethasone", at - timedelta(hours=30), None, "MedicationAdministration/d")
        ],
    }
    changes = _changes(
        SimpleNamespace(at=at), SimpleNamespace(data=data), times, {"astct-crs": crs, "astct-icans": icans}
    )
    assert changes == ["CRS 1 → 1 (reached 3)", "Tocilizumab started"]


def test_changes_start_from_the_last_sample_at_or_before_the_window() -> None:
    from datetime import timedelta
    from types import SimpleNamespace

    from service.app.view import _changes
    from service.core.model import PatientData

    at = datetime(2026, 1, 10, 12, 30, tzinfo=UTC)  # the latest input, between two grid points
    times = [datetime(2026, 1, 9, 6, tzinfo=UTC) + timedelta(hours=h) for h in range(31)] + [at]
    start = times.index(datetime(2026, 1, 9, 12, tzinfo=UTC))  # the last sample <= at - 24 h
    crs = [2] * (start + 1) + [1] * (len(times) - start - 1)  # 2 until 12:00 yesterday, then 1
    grader = SimpleNamespace(data=PatientData("Patient/p"))
    changes = _changes(SimpleNamespace(at=at), grader, times, {"astct-crs": crs, "astct-icans": [0] * len(times)})
    assert changes == ["CRS 2 → 1"]


def _app_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "app_client_id": "iectox-app",
            "app_fhir_base": "https://ehr.example/fhir",
            "app_issuer": "https://ehr.example",
            "app_jwks_url": "https://ehr.example/jwks",
        }
    )


def test_app_tokens_must_be_the_ehrs_for_this_app(settings: Settings) -> None:
    """Issuer, audience (the EHR's FHIR base), signature and, when named, the client."""
    from service.security.bearer import IssuerKeys, verify_app_token
    from service.security.errors import AuthError
    from service.security.jwks import KeyCache, parse_jwks
    from tests.auth import jwks, token

    s = _app_settings(settings)
    keys = IssuerKeys(parse_jwks(jwks()), None, KeyCache(0))
    now = datetime.now(UTC)

    def app_token(**claims: Any) -> str:
        base = {"iss": "https://ehr.example", "aud": "https://ehr.example/fhir", "client_id": "iectox-app"}
        return token("user/*.rs", **{**base, **claims})

    principal = verify_app_token(app_token(), s, keys, now)
    assert principal.actor == "https://ehr.example test-client" and principal.allows("read", "Observation")
    assert verify_app_token(app_token(client_id=None), s, keys, now).actor  # no client named: accepted
    for bad in ({"client_id": "another-app"}, {"azp": "another-app", "client_id": None}, {"aud": "https://iectox"}):
        with pytest.raises(AuthError):
            verify_app_token(app_token(**bad), s, keys, now)
    with pytest.raises(AuthError):
        verify_app_token(app_token(iss="https://idp.iectox.test"), s, keys, now)


def test_pages_allow_connections_to_the_configured_ehr_only(settings: Settings) -> None:
    from service.api.clinician import page_headers

    csp = page_headers(_app_settings(settings))["Content-Security-Policy"]
    assert "connect-src 'self' https://ehr.example;" in csp


def test_feedback_report_since_needs_a_time_with_a_timezone(capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main

    assert main(["--database-url", "sqlite://", "report", "feedback", "--since", "yesterday"]) == 2
    assert main(["--database-url", "sqlite://", "report", "feedback", "--since", "2026-01-01T00:00"]) == 2
    assert "timezone" in capsys.readouterr().err
