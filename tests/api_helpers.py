"""Inputs for the HTTP API tests, shared by test_api, test_security and test_openapi_cli."""

from __future__ import annotations

from typing import Any

from tests import factories as f

T0 = "2026-01-06T10:00:00+00:00"
AT = "2026-01-06T12:00:00+00:00"


def crs3_resources() -> list[dict[str, Any]]:
    """Fever + one vasopressor + low-flow O2 (clinical-rules.md example: CRS grade 3) + ICE 8."""
    return [
        f.patient(),
        f.administration(f.local("cart-infusion"), at="2026-01-03T10:00:00+00:00", status="completed", id="cart"),
        f.temperature(38.6, T0, id="temp1"),
        f.bp_panel(85, 60, T0, id="bp1"),
        f.administration("norepinephrine", start="2026-01-06T09:00:00+00:00", rate=(5, "ug/min"), id="ne1"),
        f.oxygen_device("low-flow-nasal-cannula", T0, id="o2dev1"),
        f.ice_score(8, T0, id="ice1"),
    ]


def transaction(resources: list[dict[str, Any]]) -> dict[str, Any]:
    """A transaction Bundle that PUTs each resource at its id."""
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in resources
        ],
    }
