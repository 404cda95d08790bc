"""`iectox demo`: the real server (uvicorn, embedded SQLite), a synthetic cohort posted over
HTTP, every patient evaluated day by day, and a readable table of grades and reasons.
The data stay in the database afterwards."""

from __future__ import annotations

import socket
import threading
import time
from datetime import timedelta
from typing import Any

import httpx
import uvicorn

from ..api.app import create_app
from ..config.settings import Settings
from .synth import generate_cohort

WHY_WIDTH = 58


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _grade(ra: dict[str, Any]) -> str:
    code = ra["prediction"][0]["outcome"]["coding"][0]["code"]
    return "indet." if code == "indeterminate" else code.removeprefix("grade-")


def _why(ra: dict[str, Any]) -> str:
    """The rationale as emitted, cut to the table's width. It opens with the verdict (the grade
    and the finding that decided it); the text is shown, never parsed."""
    text = str(ra["prediction"][0]["rationale"])
    return text if len(text) <= WHY_WIDTH else text[: WHY_WIDTH - 1] + "…"


def _risk_line(resources: list[dict[str, Any]]) -> str:
    """Pre-infusion scores of one evaluation, in a line: EASIX-pre, product baseline, disease burden."""
    parts = []
    for ra in resources:
        if ra.get("resourceType") != "RiskAssessment" or ra["code"]["coding"][0]["code"] != "risk-score":
            continue
        method, label = ra["method"]["coding"][0]["code"], ra["code"].get("text", "")
        preds = ra["prediction"]
        indeterminate = preds[0]["outcome"]["coding"][0]["code"] == "indeterminate"
        if method == "easix" and label.endswith("pre-lymphodepletion"):
            if indeterminate:
                parts.append("EASIX-pre indeterminate")
            else:
                score = ra["extension"][0]["valueDecimal"]
                risk = preds[0]["qualitativeRisk"]["coding"][0]["code"]
                parts.append(f"EASIX-pre {score:.2f} ({risk})")
        elif method == "product-baseline":
            if indeterminate:
                parts.append("product baseline indeterminate")
            else:
                crs, neuro = (p["probabilityDecimal"] for p in preds)
                parts.append(f"product baseline CRS {crs:.0%} / neurotoxicity {neuro:.0%}")
        elif method == "disease-burden" and not indeterminate:
            parts.append(f"disease burden RR {preds[0]['relativeRisk']:g}")
    return " | ".join(parts)


def run_demo(settings: Settings, *, patients: int, seed: int, days: int) -> int:
    # Dev mode (no tokens): the demo's server listens on loopback only and is stopped at the end.
    settings = settings.model_copy(update={"auth_mode": "dev", "host": "127.0.0.1"})
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            print("server failed to start")
            return 1
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    print(f"iectox server on {base} (database {settings.database_url})\n")
    cohort = generate_cohort(patients, seed, days=days, base=settings.canonical_base)
    try:
        with httpx.Client(base_url=base, timeout=120) as client:
            for p in cohort:
                r = client.post("/fhir", content=_dumps(p.bundle), headers={"Content-Type": "application/fhir+json"})
                r.raise_for_status()
            header = f"{'patient':14} {'scenario':20} {'day':>3} {'CRS':>6} {'ICANS':>6}  why (CRS | ICANS)"
            print(header)
            print("-" * len(header))
            for p in cohort:
                for day in range(days + 1):
                    at = (p.day0 + timedelta(days=day, hours=12)).isoformat()
                    r = client.post(f"/fhir/Patient/{p.patient_id}/$evaluate", params={"at": at})
                    r.raise_for_status()
                    entries = [e["resource"] for e in r.json()["entry"]]
                    if day == 0:
                        print(f"{p.patient_id[:14]:14} pre-infusion risk: {_risk_line(entries)}")
                    crs, icans = entries[:2]
                    print(
                        f"{p.patient_id[:14]:14} {p.scenario[:20]:20} {day:>3} {_grade(crs):>6} {_grade(icans):>6}"
                        f"  {_why(crs)} | {_why(icans)}"
                    )
                print()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    print(
        f"Data stay in {settings.database_url}: run `IECTOX_AUTH_MODE=dev iectox serve` (dev mode: no tokens, "
        "loopback only), GET /fhir/RiskAssessment?subject=Patient/<id>"
    )
    return 0


def _dumps(doc: object) -> bytes:
    import orjson

    return orjson.dumps(doc)
