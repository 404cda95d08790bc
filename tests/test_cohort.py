"""Cohort grading from a Bulk FHIR export on a 2-worker local Dask cluster (service/cohort): the
same grades and FHIR output as `$evaluate` of each patient's Bundle, patient by patient and scale
by scale; a patient split across several files; gzip; a resource whose patient is not in the
export and a bad line named in the warnings, the rest graded; valid FHIR out; the report."""

from __future__ import annotations

import copy
import csv
import gzip
import shutil
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.app.evaluate import evaluate_body
from service.codebook import load_codebook
from service.cohort.export import ExportError
from service.cohort.grade import MAX_ORPHAN_NAMED, max_grade
from service.cohort.run import CohortSummary, grade_cohort
from service.config.settings import Settings
from service.devtools.synth import SyntheticPatient, generate_cohort, write_ndjson
from tests.fhir_validators import assert_valid_fhir

pytestmark = pytest.mark.integration  # a Dask cluster of worker processes

NOW = datetime(2026, 11, 21, 12, tzinfo=UTC)


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _ndjson(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def cohort() -> list[SyntheticPatient]:
    return generate_cohort(8, 3, days=7)  # every scenario once


@pytest.fixture(scope="module")
def graded(tmp_path_factory: pytest.TempPathFactory, cohort: list[SyntheticPatient]) -> tuple[Path, CohortSummary]:
    export = tmp_path_factory.mktemp("export")
    # 3,000 resources per file: Observation.ndjson ... Observation.4.ndjson, every patient across several
    files = write_ndjson(cohort, export, max_lines=3000)
    assert len([f for f in files if f.name.startswith("Observation")]) >= 3
    out = tmp_path_factory.mktemp("out")
    summary = grade_cohort(export, out, Settings(), NOW, workers=2, partition_mb=1.0, progress=False)
    return out, summary


def test_the_same_grades_and_output_as_evaluate(
    graded: tuple[Path, CohortSummary], cohort: list[SyntheticPatient]
) -> None:
    out, summary = graded
    assert summary.patients == len(cohort) and summary.partitions >= 2
    settings = Settings()
    codebook = load_codebook(settings.canonical_base)
    assessments = defaultdict(list)
    for ra in _ndjson(out / "RiskAssessment.ndjson"):
        assessments[ra["subject"]["reference"]].append(ra)
    courses = {(r["patient"], r["method"]): r for r in _csv(out / "courses.csv")}
    registry = {r["patient"]: r for r in _csv(out / "registry.csv")}
    warnings = defaultdict(list)
    for w in _csv(out / "warnings.csv"):
        warnings[w["patient"]].append((w["where"], w["reason"]))
    for p in cohort:
        bundle = {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": e["resource"]} for e in p.bundle["entry"]],
        }
        ev = evaluate_body(orjson.dumps(bundle), codebook, settings, None, NOW, strict=False)
        # the very RiskAssessments $evaluate returns (same ids, grades, rationale, basis)
        key = lambda ra: ra["id"]  # noqa: E731
        assert sorted(assessments[f"Patient/{p.patient_id}"], key=key) == sorted(ev.assessments, key=key)
        # the warnings $evaluate returns with it (codes not mapped, inputs left out)
        issues = [("; ".join(i.get("expression") or ()), i["diagnostics"]) for i in (ev.outcome or {}).get("issue", ())]
        assert sorted(warnings[p.patient_id]) == sorted(issues)
        for c in ev.courses:
            row = courses[(p.patient_id, c.method)]
            assert row["max_grade"] == max_grade(c) and row["max_grade_at_least"] == (
                "" if c.peak_grade is None else str(c.peak_grade)
            )
            assert row["onset"] == (c.onset.isoformat() if c.onset else "")
            assert row["resolved_at"] == (c.resolution.isoformat() if c.resolution else "")
        # and the grades the synthetic scenario was built to have
        assert registry[p.patient_id]["crs_max_grade"] == str(p.expected_peak_crs)
        assert registry[p.patient_id]["icans_max_grade"] == str(p.expected_peak_icans)
        assert registry[p.patient_id]["crs"] == ("yes" if p.expected_peak_crs else "no")


def test_parquet_tables_hold_every_patient(graded: tuple[Path, CohortSummary], cohort: list[SyntheticPatient]) -> None:
    import pyarrow.parquet as pq

    out, _ = graded
    courses = pq.read_table(out / "courses.parquet").to_pylist()
    assert {r["patient"] for r in courses} == {p.patient_id for p in cohort}
    assert len(courses) == 9 * len(cohort)  # every scale
    daily = pq.read_table(out / "daily.parquet")
    assert daily.column_names == ["patient", "method", "day", "max_grade"] and daily.num_rows > len(courses)
    scores = pq.read_table(out / "scores.parquet").to_pylist()
    assert {s["method"] for s in scores} >= {"easix", "product-baseline"}


def test_fhir_output_is_valid(graded: tuple[Path, CohortSummary]) -> None:
    out, _ = graded
    provenances = _ndjson(out / "Provenance.ndjson")
    first = provenances[0]
    targets = {t["reference"] for t in first["target"]}
    ras = [ra for ra in _ndjson(out / "RiskAssessment.ndjson") if f"RiskAssessment/{ra['id']}" in targets]
    assert ras and len(ras) == len(targets)
    assert_valid_fhir([*ras, first])


def test_report_is_one_page_without_outside_requests(graded: tuple[Path, CohortSummary]) -> None:
    out, _ = graded
    html = (out / "report.html").read_text()
    for heading in ("Maximum grade since day 0", "ASTCT 2019 CRS against the older CRS scales", "Onset", "Duration"):
        assert heading in html
    assert "<script" not in html and "src=" not in html and "href=" not in html
    assert "against lee2014-crs" in html and "against ctcae5-crs" in html


def test_gzip_orphans_bad_lines_and_other_types(tmp_path: Path, cohort: list[SyntheticPatient]) -> None:
    export = tmp_path / "export"
    write_ndjson(cohort[:3], export, gzip=True, max_lines=2000)
    kept = {p.patient_id for p in cohort[:2]}
    # the third patient's Patient resource is missing: its resources are named, not graded
    patients = [
        r
        for r in (orjson.loads(x) for x in gzip.decompress((export / "Patient.ndjson.gz").read_bytes()).splitlines())
        if r["id"] in kept
    ]
    (export / "Patient.ndjson.gz").write_bytes(gzip.compress(b"".join(orjson.dumps(r) + b"\n" for r in patients)))
    with gzip.open(export / "Observation.9.ndjson.gz", "wb") as f:
        f.write(b'{"resourceType": "Observation", "status": "final"\n')  # line 1: not JSON
        f.write(b"[1, 2]\n")  # line 2: not a resource
        f.write(orjson.dumps({"resourceType": "Observation", "id": "x", "status": "final"}) + b"\n")  # no patient
    (export / "Encounter.ndjson").write_bytes(orjson.dumps({"resourceType": "Encounter", "id": "e1"}) + b"\n")
    (export / "README.txt").write_text("not part of the export")
    out = tmp_path / "out"
    summary = grade_cohort(export, out, Settings(), NOW, workers=2, progress=False)
    assert summary.patients == 2
    warnings = _csv(out / "warnings.csv")
    orphan = cohort[2].patient_id
    orphaned = [w for w in warnings if w["patient"] == orphan]
    assert orphaned and all(f"Patient/{orphan}" in w["reason"] and "not graded" in w["reason"] for w in orphaned)
    n_orphaned = sum(1 for e in cohort[2].bundle["entry"] if e["resource"]["resourceType"] != "Patient")
    assert len(orphaned) == MAX_ORPHAN_NAMED + 1  # the first ones named, then how many more
    assert orphaned[-1]["reason"].startswith(f"{n_orphaned - MAX_ORPHAN_NAMED} more resources")
    named = {(w["where"], w["reason"].split(":")[0]) for w in warnings if w["where"].startswith("Observation.9")}
    assert named == {
        ("Observation.9.ndjson.gz:1", "not JSON"),
        ("Observation.9.ndjson.gz:2", "not a FHIR resource (no resourceType)"),
        ("Observation.9.ndjson.gz:3", "a Observation that names no patient"),
    }
    assert any(w["reason"] == "1 Encounter: a type grading does not read" for w in warnings)
    assert {"where": "README.txt", "reason": "not an NDJSON file of the export: skipped", "patient": ""} in warnings
    assert {r["patient"] for r in _csv(out / "registry.csv")} == kept
    assert not (out / ".work").exists()


def test_cli_grades_an_export(tmp_path: Path, cohort: list[SyntheticPatient]) -> None:
    from service.cli import main

    export = tmp_path / "export"
    assert main(["synth", "--format", "ndjson", "--patients", "2", "--days", "7", "--out", str(export)]) == 0
    assert (export / "Patient.ndjson").exists()
    assert main(["cohort", "grade", str(export), "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    assert len(_csv(tmp_path / "out" / "registry.csv")) == 2
    assert main(["cohort", "grade", str(tmp_path / "nothing"), "--out", str(tmp_path / "o2")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["cohort", "grade", str(empty), "--out", str(tmp_path / "o3")]) == 2
    assert main(["cohort", "grade", str(export), "--out", str(tmp_path / "o4"), "--at", "yesterday"]) == 2
    shutil.rmtree(tmp_path / "out")


def test_report_opens_in_a_browser(graded: tuple[Path, CohortSummary], chromium: Any) -> None:
    out, summary = graded
    page = chromium.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto((out / "report.html").resolve().as_uri())
    assert page.inner_text("h1").startswith("Cohort report")
    assert f"{summary.patients} patients graded" in page.inner_text("body")
    assert page.locator("svg").count() >= 9 + 4  # one chart per scale, two onset and two duration charts
    assert page.locator("table").count() >= 6  # the cross-tables against the older scales
    assert all(u.startswith("file://") for u in requests), requests  # self-contained
    page.close()
    assert summary.worker_peak_mib is None or summary.worker_peak_mib > 0


def _write(path: Path, resources: list[dict[str, Any]], prefix: bytes = b"") -> None:
    path.write_bytes(prefix + b"".join(orjson.dumps(r) + b"\n" for r in resources))


def _one_patient(
    tmp_path: Path, cohort: list[SyntheticPatient], index: int = 1
) -> tuple[Path, SyntheticPatient, list[dict[str, Any]]]:
    p = copy.deepcopy(cohort[index])  # the cohort is shared by the module's tests: never changed
    export = tmp_path / "export"
    export.mkdir()
    return export, p, [e["resource"] for e in p.bundle["entry"]]


def test_repeated_ids_keep_the_newest_version_as_evaluate_does(tmp_path: Path, cohort: list[SyntheticPatient]) -> None:
    export, _, resources = _one_patient(tmp_path, cohort)
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    others = [r for r in resources if r["resourceType"] != "Patient"]
    # an afebrile newer version of an Observation in one file, a febrile older one in another
    temp = next(r for r in others if r["resourceType"] == "Observation" and r["code"]["coding"][0]["code"] == "8310-5")
    newer = temp | {
        "meta": {"versionId": "2"},
        "valueQuantity": {"value": 36.5, "unit": "Cel", "system": "http://unitsofmeasure.org", "code": "Cel"},
    }
    older = temp | {
        "meta": {"versionId": "1"},
        "valueQuantity": {"value": 40.1, "unit": "Cel", "system": "http://unitsofmeasure.org", "code": "Cel"},
    }
    rest = [r for r in others if r is not temp]
    _write(export / "Patient.ndjson", [patient])
    _write(export / "Patient.2.ndjson", [patient])  # the same Patient twice (a re-export)
    _write(export / "Observation.ndjson", [*[r for r in rest if r["resourceType"] == "Observation"], newer])
    _write(export / "Observation.2.ndjson", [older])
    _write(
        export / "MedicationAdministration.ndjson", [r for r in rest if r["resourceType"] == "MedicationAdministration"]
    )
    _write(export / "Condition.ndjson", [r for r in rest if r["resourceType"] == "Condition"])
    out = tmp_path / "out"
    assert grade_cohort(export, out, Settings(), NOW, workers=1, progress=False).patients == 1
    settings = Settings()
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": r} for r in [patient, *rest, older, newer]],
    }
    ev = evaluate_body(orjson.dumps(bundle), load_codebook(settings.canonical_base), settings, None, NOW, strict=False)
    assert sorted(_ndjson(out / "RiskAssessment.ndjson"), key=lambda r: r["id"]) == sorted(
        ev.assessments, key=lambda r: r["id"]
    )


@pytest.mark.parametrize("reference", ["Patient/{id}/_history/1", "https://ehr.example/fhir/Patient/{id}"])
def test_a_resource_the_grading_cannot_place_stops_its_patient(
    tmp_path: Path, cohort: list[SyntheticPatient], reference: str
) -> None:
    """As `$evaluate` refuses (422) a Bundle whose subject it cannot place, the patient is not
    graded on the rest of its data: it is named."""
    export, p, resources = _one_patient(tmp_path, cohort)
    obs = next(r for r in resources if r["resourceType"] == "Observation")
    obs["subject"] = {"reference": reference.format(id=p.patient_id)}
    write_ndjson([p], export)
    out = tmp_path / "out"
    summary = grade_cohort(export, out, Settings(), NOW, workers=1, progress=False)
    assert summary.patients == 0
    (w,) = [w for w in _csv(out / "warnings.csv") if w["patient"] == p.patient_id]
    assert w["reason"].startswith("patient not graded")


def test_partly_ungraded_hours_are_never_a_maximum_of_0(tmp_path: Path, cohort: list[SyntheticPatient]) -> None:
    """No temperature from day 2 on: those hours cannot be graded, so the maximum since day 0 is
    not 0 but indeterminate (at least 0), and the registry says unknown, not no."""
    from datetime import timedelta

    export, p, resources = _one_patient(tmp_path, cohort, 0)  # no-crs
    cut = p.day0 + timedelta(days=2)

    def late_temperature(r: dict[str, Any]) -> bool:
        is_temp = r["resourceType"] == "Observation" and r["code"]["coding"][0]["code"] == "8310-5"
        return is_temp and datetime.fromisoformat(r["effectiveDateTime"]) > cut

    kept = [r for r in resources if not late_temperature(r)]
    p.bundle["entry"] = [{"resource": r} for r in kept]
    write_ndjson([p], export)
    out = tmp_path / "out"
    grade_cohort(export, out, Settings(), NOW, workers=1, progress=False)
    crs = next(r for r in _csv(out / "courses.csv") if r["method"] == "astct-crs")
    assert float(crs["indeterminate_hours"]) > 0
    assert crs["max_grade"] == "indeterminate" and crs["max_grade_at_least"] == "0"
    reg = _csv(out / "registry.csv")[0]
    assert reg["crs"] == "unknown" and reg["crs_max_grade"] == "indeterminate"
    assert "at least 0" in (out / "report.html").read_text()


def test_an_unreadable_file_stops_the_job_and_names_it(tmp_path: Path, cohort: list[SyntheticPatient]) -> None:
    export, p, _ = _one_patient(tmp_path, cohort)
    write_ndjson([p], export)
    (export / "Observation.2.ndjson.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ExportError, match=r"Observation\.2\.ndjson\.gz cannot be read"):
        grade_cohort(export, tmp_path / "out", Settings(), NOW, workers=1, progress=False)
    assert not (tmp_path / "out" / "courses.csv").exists()


def test_a_byte_order_mark_is_not_a_bad_line(tmp_path: Path, cohort: list[SyntheticPatient]) -> None:
    export, p, resources = _one_patient(tmp_path, cohort)
    write_ndjson([p], export)
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    _write(export / "Patient.ndjson", [patient], prefix=b"\xef\xbb\xbf")
    out = tmp_path / "out"
    assert grade_cohort(export, out, Settings(), NOW, workers=1, progress=False).patients == 1


def test_runs_on_an_existing_cluster(tmp_path: Path, cohort: list[SyntheticPatient]) -> None:
    """--scheduler: the same job on a cluster started elsewhere (here: another local cluster,
    reached by its scheduler address as a remote one would be)."""
    from dask.distributed import LocalCluster

    export = tmp_path / "export"
    write_ndjson(cohort[:3], export)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        summary = grade_cohort(
            export, tmp_path / "out", Settings(), NOW, scheduler=cluster.scheduler_address, progress=False
        )
    assert summary.patients == 3 and len(_csv(tmp_path / "out" / "registry.csv")) == 3
