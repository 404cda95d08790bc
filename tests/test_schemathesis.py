"""Property-based API test (issue 11): schemathesis generates requests from the exported OpenAPI
document, bounded in examples, and no response is a 5xx.

The app runs in process on its own SQLite file in dev mode (no token; loopback), so the fuzzer
reaches every route's validation; CDS routes answer 401 without a client JWT, also never a 5xx.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings

from service.api.app import create_app
from service.config.settings import Settings

_DB = Path(tempfile.mkdtemp(prefix="iectox-fuzz-")) / "fuzz.db"
APP = create_app(Settings(database_url=f"sqlite:///{_DB}", auth_mode="dev", host="127.0.0.1"))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_request_gets_a_5xx(case: schemathesis.Case) -> None:
    response = case.call()
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text[:500]}"
