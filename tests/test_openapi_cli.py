"""The exported OpenAPI spec, the CLI, and real HTTP through uvicorn."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import uvicorn

from service.api.app import create_app
from service.config.settings import Settings
from tests import factories as f
from tests.api_helpers import AT, crs3_resources
from tests.auth import auth_settings, bearer

CLI = [sys.executable, "-m", "service.cli"]


def test_openapi_matches_committed_spec(repo_root: Path) -> None:
    committed = json.loads((repo_root / "openapi" / "openapi.json").read_text())
    # The spec does not depend on the auth mode: `iectox openapi` builds it in dev mode.
    for auth in ({"auth_mode": "dev", "host": "127.0.0.1"}, auth_settings()):
        app = create_app(Settings(database_url="sqlite://", **auth))
        assert app.openapi() == committed, "run: iectox openapi > openapi/openapi.json"


def test_openapi_declares_bearer_security(repo_root: Path) -> None:
    spec = json.loads((repo_root / "openapi" / "openapi.json").read_text())
    scheme = spec["components"]["securitySchemes"]["bearer"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer" and scheme["bearerFormat"] == "JWT"
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            secured = op.get("security") == [{"bearer": []}]
            # /cds-services/{id}[/feedback]: the CDS client JWT (discovery stays open); /app/api/*: the
            # app user's token (the pages and /app/config.json stay open)
            open_fhir = ("/fhir/metadata", "/fhir/CodeSystem/{cs_id}", "/fhir/OperationDefinition/{op_id}")
            expected = (
                (path.startswith("/fhir") and path not in open_fhir)
                or path.startswith("/cds-services/")
                or path.startswith("/app/api/")
            )
            assert secured == expected, (method, path)


def test_openapi_describes_fhir_endpoints(repo_root: Path) -> None:
    spec = json.loads((repo_root / "openapi" / "openapi.json").read_text())
    op = spec["paths"]["/fhir/$evaluate"]["post"]
    assert "application/fhir+json" in op["requestBody"]["content"]
    assert "422" in op["responses"] and "413" in op["responses"]
    assert "/fhir/Patient/{patient_id}/$evaluate" in spec["paths"]


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "IECTOX_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=120, check=False)


def _without_recorded(doc: dict) -> dict:  # type: ignore[type-arg]
    for e in doc["entry"]:
        e["resource"].pop("recorded", None)
    return doc


@pytest.mark.integration  # runs the CLI
@pytest.mark.asyncio
async def test_cli_evaluate_prints_what_the_api_returns(tmp_path: Path, client: httpx.AsyncClient) -> None:
    bundle = tmp_path / "b.json"
    bundle.write_bytes(f.body(*crs3_resources()))
    out = _run(["evaluate", str(bundle), "--at", AT], tmp_path)
    assert out.returncode == 0, out.stderr
    api = (await client.post("/fhir/$evaluate", content=bundle.read_bytes(), params={"at": AT})).json()
    assert _without_recorded(json.loads(out.stdout)) == _without_recorded(api)


@pytest.mark.integration  # runs the CLI
def test_cli_evaluate_bad_input_prints_operation_outcome(tmp_path: Path) -> None:
    bundle = tmp_path / "bad.json"
    bundle.write_bytes(f.body(f.patient(), f.temperature(38.5, "2026-01-06T10:00:00+00:00", unit="K")))
    out = _run(["evaluate", "--strict", str(bundle)], tmp_path)
    assert out.returncode == 2
    oo = json.loads(out.stdout)
    assert oo["resourceType"] == "OperationOutcome"
    assert oo["issue"][0]["expression"] == ["Bundle.entry[1].resource.valueQuantity.code"]


REQUIRED_CONCEPTS = """body-temperature systolic-bp mean-arterial-pressure spo2 fio2 oxygen-flow oxygen-device
ice-score capd-score consciousness seizure motor-weakness cerebral-edema crp ferritin ldh platelets creatinine anc
hemoglobin ast alt il6 mcp1 norepinephrine epinephrine phenylephrine dopamine vasopressin tocilizumab dexamethasone
methylprednisolone acetaminophen cart-infusion lymphodepletion""".split()
REQUIRED_VALUES = {
    "oxygen-device": "none low-flow-nasal-cannula blow-by high-flow-nasal-cannula face-mask non-rebreather venturi "
    "cpap bipap mechanical-ventilation",
    "consciousness": "awakens-spontaneously awakens-to-voice awakens-to-tactile unarousable",
    "seizure": "none rapidly-resolving prolonged",
    "motor-weakness": "none deep-focal",
    "cerebral-edema": "none focal diffuse",
}


@pytest.mark.integration  # runs the CLI
def test_cli_codebook_json(tmp_path: Path) -> None:
    out = _run(["codebook", "--json"], tmp_path)
    book = json.loads(out.stdout)["concepts"]
    assert set(REQUIRED_CONCEPTS) <= set(book)
    for name, values in REQUIRED_VALUES.items():
        assert set(values.split()) <= set(book[name]["values"])
    for c in book.values():
        assert {"codings", "units", "values"} <= set(c)
        assert all(set(x) == {"system", "code"} for x in c["codings"])
    assert {"system": "http://loinc.org", "code": "8310-5"} in book["body-temperature"]["codings"]
    assert "[degF]" in book["body-temperature"]["units"]


@pytest.mark.integration  # runs the CLI
def test_site_overlay_adds_codes_without_code_change(tmp_path: Path) -> None:
    overlay = tmp_path / "site.json"
    overlay.write_text(
        json.dumps(
            {
                "concepts": {
                    "ice-score": {"codings": [{"system": "urn:site:flowsheet", "code": "ICE-1"}]},
                    "oxygen-device": {"values": {"face-mask": {"system": "urn:site:o2", "code": "FM"}}},
                }
            }
        )
    )
    env = {**os.environ, "IECTOX_CODEBOOK_PATH": str(overlay)}
    out = subprocess.run([*CLI, "codebook", "--json"], capture_output=True, text=True, env=env, check=True)
    book = json.loads(out.stdout)["concepts"]
    assert {"system": "urn:site:flowsheet", "code": "ICE-1"} in book["ice-score"]["codings"]
    assert book["oxygen-device"]["values"]["face-mask"]["also"] == [{"system": "urn:site:o2", "code": "FM"}]
    overlay.write_text(json.dumps({"concepts": {"not-a-concept": {"codings": []}}}))
    bad = subprocess.run([*CLI, "codebook", "--json"], capture_output=True, text=True, env=env, check=False)
    assert bad.returncode == 2 and "not-a-concept" in bad.stderr


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[str]:
    """The real app under uvicorn on a free loopback port (transport matters for 413 and streaming)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'live.db'}", max_body_bytes=100_000, **auth_settings())
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.integration  # uvicorn on a real port
def test_real_http_round_trip(live_server: str) -> None:
    with httpx.Client(base_url=live_server, timeout=30) as anonymous:
        r = anonymous.post("/fhir/$evaluate", content=f.body(*crs3_resources()), params={"at": AT})
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["resourceType"] == "OperationOutcome"
    with httpx.Client(base_url=live_server, timeout=30, headers=bearer()) as c:
        r = c.post(
            "/fhir/$evaluate",
            content=f.body(*crs3_resources()),
            params={"at": AT},
            headers={"Content-Type": "application/fhir+json"},
        )
        assert r.status_code == 200 and r.headers["content-type"] == "application/fhir+json"
        big = orjson.dumps({"resourceType": "Bundle", "pad": "x" * 200_000})
        r = c.post("/fhir/$evaluate", content=big)
        assert r.status_code == 413 and r.json()["issue"][0]["code"] == "too-long"

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted as it streams
            for _ in range(30):
                yield b" " * 10_000

        r = c.post("/fhir/$evaluate", content=chunks())
        assert r.status_code == 413
        r = c.post("/fhir/$evaluate", content=b"{not json")
        assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
