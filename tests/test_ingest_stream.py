"""A large `$evaluate` body is split unparsed and parsed one entry at a time
(ingest.stream_entries, issue 12): the evaluation, or the error, is exactly the one of the whole
parse, for well-formed Bundles, bent ones and broken ones."""

from __future__ import annotations

import copy
import json
import math
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.app.evaluate import evaluate_body
from service.codebook import load_codebook
from service.config.settings import Settings
from service.devtools.synth import DEFAULT_BASE, DEFAULT_START, SCENARIOS, generate_patient
from service.fhir.errors import FhirError
from service.fhir.ingest import load_json, split_entries, stream_entries
from tests import factories as f
from tests.test_ingest_quick import _bent, _corpus_bundles

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def _evaluate(body: bytes, stream: bool) -> bytes | tuple[int, Any]:
    settings = Settings(stream_parse_above_bytes=0 if stream else 2**40, max_bundle_entries=3000)
    try:
        return orjson.dumps(evaluate_body(body, load_codebook(settings.canonical_base), settings, None, NOW).bundle())
    except FhirError as exc:
        return exc.status, exc.issues


def _same(body: bytes) -> bytes | tuple[int, Any]:
    whole, streamed = _evaluate(body, stream=False), _evaluate(body, stream=True)
    assert streamed == whole
    return whole


@pytest.mark.parametrize("scenario", SCENARIOS[::2])
def test_streamed_equals_whole_on_synthetic_patients(scenario: str) -> None:
    rng = random.Random(SCENARIOS.index(scenario))  # noqa: S311 - test data, fixed seed
    bundle = generate_patient(rng, 2, scenario, days=7, base=DEFAULT_BASE, start=DEFAULT_START).bundle
    assert isinstance(_same(orjson.dumps(bundle)), bytes)
    # the standard library writes what orjson cannot (an integer of 400 digits; NaN, refused by both)
    _same(json.dumps(_bent(bundle, rng)).encode())
    tame = _bent(bundle, rng)
    for e in tame["entry"]:
        q = e["resource"].get("valueQuantity")
        if isinstance(q, dict) and isinstance(q.get("value"), float) and not math.isfinite(q["value"]):
            q["value"] = 0.5  # NaN and infinity out: this one must evaluate
        if isinstance(q, dict) and isinstance(q.get("value"), int) and abs(q["value"]) > 2**63:
            q["value"] = 5
    assert isinstance(_same(orjson.dumps(tame)), bytes)


@pytest.mark.parametrize("path", _corpus_bundles(), ids=lambda p: p.name)
def test_streamed_equals_whole_on_real_data(path: Path) -> None:
    _same(path.read_bytes())


def _patient_bundle() -> dict[str, Any]:
    rng = random.Random(3)  # noqa: S311 - test data, fixed seed
    bundle = generate_patient(rng, 0, "crs-2", days=7, base=DEFAULT_BASE, start=DEFAULT_START).bundle
    return {**bundle, "entry": bundle["entry"][:60]}


def _with(change: Any) -> bytes:
    bundle = copy.deepcopy(_patient_bundle())
    change(bundle)
    return orjson.dumps(bundle)


def _obs(bundle: dict[str, Any]) -> dict[str, Any]:
    return next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation")


def _nested(depth: int) -> bytes:
    """An extra element of the Patient nested `depth` arrays deep (orjson reads 1,024 levels)."""
    deep = b'"x":' + b"[" * depth + b"]" * depth + b',"resourceType":"Patient"'
    return orjson.dumps(_patient_bundle()).replace(b'"resourceType":"Patient"', deep, 1)


def _duplicate(newer_first: bool) -> Any:
    def change(bundle: dict[str, Any]) -> None:
        first = _obs(bundle)
        other = copy.deepcopy(first)
        other["resource"]["meta"] = {"versionId": "7"}
        other["resource"]["valueQuantity"]["value"] = 39.9
        bundle["entry"].insert(0 if newer_first else len(bundle["entry"]), other)

    return change


BROKEN: dict[str, bytes] = {
    "not JSON": b'{"resourceType": "Bundle", "entry": [',
    "an array": b"[1, 2]",
    "a lone Patient": orjson.dumps({"resourceType": "Patient", "id": "p1"}),
    "NaN": orjson.dumps(_patient_bundle())[:-1] + b', "x": NaN}',
    "number out of range": orjson.dumps(_patient_bundle())[:-1] + b', "entry2": [{"x": 1e999}]}',
    "number out of range in an entry": _with(lambda b: None).replace(b'"status":"final"', b'"status":1e999', 1),
    "type missing": _with(lambda b: b.pop("type")),
    "type an array": _with(lambda b: b.update(type=["collection"])),
    "type not accepted": _with(lambda b: b.update(type="history")),
    "entry null": _with(lambda b: b.update(entry=None)),
    "entry an object": _with(lambda b: b.update(entry={"resource": {}})),
    "entry item a number": _with(lambda b: b["entry"].insert(3, 5)),
    "entry without resource": _with(lambda b: b["entry"].insert(3, {"fullUrl": "urn:x"})),
    "fullUrl a number": _with(lambda b: b["entry"][4].update(fullUrl=5)),
    "resourceType missing": _with(lambda b: _obs(b)["resource"].pop("resourceType")),
    "resourceType unknown": _with(lambda b: _obs(b)["resource"].update(resourceType="Observatio")),
    "id too long": _with(lambda b: _obs(b)["resource"].update(id="x" * 65)),
    "duplicate, newer first": _with(_duplicate(newer_first=True)),
    "duplicate, newer last": _with(_duplicate(newer_first=False)),
    "over the entry limit": _with(lambda b: b.update(entry=b["entry"] * 60)),
    "unknown top-level element": _with(lambda b: b.update(text={"div": "<div>x</div>"}, signature=[1, 2])),
    "entry twice": orjson.dumps(_patient_bundle())[:-1] + b', "entry": []}',
    # found in review: what one parser passes and the other refuses, read the same way now
    "an earlier key repeated, unreadable": orjson.dumps(_patient_bundle())[:-1] + b',"meta":{"x":1e999},"meta":{}}',
    "an earlier key repeated, not UTF-8": orjson.dumps(_patient_bundle())[:-1] + b',"text":"\xff","text":"ok"}',
    "an earlier entry array, unreadable": b'{"entry":[{"x":1e999}],' + orjson.dumps(_patient_bundle())[1:],
    # found in review: the entry array's bytes also found earlier, across string boundaries
    "entry bytes met earlier": b'{"resourceType":"Bundle","type":"collection","A[":0,",":1e999,"]B":0,"entry":[":0,",'
    b'":1e999,"]}',
    "nested 1000 deep": _nested(1000),
    "nested 1022 deep": _nested(1022),
    "nested 1100 deep": _nested(1100),
    "over the entry limit and unreadable": _with(lambda b: b.update(entry=b["entry"] * 60)).replace(
        b'"status":"final"', b'"status":1e999', 1
    ),
    "resourceType twice": orjson.dumps(_patient_bundle())[:-1] + b', "resourceType": "Patient"}',
    "byte order mark": b"\xef\xbb\xbf" + orjson.dumps(_patient_bundle()),
    "trailing garbage": orjson.dumps(_patient_bundle()) + b" x",
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_streamed_equals_whole_on_broken_bodies(name: str) -> None:
    _same(BROKEN[name])


def _split(body: bytes, stream: bool) -> list[tuple[Any, ...]] | tuple[int, Any]:
    limits: dict[str, Any] = {"max_entries": 3000, "bundle_types": frozenset({"transaction", "collection"})}
    try:
        entries = stream_entries(body, **limits) if stream else split_entries(load_json(body), **limits)
    except FhirError as exc:
        return exc.status, exc.issues
    return [(en.loaded().resource, en.path, en.full_url, en.type, en.ref) for en in entries]


@pytest.mark.parametrize("name", [n for n in BROKEN if not n.startswith("nested")])  # == recurses too deep
def test_streamed_entries_are_the_whole_parse_entries(name: str) -> None:
    """The same resources (whole, once loaded), paths and versions kept, entry by entry."""
    assert _split(BROKEN[name], stream=True) == _split(BROKEN[name], stream=False)


def test_an_administration_and_an_observation_sharing_a_full_url_keep_their_own_times() -> None:
    """Found in review (both parses): an unresolved Medication's administration at 09:00 shared
    its fullUrl with a 15:00 Observation, and was named with the Observation's time, after `at`:
    the unknown drug (a vasopressor?) could not count, and CRS stood at grade 1."""
    t = "2026-01-06T10:00:00+00:00"
    drip = f.administration("norepinephrine", at="2026-01-06T09:00:00+00:00", status="completed")
    del drip["id"], drip["medicationCodeableConcept"]
    drip["medicationReference"] = {"reference": "Medication/missing"}
    later = f.temperature(38.0, "2026-01-06T15:00:00+00:00")
    del later["id"]
    bundle = f.bundle(
        f.patient(), f.temperature(39.0, t, id="t"), f.systolic(120, t), f.oxygen_device("none", t), drip, later
    )
    bundle["entry"][4]["fullUrl"] = bundle["entry"][5]["fullUrl"] = "urn:uuid:11111111-1111-1111-1111-111111111111"
    for stream in (False, True):
        settings = Settings(stream_parse_above_bytes=0 if stream else 2**40)
        at = datetime(2026, 1, 6, 10, tzinfo=UTC)
        ev = evaluate_body(
            orjson.dumps(bundle), load_codebook(settings.canonical_base), settings, at, NOW, strict=False
        )
        crs = next(r for r in ev.results if r.method == "astct-crs")
        assert (crs.grade, crs.floor) == (None, 1)
        assert [(r.path, r.t) for r in ev.left_out if r.t is not None and r.t.hour == 9]
