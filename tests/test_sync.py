"""The EHR sync path: typed store results, one evaluation without timed input, one query for the
stored RiskAssessments, and how often a synced resource is normalised."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import Engine, event
from sqlmodel import Session, select

import service.app.evaluate as evaluate_module
import service.app.store as store_module
import service.ehr.sync as sync_module
from service.app.store import store_resources
from service.codebook import Codebook, load_codebook
from service.config.settings import Settings
from service.ehr.sync import store_and_evaluate
from service.storage import repository
from tests import factories as f
from tests.conftest import FIXED_NOW

T0 = "2026-11-21T08:00:00+00:00"


@pytest.fixture(scope="module")
def codebook() -> Codebook:
    return load_codebook(Settings().canonical_base)


def test_store_resources_gives_a_typed_outcome_per_resource(clean_engine: Engine, codebook: Codebook) -> None:
    fever = f.temperature(39.0, T0, id="t1")
    orphan = f.temperature(38.0, T0, id="t2", subject="Group/g1")
    with Session(clean_engine) as session:
        first = store_resources(session, [f.patient(), fever, orphan], codebook, server="")
        session.commit()
    assert [(r.resource_type, r.id, r.outcome) for r in first.results] == [
        ("Patient", "p1", "stored"),
        ("Observation", "t1", "stored"),
        ("Observation", "t2", "rejected"),
    ]
    assert (first.count("stored"), first.rejected) == (2, 1)
    rejected = first.results[2]
    assert rejected.write is None
    assert [i.expression for i in rejected.issues] == ["Observation.subject.reference"]
    assert first.results[1].write is not None and first.results[1].write.version_id == 1

    newer = {**fever, "meta": {"versionId": "2"}, "valueQuantity": f.quantity(39.5, "Cel")}
    with Session(clean_engine) as session:
        again = store_resources(session, [f.patient(), newer, orphan], codebook, server="")
        session.commit()
    assert [r.outcome for r in again.results] == ["unchanged", "stored", "rejected"]
    assert again.results[1].write is not None and again.results[1].write.version_id == 2
    with Session(clean_engine) as session:
        stale = store_resources(session, [{**fever, "meta": {"versionId": "1"}}], codebook, server="")
    assert [r.outcome for r in stale.results] == ["unchanged"]


@contextmanager
def counted(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> Iterator[list[Any]]:
    calls: list[Any] = []
    real = getattr(module, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0])
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(module, name, spy)
        yield calls


def test_a_patient_without_timed_input_is_evaluated_once_and_not_stored(
    clean_engine: Engine, codebook: Codebook, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    with counted(monkeypatch, evaluate_module, "parse_patient_entries") as parses:
        evaluation, changed = sync_p1(clean_engine, [f.patient()], codebook, settings)
    assert evaluation is not None and evaluation.untimed and evaluation.at == FIXED_NOW
    assert not changed
    assert len(parses) == 1
    with Session(clean_engine) as session:
        assert repository.search_assessments(session, "p1", None, True, 10, 0, server="")[0] == 0


def test_a_synced_resource_is_checked_once_and_normalised_once_for_grading(
    clean_engine: Engine, codebook: Codebook, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    resources = [f.patient(), f.temperature(39.0, T0, id="t1"), f.systolic(85, T0, id="s1")]
    with (
        counted(monkeypatch, store_module, "check_for_storage") as checks,
        counted(monkeypatch, evaluate_module, "parse_patient_entries") as parses,
    ):
        evaluation, changed = sync_p1(clean_engine, resources, codebook, settings)
    assert evaluation is not None and not evaluation.untimed and changed
    assert sorted(e.ref for e in checks) == ["Observation/s1", "Observation/t1", "Patient/p1"]
    assert len(parses) == 1 and sorted(e.ref for e in parses[0]) == sorted(refs(resources))


def sync_p1(
    engine: Engine, resources: list[dict[str, Any]], codebook: Codebook, settings: Settings
) -> tuple[Any, bool]:
    """Patient/p1's resources stored and evaluated as a hook without an evaluation cache reads them."""
    return store_and_evaluate(engine, "p1", resources, codebook, settings, FIXED_NOW, target=None, server="")


def refs(resources: list[dict[str, Any]]) -> list[str]:
    return [f"{r['resourceType']}/{r['id']}" for r in resources]


def test_unchanged_evaluation_reads_its_risk_assessments_in_one_query(
    clean_engine: Engine, codebook: Codebook, settings: Settings
) -> None:
    resources = [f.patient(), f.temperature(39.0, T0, id="t1")]
    _, changed = sync_p1(clean_engine, resources, codebook, settings)
    assert changed
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "emitted_resource" in statement.lower() and statement.lstrip().upper().startswith("SELECT"):
            statements.append(statement)

    event.listen(clean_engine, "before_cursor_execute", record)
    try:
        evaluation, changed = sync_p1(clean_engine, resources, codebook, settings)
    finally:
        event.remove(clean_engine, "before_cursor_execute", record)
    assert evaluation is not None and len(evaluation.assessments) > 1
    assert not changed
    assert len(statements) == 1


def test_emitted_by_id(clean_engine: Engine, codebook: Codebook, settings: Settings) -> None:
    resources = [f.patient(), f.temperature(39.0, T0, id="t1")]
    evaluation, _ = sync_p1(clean_engine, resources, codebook, settings)
    assert evaluation is not None
    ids = [ra["id"] for ra in evaluation.assessments]
    with Session(clean_engine) as session:
        found = repository.emitted_by_id(session, "RiskAssessment", [*ids, "absent"])
        assert repository.emitted_by_id(session, "RiskAssessment", []) == {}
        assert repository.emitted_by_id(session, "Provenance", ids) == {}
    assert sorted(found) == sorted(ids)
    assert all(found[i]["meta"]["versionId"] == "1" for i in ids)


# --- what storage rejects stays named; EHR-relative references; the site timezone (issue 10) ---

T1 = "2026-11-21T09:00:00+00:00"


def crs_of(evaluation: Any) -> Any:
    return next(r for r in evaluation.results if r.method == "astct-crs")


def stored_evaluation(engine: Engine, codebook: Codebook, settings: Settings) -> Any:
    with Session(engine) as session:
        return store_module.evaluate_stored(session, "p1", codebook, settings, None, FIXED_NOW, store=False, server="")


def test_a_rejected_resource_is_named_by_every_later_evaluation_until_replaced(
    clean_engine: Engine, codebook: Codebook, settings: Settings
) -> None:
    normal = (f.systolic(120, T0, id="bp"), f.oxygen_device("none", T0, id="o2"))
    bad = f.temperature(1000.0, T0, id="t1", meta={"versionId": "1"})  # impossible: left out
    first, _ = sync_p1(clean_engine, [f.patient(), *normal, bad], codebook, settings)
    assert first is not None and [r.ref for r in first.left_out] == ["Observation/t1"]
    # A later read without that resource (a poll delta, a CDS prefetch) still names it.
    later, _ = sync_p1(clean_engine, [f.patient()], codebook, settings)
    assert later is not None and [r.ref for r in later.left_out] == ["Observation/t1"]
    assert crs_of(later).grade is None
    assert [r.ref for r in stored_evaluation(clean_engine, codebook, settings).left_out] == ["Observation/t1"]
    # An older rejected version does not replace a newer usable one; a newer usable one clears it.
    fixed = {**bad, "meta": {"versionId": "2"}, "valueQuantity": f.quantity(39.0, "Cel")}
    again, _ = sync_p1(clean_engine, [f.patient(), fixed, bad], codebook, settings)
    assert again is not None and not again.left_out and crs_of(again).grade == 1
    with Session(clean_engine) as session:
        assert repository.rejected_inputs(session, "p1", server="") == []


def test_a_usable_version_posted_to_the_api_clears_a_kept_rejection(
    clean_engine: Engine, codebook: Codebook, settings: Settings
) -> None:
    bad = f.temperature(1000.0, T0, id="t1")
    sync_p1(clean_engine, [f.patient(), bad], codebook, settings)
    with Session(clean_engine) as session:
        store_module.store_one(
            session, f.temperature(39.0, T1, id="t1"), "Observation", "t1", codebook, None, server=""
        )
        session.commit()
    assert not stored_evaluation(clean_engine, codebook, settings).left_out


def test_references_on_the_ehr_base_are_stored_relative(
    clean_engine: Engine, codebook: Codebook, settings: Settings
) -> None:
    base = "https://ehr.example.org/fhir"
    med = {"resourceType": "Medication", "id": "m1", "code": f.cc(f.RXNORM, "242969")}  # norepinephrine product
    drip = f.administration("norepinephrine", start=T0, id="ne", subject=f"{base}/Patient/p1")
    del drip["medicationCodeableConcept"]
    drip["medicationReference"] = {"reference": f"{base}/Medication/m1"}
    resources = [f.patient(), med, drip, f.temperature(39.0, T0), f.systolic(80, T0), f.oxygen_device("none", T0)]
    ev, _ = store_and_evaluate(
        clean_engine, "p1", resources, codebook, settings, FIXED_NOW, target=None, base=base, server=""
    )
    assert ev is not None and not ev.left_out
    assert crs_of(ev).crs.vasopressor_agents == ("norepinephrine",) and crs_of(ev).grade == 3
    with Session(clean_engine) as session:
        stored = repository.read_resource(session, "MedicationAdministration", "ne", server="") or {}
    assert stored["medicationReference"] == {"reference": "Medication/m1"}
    assert stored["subject"] == {"reference": "Patient/p1"}


def test_storage_places_a_datetime_without_timezone_by_the_site_timezone(
    clean_engine: Engine, codebook: Codebook
) -> None:
    local = f.temperature(39.0, "2026-11-21T08:00:00", id="t-local")
    with Session(clean_engine) as session:
        without = store_resources(session, [f.patient(), local], codebook, server="")
        with_tz = store_resources(
            session, [local], codebook, site_tz=Settings(site_timezone="Europe/Berlin").site_tz(), server=""
        )
    assert without.results[1].outcome == "rejected"
    assert "no timezone" in without.results[1].issues[0].diagnostics
    assert with_tz.results[0].outcome == "stored"


def test_a_resource_read_without_an_id_is_named_in_the_evaluation(
    clean_engine: Engine, codebook: Codebook, settings: Settings
) -> None:
    anonymous = f.temperature(39.0, T0)
    del anonymous["id"]
    ev, _ = sync_p1(clean_engine, [f.patient(), anonymous, f.systolic(120, T0)], codebook, settings)
    assert ev is not None and [r.path for r in ev.left_out] == ["Observation/(read without an id).id"]


# --- a known patient whose inputs did not change is not graded again (issue 12) ----------------


def test_unchanged_inputs_are_not_graded_again_and_any_change_is(
    clean_engine: Engine, codebook: Codebook, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.app.cache import EvaluationCache

    cache = EvaluationCache()
    med = {"resourceType": "Medication", "id": "m1", "code": f.cc(f.RXNORM, "7512")}
    drip = f.administration("norepinephrine", start=T0, id="ne")
    del drip["medicationCodeableConcept"]
    drip["medicationReference"] = {"reference": "Medication/m1"}
    vitals = [f.temperature(39.0, T0, id="t"), f.systolic(80, T0), f.oxygen_device("none", T0)]
    resources = [f.patient(), med, drip, *vitals]

    def sync(rs: list[dict[str, Any]]) -> Any:
        ev, _ = store_and_evaluate(
            clean_engine, "p1", rs, codebook, settings, FIXED_NOW, target=None, cache=cache, server=""
        )
        return ev

    with counted(monkeypatch, evaluate_module, "parse_patient_entries") as parses:
        first = sync(resources)
        again, changed = store_and_evaluate(
            clean_engine, "p1", resources, codebook, settings, FIXED_NOW, target=None, cache=cache, server=""
        )
        assert len(parses) == 1 and again is first  # the same stored inputs: served, not graded
        assert not changed  # nor stored or written back again
        assert crs_of(first).grade == 3
        # a new version of an input, a changed Medication, a kept rejected input: graded again
        sync([f.patient(), {**f.temperature(39.5, T0, id="t"), "meta": {"versionId": "2"}}])
        assert len(parses) == 2
        changed_med = {**med, "code": f.cc(f.RXNORM, "3992")}  # now epinephrine
        assert crs_of(sync([f.patient(), changed_med])).crs.vasopressor_agents == ("epinephrine",)
        assert len(parses) == 3
        sync([f.patient(), f.temperature(1000.0, T1, id="bad")])
        assert len(parses) == 4
        sync([f.patient()])
        assert len(parses) == 4


def test_the_input_fingerprint_names_every_stored_row_of_the_patient(clean_engine: Engine, codebook: Codebook) -> None:
    """The database joins the rows' "type/id/version;" lines (sorted); the digest is the one of
    those lines, then the Medications and kept rejections, on SQLite and PostgreSQL alike."""
    import hashlib

    mine = [f.patient(), f.temperature(39.0, T0, id="t-b"), f.temperature(38.0, T0, id="t-a"), f.systolic(80, T0)]
    theirs = [f.patient("p2"), f.temperature(39.0, T0, id="t-c", subject="Patient/p2")]
    with Session(clean_engine) as session:
        store_resources(session, [*mine, *theirs], codebook, server="")
        store_resources(session, [f.temperature(37.0, T0, id="t-z")], codebook, server="other")  # p1 elsewhere
        store_resources(session, [{**mine[1], "meta": {"versionId": "2"}}], codebook, server="")
        session.commit()
    with Session(clean_engine) as session:
        got = repository.input_fingerprint(session, "p1", server="")
        assert repository.input_fingerprint(session, "p1", server="") == got  # stable
        assert repository.input_fingerprint(session, "p2", server="") != got
    versions = {("Observation", "t-b"): 2}
    lines = sorted(f"{r['resourceType']}/{r['id']}/{versions.get((r['resourceType'], r['id']), 1)};" for r in mine)
    expected = hashlib.blake2b(digest_size=16)
    expected.update("".join(lines).encode())
    expected.update(b"Medication:0:0;")
    assert got == expected.hexdigest()


def test_the_same_call_again_is_not_stored_again_unless_storage_changed_meanwhile(
    clean_engine: Engine, codebook: Codebook, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.app.cache import EvaluationCache
    from service.storage.models import AuditEvent

    cache = EvaluationCache()
    resources = [f.patient(), f.temperature(39.0, T0, id="t"), f.systolic(80, T0, id="bp")]

    def hook(rs: list[dict[str, Any]]) -> Any:
        audit = AuditEvent(recorded=FIXED_NOW, actor="ehr", action="hook", route="/x", patient_id="p1", status=200)
        ev, _ = store_and_evaluate(
            clean_engine, "p1", rs, codebook, settings, FIXED_NOW, target=None, cache=cache, audit=audit, server=""
        )
        return ev

    def audits() -> int:
        with Session(clean_engine) as session:
            return len(session.exec(select(AuditEvent)).all())

    with counted(monkeypatch, sync_module, "store_resources") as stores:
        first = hook(resources)
        assert hook(copy.deepcopy(resources)) is first  # the same bytes: neither stored nor graded again
        assert len(stores) == 1 and audits() == 2  # every access is audited all the same
        # another writer changes a stored input: the same bytes again are stored and graded again
        with Session(clean_engine) as session:
            store_resources(session, [{**f.systolic(70, T0, id="bp"), "meta": {"versionId": "9"}}], codebook, server="")
            session.commit()
        third = hook(resources)
        assert len(stores) == 2 and third is not first
        assert hook([*resources, f.systolic(90, T1, id="bp2")]) is not third  # other bytes: stored
        assert len(stores) == 3


def test_an_unversioned_rejected_copy_after_a_versioned_stored_one_is_named(
    clean_engine: Engine, codebook: Codebook, settings: Settings
) -> None:
    # A poll stored version 5; a prefetch then sends the same id without meta, impossible: it
    # replaces what is stored (as an unversioned usable copy would) and is named, never dropped.
    sync_p1(
        clean_engine, [f.patient(), {**f.temperature(38.5, T0, id="t"), "meta": {"versionId": "5"}}], codebook, settings
    )
    ev, _ = sync_p1(clean_engine, [f.patient(), f.temperature(1000.0, T0, id="t")], codebook, settings)
    assert ev is not None and [r.ref for r in ev.left_out] == ["Observation/t"]


def test_a_non_string_id_or_a_number_beyond_64_bits_is_rejected_not_a_500(
    clean_engine: Engine, codebook: Codebook
) -> None:
    with Session(clean_engine) as session:
        out = store_resources(
            session,
            [f.patient(), {**f.temperature(39.0, T0), "id": 5}, {**f.temperature(39.0, T0, id="big"), "x": 2**70}],
            codebook,
            server="",
        )
    assert [r.outcome for r in out.results] == ["stored", "rejected", "rejected"]


def test_a_rejected_newer_patient_replaces_the_stored_one_in_the_evaluation(
    clean_engine: Engine, codebook: Codebook, settings: Settings
) -> None:
    sync_p1(clean_engine, [f.patient(), f.temperature(39.0, T0, id="t")], codebook, settings)
    # Its meta cannot be stored (not a FHIR id), its content can be graded: it is graded in place of
    # the stored Patient, never beside it (two Patients would be a 422 for the whole hook).
    bad_meta = {**f.patient(birth_date="1960-01-01"), "meta": {"versionId": "v 2"}}
    ev, _ = sync_p1(clean_engine, [bad_meta], codebook, settings)
    assert ev is not None and crs_of(ev).floor == 1  # fever: at least grade 1, blood pressure and oxygen unknown
