"""The course grades each hourly sample in brief (grade only, no rationale): the brief grade must
be the full grade, on every scale, at every sample (issue 12).

Inputs: every synthetic scenario as generated, with a random third of its entries dropped
(unknown domains, indeterminate grades) and with some values made unusable (left out, named):
the paths the brief mode shortens (combine, considered inputs, left-out handling) all run.
"""

from __future__ import annotations

import copy
import random
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.app.evaluate import SCALES, Grader, course_config, grading_config
from service.codebook import load_codebook
from service.config.settings import Settings
from service.core.course import grid
from service.devtools.synth import DEFAULT_BASE, DEFAULT_START, SCENARIOS, generate_patient
from service.fhir.ingest import parse_patient_entries, split_entries
from tests.test_ingest_quick import BUNDLE_TYPES, _corpus_bundles


def variants(bundle: dict[str, Any], rng: random.Random) -> list[dict[str, Any]]:
    entries = bundle["entry"]
    thinned = [e for e in entries if e["resource"]["resourceType"] == "Patient" or rng.random() > 0.33]
    spoiled = copy.deepcopy(entries)
    for e in spoiled:
        vq = e["resource"].get("valueQuantity")
        if vq is not None and rng.random() < 0.05:
            vq["code"] = vq["unit"] = "furlong"  # unknown unit: left out, named
    return [bundle, {**bundle, "entry": thinned}, {**bundle, "entry": spoiled}]


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("room_air", [False, True])
def test_brief_grade_is_the_full_grade(scenario: str, room_air: bool) -> None:
    settings = Settings(room_air_when_spo2_only=room_air)
    codebook = load_codebook(settings.canonical_base)
    rng = random.Random(SCENARIOS.index(scenario) * 2 + room_air)  # noqa: S311 - test data, fixed seed
    patient = generate_patient(rng, 3, scenario, days=8, base=DEFAULT_BASE, start=DEFAULT_START)
    checked = 0
    for bundle in variants(patient.bundle, rng):
        entries = split_entries(bundle, max_entries=100_000, bundle_types=frozenset({"transaction", "collection"}))
        data = parse_patient_entries(entries, codebook, strict=False).data
        at = data.latest_time()
        assert at is not None
        grader = Grader(data, grading_config(settings))
        start = (data.earliest_time() or at) - timedelta(hours=6)
        for t in grid(start, at, course_config(settings).step):
            for method, _ in SCALES:
                full = grader.grade(method, t)
                brief = grader.grade(method, t, brief=True)
                assert (brief.grade, brief.floor, brief.missing) == (full.grade, full.floor, full.missing), (
                    scenario,
                    method,
                    t,
                )
                # the CRS findings only where the left-out rules read them (Facts.crs_findings)
                assert brief.crs == (full.crs if data.left_out or data.assumed else None)
                checked += 1
    assert checked > 3 * 9 * 24 * 8


@pytest.mark.parametrize("path", _corpus_bundles(), ids=lambda p: p.name)
def test_brief_grade_is_the_full_grade_on_real_data(path: Path) -> None:
    """The same on the public FHIR data in tests/corpus (other writers' shapes), each with the
    site timezone set so that tz-less times are read, not left out."""
    settings = Settings(site_timezone="America/New_York")
    codebook = load_codebook(settings.canonical_base)
    entries = split_entries(orjson.loads(path.read_bytes()), max_entries=100_000, bundle_types=BUNDLE_TYPES)
    data = parse_patient_entries(entries, codebook, strict=False, site_tz=settings.site_tz()).data
    at = data.latest_time()
    if at is None:
        return  # no timed input: no course
    grader = Grader(data, grading_config(settings))
    start = (data.earliest_time() or at) - timedelta(hours=30)
    for t in grid(start, at, course_config(settings).step)[-2000:]:
        for method, _ in SCALES:
            full, brief = grader.grade(method, t), grader.grade(method, t, brief=True)
            assert (brief.grade, brief.floor, brief.missing) == (full.grade, full.floor, full.missing), (method, t)
