"""The concept registry (service/core/concepts.py) and the checks that hold the codebook and units to it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from service.codebook import DEFAULT_PATH, CodebookError, load_codebook
from service.codebook import loader as codebook_loader
from service.core import units
from service.core.concepts import CONCEPTS, C, ConceptName, Kind, spec

BASE = "https://iectox.org/fhir"
DEFAULT = json.loads(DEFAULT_PATH.read_text())


def test_every_codebook_concept_is_registered_with_its_kind() -> None:
    assert set(DEFAULT["concepts"]) == {c.value for c in ConceptName}
    for name, entry in DEFAULT["concepts"].items():
        assert entry["kind"] == CONCEPTS[ConceptName(name)].kind, name
    cb = load_codebook(BASE)
    assert set(cb.concepts) == set(ConceptName)
    assert all(c.kind == CONCEPTS[ConceptName(n)].kind for n, c in cb.concepts.items())


def test_members_are_their_names() -> None:
    assert C.CREATININE == "creatinine" and f"{C.CART_INFUSION}" == "cart-infusion" and str(C.ICE_SCORE) == "ice-score"
    by_member: dict[str, int] = {C.CRP: 1}
    assert {"crp": 1}[C.CRP] == 1 and by_member["crp"] == 1
    assert repr(C.BM_BLASTS) == "'bm-blasts'" and repr(Kind.SCORE) == "'score'"
    assert spec("crp") == CONCEPTS[C.CRP] and spec("creatinne") is None


def test_quantities_scores_and_pressors_have_canonical_units_and_conversions() -> None:
    for name, s in CONCEPTS.items():
        has_unit = s.kind in (Kind.QUANTITY, Kind.SCORE, Kind.VASOPRESSOR)
        assert (s.unit is not None) == has_unit, name
        if has_unit:
            assert units.canonical_unit(name) == s.unit
            assert s.unit in units.units_for(name)
            assert units.converter(name, s.unit)(7.0, None) == 7.0
        else:
            assert units.units_for(name) == []


def test_scores_have_their_published_ranges() -> None:
    ranges = {n: s.score_range for n, s in CONCEPTS.items() if s.kind == Kind.SCORE}
    assert ranges == {C.ICE_SCORE: (0, 10), C.CAPD_SCORE: (0, 32), C.CARTOX_10: (0, 10)}
    assert all(s.score_range is None for s in CONCEPTS.values() if s.kind != Kind.SCORE)


def test_a_misspelt_member_fails_at_once() -> None:
    with pytest.raises(AttributeError):
        _ = C.CREATINNE  # type: ignore[attr-defined]


def _overlay(tmp_path: Path, concepts: dict[str, Any]) -> Path:
    p = tmp_path / "site.json"
    p.write_text(json.dumps({"concepts": concepts}))
    return p


def test_overlay_with_an_unknown_concept_fails_with_its_path(tmp_path: Path) -> None:
    p = _overlay(tmp_path, {"creatinne": {"codings": [{"system": "urn:site", "code": "CREA"}]}})
    with pytest.raises(CodebookError) as err:
        load_codebook(BASE, p)
    assert err.value.path == f"{p}: concepts.creatinne"
    assert str(err.value).startswith(f"{p}: concepts.creatinne: unknown concept")


def test_overlay_with_a_kind_the_registry_disagrees_with_fails(tmp_path: Path) -> None:
    p = _overlay(tmp_path, {"crp": {"kind": "score", "codings": [{"system": "urn:site", "code": "CRP"}]}})
    with pytest.raises(CodebookError) as err:
        load_codebook(BASE, p)
    assert err.value.path == f"{p}: concepts.crp.kind"
    assert "disagrees with the registry's 'quantity'" in str(err.value)


def test_overlay_naming_the_right_kind_or_none_loads(tmp_path: Path) -> None:
    p = _overlay(
        tmp_path,
        {
            "crp": {"kind": "quantity", "codings": [{"system": "urn:site", "code": "CRP"}]},
            "ferritin": {"codings": [{"system": "urn:site", "code": "FERR"}]},
        },
    )
    cb = load_codebook(BASE, p)
    assert cb.concept_for([("urn:site", "CRP")], None) == C.CRP
    assert cb.concept_for([("urn:site", "FERR")], None) == C.FERRITIN


def _merge_default(doc: dict[str, Any]) -> None:
    codebook_loader._merge({}, doc, BASE, "default.json", overlay=False)


def test_default_with_a_misspelt_concept_fails_at_load() -> None:
    doc = {"concepts": {"creatinne": {"kind": "quantity", "codings": [{"system": "http://loinc.org", "code": "x"}]}}}
    with pytest.raises(CodebookError) as err:
        _merge_default(doc)
    assert err.value.path == "default.json: concepts.creatinne"
    assert "not in the registry" in str(err.value)


@pytest.mark.parametrize("kind", ["score", None])
def test_default_with_a_wrong_or_missing_kind_fails_at_load(kind: str | None) -> None:
    entry: dict[str, Any] = {"codings": [{"system": "http://loinc.org", "code": "1988-5"}]}
    if kind is not None:
        entry["kind"] = kind
    with pytest.raises(CodebookError) as err:
        _merge_default({"concepts": {"crp": entry}})
    assert err.value.path == "default.json: concepts.crp.kind"


def test_default_without_a_registered_concept_fails_at_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = json.loads(DEFAULT_PATH.read_text())
    del doc["concepts"]["mcp1"]
    path = tmp_path / "default.json"
    path.write_text(json.dumps(doc))
    monkeypatch.setattr(codebook_loader, "DEFAULT_PATH", path)
    with pytest.raises(CodebookError, match="registered concepts without an entry: mcp1"):
        load_codebook("https://concepts-test.example/fhir")
