"""The clinician app in a real browser (Debian's Chromium, headless, through Playwright), against
the service under uvicorn and, for the SMART launch, the test FHIR server's authorization server.

What a person would see is checked: the worklist's rows and grades, the patient page's grades,
bands and missing-data notes, the value behind a point, and that nothing is loaded from outside
(no CDN). Screenshots are kept in tests/artifacts/.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from playwright.sync_api import Browser, Page

from service.api.app import create_app
from service.config.settings import Settings
from service.devtools.synth import generate_cohort
from service.storage.db import make_engine, migrate
from tests import factories as f
from tests.auth import auth_settings, jwks, sign
from tests.browser import ARTIFACTS, LiveServer, free_port
from tests.fhir_server import FhirTestServer

EHR_ISS = "https://ehr.browser.test"
EHR_KEY = ec.generate_private_key(ec.SECP384R1())
APP_CLIENT = "iectox-clinician-app"


def _watch(page: Page, base: str) -> tuple[list[str], list[str]]:
    """Every request the page makes, and the errors of iectox's pages: script errors, console
    errors and failed responses from iectox (the test EHR's own sign-in page is not ours)."""
    requests: list[str] = []
    errors: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and page.url.startswith(base) else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on(
        "response",
        lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 and r.url.startswith(base) else None,
    )
    return requests, errors


def _ready(page: Page) -> str:
    page.wait_for_selector("body[data-ready]", timeout=30_000)
    state: str = page.get_attribute("body", "data-ready") or ""
    return state


@pytest.fixture
def dev_server(tmp_path: Path) -> Iterator[LiveServer]:
    """Dev mode (no login, loopback only) on SQLite with a small synthetic cohort, as the demo."""
    engine = make_engine(f"sqlite:///{tmp_path / 'app.db'}")
    migrate(engine)
    settings = Settings(database_url="sqlite://", auto_migrate=False, auth_mode="dev")
    live = LiveServer(create_app(settings, engine=engine), free_port())
    for p in generate_cohort(4, 1, days=7, base=settings.canonical_base):
        r = httpx.post(
            f"{live.base}/fhir", content=orjson.dumps(p.bundle), headers={"Content-Type": "application/fhir+json"}
        )
        r.raise_for_status()
    yield live
    live.stop()
    engine.dispose()


def test_worklist_then_patient_course(chromium: Browser, dev_server: LiveServer) -> None:
    page = chromium.new_page(viewport={"width": 1366, "height": 900})
    requests, errors = _watch(page, dev_server.base)
    page.goto(f"{dev_server.base}/app/")
    assert _ready(page) == "true"
    rows = page.locator("#worklist tbody tr")
    assert rows.count() == 4
    text = page.inner_text("#worklist")
    assert "CRS grade 3 (day" in text  # the crs-3 patient's maximum since day 0, written
    assert "grade 0" in text and "−05:00" in text  # grades in words; times with their offset
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / "worklist.png", full_page=True)

    # open the patient whose CRS reached grade 3
    row = rows.filter(has_text="CRS grade 3 (day")
    row.get_by_role("link").click()
    assert _ready(page) == "true"
    assert page.url.startswith(f"{dev_server.base}/app/Patient/")
    headline = page.inner_text("#headline")
    assert "CRS:" in headline and "ICANS:" in headline and "grade" in headline
    assert "ASTCT 2019 CRS consensus grading" in headline
    # the bands and the daily maximum: the day CRS reached 3 is written
    assert page.locator('[data-panel="grades"] canvas').count() >= 1
    daily = page.locator("#daily-table tbody tr").filter(has_text="astct-crs").inner_text()
    assert "3" in daily.split()
    # missing data are said, never shown as grade 0
    cres = page.locator('#others tr[data-method="cartox-cres"]').inner_text()
    assert "indeterminate" in cres and "cartox-10" in cres
    # hovering the temperature chart shows a value, its unit, the value as sent and its time
    over = page.locator('[data-panel="temperature"] .u-over')
    over.scroll_into_view_if_needed()
    box = over.bounding_box()
    assert box is not None
    over.hover(position={"x": box["width"] * 0.4, "y": box["height"] / 2})
    page.wait_for_selector("#tooltip:not([hidden])")
    tip = page.inner_text("#tooltip")
    assert "Temperature" in tip and "°C" in tip and "as sent" in tip and "Observation/" in tip
    # every value links back to its FHIR resource
    page.locator('[data-panel="temperature"] + details summary').click()
    page.locator('[data-panel="temperature"] + details a[data-ref]').first.click()
    page.wait_for_selector("#resource[open]")
    # (a locator wait: wait_for_function would evaluate a string, which the page's CSP forbids)
    page.locator("#resource-body", has_text='"resourceType"').wait_for()
    assert '"resourceType": "Observation"' in page.inner_text("#resource-body")
    page.keyboard.press("Escape")
    page.screenshot(path=ARTIFACTS / "patient.png", full_page=True)
    # the first screen and a half (docs/app-patient.png is one of these)
    page.screenshot(
        path=ARTIFACTS / "patient-glance.png", full_page=True, clip={"x": 0, "y": 0, "width": 1366, "height": 1500}
    )
    # nothing came from outside iectox (no CDN), and no script failed
    outside = [u for u in requests if not u.startswith(dev_server.base) and not u.startswith("data:")]
    assert outside == [] and errors == [], (outside, errors)
    page.close()


def test_keyboard_reaches_every_patient(chromium: Browser, dev_server: LiveServer) -> None:
    page = chromium.new_page()
    page.goto(f"{dev_server.base}/app/")
    _ready(page)
    reached = set()
    for _ in range(12):
        page.keyboard.press("Tab")
        href = page.evaluate("document.activeElement && document.activeElement.getAttribute('href')")
        if href and href.startswith("/app/Patient/"):
            reached.add(href)
    assert len(reached) == 4
    page.keyboard.press("Enter")  # the focused link opens its patient
    assert _ready(page) == "true"
    page.close()


# --- SMART App Launch, end to end -------------------------------------------------------------------


def _cds_jwt(aud: str) -> str:
    now = int(time.time())
    claims = {"iss": EHR_ISS, "sub": "ehr", "aud": aud, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4())}
    return sign(claims, EHR_KEY, "ES384", {"kid": "ehr"})


def _patient() -> tuple[str, list[dict[str, Any]]]:
    pid, resources, _ = f.synthetic_at_peak(index=3, seed=7)  # CRS grade 3 now: the card is not quiet
    return pid, resources


class SmartSetup:
    def __init__(self, live: LiveServer, ehr: FhirTestServer, patient_id: str) -> None:
        self.live, self.ehr, self.patient_id = live, ehr, patient_id


def _smart_server(tmp_path: Path, ehr: FhirTestServer, **overrides: Any) -> tuple[LiveServer, Any]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    settings = Settings(
        database_url="sqlite://",
        auto_migrate=False,
        **auth_settings(),
        auth_public_base_url=base,
        auth_cds_clients={EHR_ISS: {"jwks": jwks((EHR_KEY, "ehr"))}},
        app_client_id=APP_CLIENT,
        app_fhir_base=ehr.base_url,
        app_issuer=ehr.origin,
        app_jwks_url=ehr.jwks_url,
        max_body_bytes=20_000_000,
        **overrides,
    )
    engine = make_engine(f"sqlite:///{tmp_path / 'smart.db'}")
    migrate(engine)
    ehr.add_app_client(APP_CLIENT, [f"{base}/app/callback"])
    return LiveServer(create_app(settings, engine=engine), port), engine


@pytest.fixture
def smart(tmp_path: Path, fhir_server_clean: FhirTestServer) -> Iterator[SmartSetup]:
    """iectox in jwt mode with the clinician app configured against the test EHR; a CRS patient
    on both, iectox's copy stored by a patient-view hook (as an EHR would fire it)."""
    live, engine = _smart_server(tmp_path, fhir_server_clean)
    pid, resources = _patient()
    fhir_server_clean.seed([r for r in resources if r["resourceType"] == "Patient"])
    url = f"{live.base}/cds-services/iectox-patient-view"

    def searchset(rtype: str) -> dict[str, Any]:
        entries = [{"resource": r} for r in resources if r["resourceType"] == rtype]
        return {"resourceType": "Bundle", "type": "searchset", "entry": entries}

    hook = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/test-clinician", "patientId": pid},
        "prefetch": {
            "patient": next(r for r in resources if r["resourceType"] == "Patient"),
            "observations": searchset("Observation"),
            "medications": searchset("MedicationAdministration"),
            "conditions": searchset("Condition"),
            "procedures": searchset("Procedure"),
        },
    }
    r = httpx.post(url, json=hook, headers={"Authorization": f"Bearer {_cds_jwt(url)}"}, timeout=60)
    assert r.status_code == 200, r.text
    (card,) = r.json()["cards"]
    (link,) = [x for x in card["links"] if x["type"] == "smart"]
    assert link["url"] == f"{live.base}/app/launch"
    yield SmartSetup(live, fhir_server_clean, pid)
    live.stop()
    engine.dispose()


def _sign_in(page: Page, patient: str | None = None) -> None:
    page.wait_for_selector("#login")
    assert page.title() == "Test EHR sign-in"
    page.fill("#username", FhirTestServer.TEST_USER)
    page.fill("#password", FhirTestServer.TEST_PASSWORD)
    if patient is not None:
        page.fill("#patient", patient)
    page.click("#login")


def test_ehr_launch_from_the_card_link_opens_the_patient(chromium: Browser, smart: SmartSetup) -> None:
    page = chromium.new_page()
    requests, errors = _watch(page, smart.live.base)
    launch = smart.ehr.launch(smart.patient_id)
    # the EHR opens the card's SMART link with its iss and launch context
    page.goto(f"{smart.live.base}/app/launch?iss={smart.ehr.base_url}&launch={launch}")
    _sign_in(page)
    assert _ready(page) == "true"
    assert page.url == f"{smart.live.base}/app/Patient/{smart.patient_id}"
    assert "CRS:" in page.inner_text("#headline")
    # the pages' data came with the EHR's token; the code was exchanged with a PKCE verifier
    token_posts = [u for u in requests if u == smart.ehr.token_url]
    assert token_posts and any("/app/api/Patient/" in u for u in requests)
    authorize = next(u for u in requests if u.startswith(smart.ehr.authorize_url))
    assert "code_challenge_method=S256" in authorize and "code_challenge=" in authorize
    # the same session reaches the worklist
    page.goto(f"{smart.live.base}/app/")
    assert _ready(page) == "true"
    assert smart.patient_id in page.inner_text("#worklist")
    assert errors == [], errors
    page.close()


def test_standalone_launch_asks_for_the_patient(chromium: Browser, smart: SmartSetup) -> None:
    page = chromium.new_page()
    page.goto(f"{smart.live.base}/app/launch")
    _sign_in(page, patient=smart.patient_id)
    assert _ready(page) == "true"
    assert page.url == f"{smart.live.base}/app/Patient/{smart.patient_id}"
    page.close()


def test_without_a_launch_no_data_are_shown(chromium: Browser, smart: SmartSetup) -> None:
    page = chromium.new_page()
    page.goto(f"{smart.live.base}/app/Patient/{smart.patient_id}")
    assert _ready(page) == "error"
    assert "Sign-in needed" in page.inner_text("#status")
    assert page.locator("#headline article").count() == 0
    page.close()


def test_scopes_are_checked_before_any_data_is_shown(
    chromium: Browser, tmp_path: Path, fhir_server_clean: FhirTestServer
) -> None:
    # an app registration that asks for too little: the launch succeeds, the app shows nothing
    live, engine = _smart_server(tmp_path, fhir_server_clean, app_scope="openid fhirUser user/Patient.rs")
    try:
        pid, resources = _patient()
        fhir_server_clean.seed([r for r in resources if r["resourceType"] == "Patient"])
        page = chromium.new_page()
        requests, _ = _watch(page, live.base)
        page.goto(f"{live.base}/app/launch?iss={fhir_server_clean.base_url}&launch={fhir_server_clean.launch(pid)}")
        _sign_in(page)
        page.wait_for_selector("#status.error")
        assert "does not allow" in page.inner_text("#status") and "user/Observation.rs" in page.inner_text("#status")
        assert not [u for u in requests if "/app/api/" in u]
        assert page.evaluate("sessionStorage.getItem('iectox.token')") is None
        page.close()
    finally:
        live.stop()
        engine.dispose()


def test_readable_on_a_tablet(chromium: Browser, dev_server: LiveServer) -> None:
    """A tablet in portrait (820 x 1180): no sideways scrolling; the charts fit the width."""
    page = chromium.new_page(viewport={"width": 820, "height": 1180})
    page.goto(f"{dev_server.base}/app/")
    _ready(page)
    page.locator("#worklist tbody tr a").first.click()
    assert _ready(page) == "true"
    widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert widths[0] <= widths[1], widths
    canvas = page.locator('[data-panel="grades"] canvas').first.bounding_box()
    assert canvas is not None and canvas["width"] <= 820
    page.screenshot(path=ARTIFACTS / "patient-tablet.png", full_page=True)
    page.close()
