"""The parse's one-step path for common values (Normaliser._quick, _quick_value; issue 12) gives exactly
what the general path gives: the same samples, left-out inputs, ignored inputs and unmapped
counts in lenient handling, the same 422 issues in strict handling.

Inputs: every synthetic scenario, the real-data corpus (tests/corpus), and each with
Observations bent in the ways real feeds bend them (no timezone, date only, a year out of range,
an unknown or non-UCUM unit, a unit text only, an implausible value, a boolean or string value, a
huge integer, a reference range, an unused status, an unmapped value code, a component added).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.codebook import load_codebook
from service.config.settings import Settings
from service.devtools.synth import DEFAULT_BASE, DEFAULT_START, SCENARIOS, generate_patient
from service.fhir.errors import FhirError
from service.fhir.ingest import Normaliser, Parsed, parse_patient_entries, split_entries

CORPUS = Path(__file__).parent / "corpus"
BUNDLE_TYPES = frozenset({"transaction", "collection", "batch", "searchset"})

Bend = Callable[[dict[str, Any]], None]


def _set(key: str, value: Any) -> Bend:
    def bend(res: dict[str, Any]) -> None:
        res[key] = value

    return bend


def _quantity(**changes: Any) -> Bend:
    def bend(res: dict[str, Any]) -> None:
        q = res.get("valueQuantity")
        if isinstance(q, dict):
            q.update(changes)
            for k, v in changes.items():
                if v is None:
                    del q[k]

    return bend


def _retime(fn: Callable[[str], str]) -> Bend:
    def bend(res: dict[str, Any]) -> None:
        t = res.get("effectiveDateTime")
        if isinstance(t, str):
            res["effectiveDateTime"] = fn(t)

    return bend


BENDS: dict[str, Bend] = {
    "no timezone": _retime(lambda t: t[:19]),
    "date only": _retime(lambda t: t[:10]),
    "year 0001": _retime(lambda t: "0001" + t[4:]),
    "not a date": _set("effectiveDateTime", "yesterday"),
    "period instead": lambda res: res.update(effectivePeriod={"start": res.pop("effectiveDateTime", None)}),
    "unknown unit": _quantity(code="furlong", unit="furlong"),
    "other system": _quantity(system="http://unitsofmeasure.org/other"),
    "system null": _quantity(system=None),
    "unit text only": _quantity(code=None),
    "implausible": _quantity(value=1e9),
    "negative": _quantity(value=-5),
    "not a number": _quantity(value=float("nan")),  # stdlib json (an EHR's response) reads NaN
    "infinite": _quantity(value=float("inf")),
    "boolean value": _quantity(value=True),
    "string value": _quantity(value="38.5"),
    "huge integer": _quantity(value=10**400),
    "reference range": _set("referenceRange", [{"high": {"value": 40, "unit": "mg/dL", "code": "mg/dL"}}]),
    "preliminary": _set("status", "preliminary"),
    "no status": lambda res: res.pop("status", None),
    "unmapped value code": _set("valueCodeableConcept", {"coding": [{"system": "urn:x", "code": "y"}]}),
    "quantity null": _set("valueQuantity", None),  # beside a code: present, so not a coded value
    "code null": _set("valueCodeableConcept", None),
    "component": _set("component", [{"code": {"text": "x"}, "valueQuantity": {"value": 1}}]),
    "component unit": lambda res: [
        c["valueQuantity"].update(code="furlong") for c in res.get("component", [])[:1] if "valueQuantity" in c
    ],
    "component implausible": lambda res: [
        c["valueQuantity"].update(value=-1) for c in res.get("component", [])[-1:] if "valueQuantity" in c
    ],
    "component range": lambda res: [
        c.update(referenceRange=[{"high": {"value": 1}}]) for c in res.get("component", [])
    ],
    "quantity for a code": lambda res: res.update(valueQuantity={"value": 1, "code": "1"}),
}


def _bent(bundle: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    out = copy.deepcopy(bundle)
    names = list(BENDS)
    for e in out.get("entry", []):
        res = e.get("resource", {})
        if res.get("resourceType") == "Observation" and rng.random() < 0.3:
            BENDS[rng.choice(names)](res)
    return out


def _parse(bundle: dict[str, Any], strict: bool, settings: Settings) -> Parsed | FhirError:
    codebook = load_codebook(settings.canonical_base)
    entries = split_entries(copy.deepcopy(bundle), max_entries=100_000, bundle_types=BUNDLE_TYPES)
    try:
        return parse_patient_entries(entries, codebook, strict=strict, site_tz=settings.site_tz())
    except FhirError as exc:
        return exc


def _same(bundle: dict[str, Any], monkeypatch: pytest.MonkeyPatch, settings: Settings) -> int:
    """Parse both ways, in both handlings; the number of samples the lenient parse kept."""
    kept = 0
    for strict in (False, True):
        quick = _parse(bundle, strict, settings)
        with monkeypatch.context() as m:
            m.setattr(Normaliser, "_quick_value", lambda *args: False)
            general = _parse(bundle, strict, settings)
        if isinstance(quick, FhirError) or isinstance(general, FhirError):
            assert isinstance(quick, FhirError) and isinstance(general, FhirError)
            assert (quick.status, quick.issues) == (general.status, general.issues)
            continue
        assert quick.data == general.data
        assert quick.data.left_out == general.data.left_out
        assert quick.unmapped == general.unmapped
        if not strict:
            kept = sum(len(s) for s in quick.data.samples.values())
    return kept


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_quick_path_equals_general_path_on_synthetic_patients(scenario: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(SCENARIOS.index(scenario))  # noqa: S311 - test data, fixed seed
    bundle = generate_patient(rng, 1, scenario, days=7, base=DEFAULT_BASE, start=DEFAULT_START).bundle
    assert _same(bundle, monkeypatch, Settings()) > 100
    bent = _bent(bundle, rng)
    assert _same(bent, monkeypatch, Settings()) > 50
    assert _same(bent, monkeypatch, Settings(site_timezone="Europe/Berlin")) > 50


def _corpus_bundles() -> list[Path]:
    return sorted(p for p in CORPUS.rglob("*.json") if orjson.loads(p.read_bytes()).get("resourceType") == "Bundle")


@pytest.mark.parametrize("path", _corpus_bundles(), ids=lambda p: p.name)
def test_quick_path_equals_general_path_on_real_data(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = orjson.loads(path.read_bytes())
    _same(bundle, monkeypatch, Settings())
    for seed in range(5):
        _same(_bent(bundle, random.Random(seed)), monkeypatch, Settings())  # noqa: S311 - test data


def test_every_bend_reaches_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each bend alone, on every Observation of one patient: none slips through the quick path."""
    bundle = generate_patient(random.Random(7), 0, "crs-3", days=7, base=DEFAULT_BASE, start=DEFAULT_START).bundle  # noqa: S311
    for name, bend in BENDS.items():
        one = copy.deepcopy(bundle)
        for e in one["entry"]:
            if e["resource"]["resourceType"] == "Observation":
                bend(e["resource"])
        _same(one, monkeypatch, Settings())
        assert name


def test_a_null_quantity_beside_a_code_is_left_out_not_graded() -> None:
    """Found in review: `"valueQuantity": null` beside a mapped device code is not a coded
    value; the device is left out and named, and CRS is indeterminate, not grade 4."""
    from datetime import UTC, datetime

    from service.app.evaluate import evaluate_body
    from tests import factories as f

    t = "2026-01-06T10:00:00+00:00"
    device = {**f.oxygen_device("bipap", t, id="dev"), "valueQuantity": None}
    body = orjson.dumps(f.bundle(f.patient(), f.temperature(39.0, t, id="t"), device))
    settings = Settings()
    ev = evaluate_body(body, load_codebook(settings.canonical_base), settings, None, datetime(2026, 12, 1, tzinfo=UTC))
    crs = next(r for r in ev.results if r.method == "astct-crs")
    assert crs.grade is None and crs.floor == 1
    assert [r.ref for r in ev.left_out] == ["Observation/dev"]
