"""A hook or poll checks each resource before storing it and grades right after (issue 12): an
Observation the storage check normalised with no issue and nothing ignored (codes not mapped and
times placed by the site timezone included) is not normalised again, and a
row this transaction just stored is not read or parsed again (StoreResult.checked, by type, id
and the version written). The
evaluation is exactly the one without that shortcut, on every synthetic scenario and the
real-data corpus, each also bent the ways real feeds bend them (tests/test_ingest_quick.py),
with and without a site timezone. Against SQLite and PostgreSQL."""

from __future__ import annotations

import copy
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine
from sqlmodel import SQLModel

from service.app import store as store_module
from service.codebook import load_codebook
from service.config.settings import Settings
from service.devtools.synth import DEFAULT_BASE, DEFAULT_START, SCENARIOS, generate_patient
from service.ehr import sync
from tests.conftest import FIXED_NOW
from tests.test_ingest_quick import _bent

pytestmark = pytest.mark.integration
CORPUS = Path(__file__).parent / "corpus"
CODEBOOK = load_codebook(Settings().canonical_base)


def _hook(engine: Engine, bundle: dict[str, Any], settings: Settings) -> bytes:
    """Store and evaluate a patient's resources as a hook does, on an empty database; the
    evaluation's Bundle and what was left out, as JSON."""
    with engine.begin() as conn:
        for table in reversed(SQLModel.metadata.sorted_tables):
            conn.execute(table.delete())
    resources = [copy.deepcopy(e["resource"]) for e in bundle.get("entry", []) if isinstance(e.get("resource"), dict)]
    pid = next(r["id"] for r in resources if r.get("resourceType") == "Patient")
    evaluation, _ = sync.store_and_evaluate(
        engine, pid, resources, CODEBOOK, settings, FIXED_NOW, target=None, server=""
    )
    assert evaluation is not None
    return orjson.dumps([evaluation.bundle(), [repr(x) for x in evaluation.left_out]])


def _same_either_way(engine: Engine, bundle: dict[str, Any], settings: Settings, mp: pytest.MonkeyPatch) -> int:
    """The hook's evaluation with and without the shortcut; returns how many entries took it."""
    real_store, real_entries = sync.store_resources, store_module.stored_entries
    taken: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        entries, strict = real_entries(*args, **kwargs)
        taken.append(sum(1 for e in entries if e.checked is not None))
        return entries, strict

    with mp.context() as m:
        m.setattr(sync, "store_resources", lambda *a, **k: replace(real_store(*a, **k), checked={}))
        without = _hook(engine, bundle, settings)
    with mp.context() as m:
        m.setattr(store_module, "stored_entries", counted)
        with_it = _hook(engine, bundle, settings)
    assert with_it == without
    return sum(taken)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_checked_once_on_synthetic_patients(
    scenario: str, clean_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(SCENARIOS.index(scenario))  # noqa: S311 - test data, fixed seed
    bundle = generate_patient(rng, 1, scenario, days=7, base=DEFAULT_BASE, start=DEFAULT_START).bundle
    assert _same_either_way(clean_engine, bundle, Settings(), monkeypatch) > 100
    bent = _bent(bundle, rng)
    assert _same_either_way(clean_engine, bent, Settings(), monkeypatch) > 50
    assert _same_either_way(clean_engine, bent, Settings(site_timezone="Europe/Berlin"), monkeypatch) > 50


def _corpus_bundles() -> list[Path]:
    return sorted(p for p in CORPUS.rglob("*.json") if orjson.loads(p.read_bytes()).get("resourceType") == "Bundle")


@pytest.mark.parametrize("path", _corpus_bundles(), ids=lambda p: p.name)
def test_checked_once_on_real_data(path: Path, clean_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = orjson.loads(path.read_bytes())
    if not any(e.get("resource", {}).get("resourceType") == "Patient" for e in bundle.get("entry", [])):
        pytest.skip("no Patient in this Bundle")
    _same_either_way(clean_engine, bundle, Settings(), monkeypatch)
    for seed in range(3):
        _same_either_way(clean_engine, _bent(bundle, random.Random(seed)), Settings(), monkeypatch)  # noqa: S311
