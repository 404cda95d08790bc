"""`iectox demo`: the real server (uvicorn, embedded SQLite, dev mode on loopback), a synthetic
cohort posted over HTTP, and for each patient what the clinician app shows, read from the app's
JSON API: the daily maximum grade, when and why the peak was reached (the deciding inputs with
their values, one unit per concept, times with their offset) and the current grades. Then the
worklist URL: on a terminal the server keeps serving until Ctrl-C; otherwise it stops and the
exact command to serve the same database again is printed. The data stay in the database."""

from __future__ import annotations

import errno
import socket
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvicorn

from ..api.app import create_app
from ..config.settings import Settings
from .synth import generate_cohort

HEADLINE = (("astct-crs", "CRS"), ("astct-icans", "ICANS"))
MASKED = (
    "fever masked: a fever was treated (antipyretic or anti-cytokine drug), so fever is no longer required "
    "and the grade rests on hypotension and hypoxia (ASTCT 2019)"
)


def _port(preferred: int) -> int:
    """`preferred` when it is free on loopback, else any free port."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fmt_time(iso: str | None) -> str:
    """A time as recorded, with its offset: 2026-01-10 04:00 −05:00."""
    if not iso:
        return "-"
    t = datetime.fromisoformat(iso)
    offset = t.strftime("%z")
    shown = f"{offset[:3]}:{offset[3:]}".replace("-", "−") if offset else "+00:00"
    return f"{t.strftime('%Y-%m-%d %H:%M')} {shown}"


def _grade(result: dict[str, Any] | None) -> str:
    if result is None:
        return "not evaluated"
    if result["grade"] is not None:
        return f"grade {result['grade']}"
    return f"indeterminate (at least grade {result['floor']})" if result.get("floor") else "indeterminate"


def _values(view: dict[str, Any]) -> dict[str, str]:
    """What each input reference showed, in the concept's canonical unit, with its time."""
    out: dict[str, str] = {}
    for series in view["series"]:
        for p in series["points"]:
            value = f"{p['v']:.4g}"
            out.setdefault(p["ref"], f"{series['label']} {value} {series['unit']} at {fmt_time(p['t'])}")
    for e in view["events"]:
        out.setdefault(e["ref"], f"{e['label']} {e['shown']} at {fmt_time(e['t'])}")
    for d in view["drugs"]:
        dose = f" {d['rate']:.4g} {d['unit']}" if d["rate"] is not None else ""
        out.setdefault(d["ref"], f"{d['label']}{dose} from {fmt_time(d['start'])}")
    return out


def _deciding(view: dict[str, Any], result: dict[str, Any]) -> str:
    values = _values(view)
    shown = [values[ref] for ref in result["basis"] if ref in values]
    return "; ".join(shown) if shown else "no single input (the grade rests on what is absent)"


def _risk_line(view: dict[str, Any]) -> str:
    """Pre-infusion scores: EASIX-pre, the product's baseline rates, disease burden."""
    parts = []
    for s in view["scores"]:
        method, label, preds = s["method"], s["label"], s["predictions"]
        if method == "easix" and label == "pre-lymphodepletion":
            if s["indeterminate"]:
                parts.append(f"EASIX-pre not computable (missing {', '.join(s['missing'])})")
            else:
                parts.append(f"EASIX-pre {s['value']:.2f} ({preds[0]['qualitative'] or 'no cut-off'})")
        elif method == "product-baseline" and not s["indeterminate"]:
            crs, neuro = (p["probability"] for p in preds)
            parts.append(f"product baseline CRS {crs:.0%} / neurotoxicity {neuro:.0%}")
        elif method == "disease-burden" and not s["indeterminate"]:
            parts.append(f"disease burden RR {preds[0]['relative_risk']:g}")
    return " | ".join(parts) or "none computable"


def patient_block(view: dict[str, Any], scenario: str) -> list[str]:
    """The lines the demo prints for one patient, from the app's view of it."""
    who = view["patient"]
    head = f"{who['id']}  {who['name'] or ''} · scenario {scenario}"
    if view["day0"]:
        head += f" · {view['product'] or 'CAR T'} infused {fmt_time(view['day0'])}"
    lines = [head, f"  pre-infusion risk: {_risk_line(view)}"]
    scales = {s["method"]: s for s in view["scales"]}
    days = sorted({d["day"] for s in scales.values() for d in s["course"]["daily_max"]})
    lines.append(("  daily maximum      " + " ".join(f"d{d:<2}" for d in days)).rstrip())
    for method, name in HEADLINE:
        by_day = {d["day"]: d["grade"] for d in scales[method]["course"]["daily_max"]}
        cells = " ".join(f"{'?' if by_day.get(d) is None else by_day[d]:<3}" for d in days)
        lines.append(f"    ASTCT {name:<11}{cells}".rstrip())
    for method, name in HEADLINE:
        peak = scales[method]["peak"]
        if peak is None:
            continue
        day = (datetime.fromisoformat(peak["at"]) - datetime.fromisoformat(view["day0"])).days if view["day0"] else None
        when = fmt_time(peak["at"]) + (f" (day {day})" if day is not None else "")
        lines.append(f"  {name} peak {_grade(peak)}, first {when}: {_deciding(view, peak)}")
        if peak["fever_masked"]:
            lines.append(f"    ({MASKED})")
    now = [f"{name} {_grade(scales[m]['current'])}" for m, name in HEADLINE]
    lines.append(f"  now ({fmt_time(view['at'])}, the latest input): {', '.join(now)}")
    current_crs = scales["astct-crs"]["current"]
    if current_crs["fever_masked"]:
        lines.append(f"    ({MASKED})")
    for m, name in HEADLINE:
        missing = scales[m]["current"]["missing"]
        if missing:
            lines.append(f"    {name} cannot be graded without: {', '.join(missing)} (not grade 0)")
    return lines


def _iectox_command() -> str:
    """The iectox executable that runs this demo (the venv's, which may not be on the PATH)."""
    script = Path(sys.executable).with_name("iectox")
    return str(script) if script.exists() else "iectox"


def run_demo(
    settings: Settings, *, patients: int, seed: int, days: int, port: int = 8000, serve: bool | None = None
) -> int:
    # Dev mode (no tokens): the demo's server listens on loopback only.
    settings = settings.model_copy(update={"auth_mode": "dev", "host": "127.0.0.1"})
    port = _port(port)
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
    print(f"iectox server on {base} (dev mode, loopback only; database {settings.database_url})\n")
    cohort = generate_cohort(patients, seed, days=days, base=settings.canonical_base)
    serve = sys.stdout.isatty() if serve is None else serve
    try:
        with httpx.Client(base_url=base, timeout=120) as client:
            for p in cohort:
                r = client.post(
                    "/fhir", content=orjson.dumps(p.bundle), headers={"Content-Type": "application/fhir+json"}
                )
                r.raise_for_status()
            for p in cohort:
                r = client.get(f"/app/api/Patient/{p.patient_id}")
                r.raise_for_status()
                print("\n".join(patient_block(r.json(), p.scenario)) + "\n")
        print(f"Worklist: {base}/app/   (a patient: {base}/app/Patient/<id>)")
        if serve:
            print("Serving until Ctrl-C.")
            try:
                while thread.is_alive():
                    thread.join(timeout=0.5)
            except KeyboardInterrupt:
                print()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    if not serve:
        url = _absolute(settings.database_url)
        print(
            f"The server has stopped; the data stay in {url}. To open the worklist again, run\n"
            f"  IECTOX_AUTH_MODE=dev IECTOX_DATABASE_URL={url} {_iectox_command()} serve --port {port}\n"
            f"and open {base}/app/"
        )
    return 0


def _absolute(url: str) -> str:
    """A SQLite URL with an absolute path (the command printed works from any directory)."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix:
        return prefix + str((Path.cwd() / url[len(prefix) :]).resolve())
    return url
