"""FHIR out: RiskAssessment, Provenance and Bundle, validated with fhir.resources R4B.

Output contract (docs/output-contract.md): one RiskAssessment per method, status final,
occurrenceDateTime = at, method/code/outcome from the project CodeSystems, ICD-10-CM grade
codings for grade >= 1, qualitativeRisk from risk-probability, rationale and basis.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

from fhir.resources.R4B import FHIRAbstractModel
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.parameters import Parameters
from fhir.resources.R4B.provenance import Provenance
from fhir.resources.R4B.riskassessment import RiskAssessment
from fhir_core.types import String
from pydantic import TypeAdapter

from .. import __version__
from ..codebook import ICD10CM
from ..core.astct import CRS_METHOD, ICANS_METHOD
from ..core.course import Course, CourseConfig
from ..core.model import GradeResult, LeftOut
from ..core.scores import ScoreResult
from .ingest import UCUM

RISK_PROBABILITY = "http://terminology.hl7.org/CodeSystem/risk-probability"
PROVENANCE_ROLE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
ID_NAMESPACE = uuid.UUID("6f1c1f52-3b0e-4c1e-9d55-2f3c8e0a7a10")

# ICD-10-CM graded codes (fhir-integration.md "Grade codes"): grade 1..5.
ICD_GRADE_CODES = {
    CRS_METHOD: ("D89.83", "Cytokine release syndrome, grade {g}"),
    ICANS_METHOD: ("G92.0", "Immune effector cell-associated neurotoxicity syndrome, grade {g}"),
}
# Severity band reported as qualitativeRisk (documented in docs/output-contract.md).
QUALITATIVE = {0: "negligible", 1: "low", 2: "moderate", 3: "high", 4: "high", 5: "high"}
QUALITATIVE_DISPLAY = {
    "negligible": "Negligible likelihood",
    "low": "Low likelihood",
    "moderate": "Moderate likelihood",
    "high": "High likelihood",
}


def systems(base: str) -> dict[str, str]:
    return {
        "method": f"{base}/CodeSystem/method",
        "assessment": f"{base}/CodeSystem/assessment",
        "outcome": f"{base}/CodeSystem/outcome",
        "identifier": f"{base}/identifier/risk-assessment",
        "device": f"{base}/identifier/software",
        "score": f"{base}/StructureDefinition/score",
    }


def index_fields(res: dict[str, Any], base: str) -> tuple[datetime, str | None, str | None]:
    """(occurrence, method, code) of an emitted resource, for storage's index columns: a
    RiskAssessment's time (a max-grade one: its period's end), method and outcome code; a
    Provenance's recorded time."""
    if res["resourceType"] != "RiskAssessment":
        return datetime.fromisoformat(res["recorded"]), None, None
    method_system = systems(base)["method"]
    method = next(c["code"] for c in res["method"]["coding"] if c["system"] == method_system)
    when = res.get("occurrenceDateTime") or res["occurrencePeriod"]["end"]
    return datetime.fromisoformat(when), method, res["code"]["coding"][0]["code"]


def business_key(patient_ref: str, method: str, code: str, at: datetime) -> str:
    return f"{patient_ref}|{method}|{code}|{at.astimezone(UTC).isoformat()}"


def assessment_id(key: str) -> str:
    return str(uuid.uuid5(ID_NAMESPACE, key))


def _outcome(result: GradeResult, system: str) -> dict[str, Any]:
    if result.grade is None:
        return {
            "coding": [{"system": system, "code": "indeterminate", "display": "Indeterminate"}],
            "text": f"Indeterminate: missing {', '.join(result.missing) or 'data'}",
        }
    g = result.grade
    coding = [{"system": system, "code": f"grade-{g}", "display": f"Grade {g}"}]
    icd = ICD_GRADE_CODES.get(result.method)
    if icd and g >= 1:
        prefix, display = icd
        coding.append({"system": ICD10CM, "code": f"{prefix}{g}", "display": display.format(g=g)})
    return {"coding": coding, "text": f"{result.scale}: grade {g}"}


def _qualitative(code: str) -> dict[str, Any]:
    return {"coding": [{"system": RISK_PROBABILITY, "code": code, "display": QUALITATIVE_DISPLAY[code]}]}


def _envelope(
    base: str, key: str, patient_ref: str, method: str, method_text: str, code: str, code_text: str | None = None
) -> dict[str, Any]:
    """What every RiskAssessment shares: stable id and identifier, status, subject, method, code."""
    sy = systems(base)
    code_cc: dict[str, Any] = {"coding": [{"system": sy["assessment"], "code": code}]}
    if code_text:
        code_cc["text"] = code_text
    return {
        "resourceType": "RiskAssessment",
        "id": assessment_id(key),
        "identifier": [{"system": sy["identifier"], "value": key}],
        "status": "final",
        "subject": {"reference": patient_ref},
        "method": {"coding": [{"system": sy["method"], "code": method}], "text": method_text},
        "code": code_cc,
    }


def keyed_ref(patient_ref: str, server: str) -> str:
    """The patient part of a business key: with several EHRs, the server names whose patient it
    is (two servers' Patient/123 get different ids); "" (data sent to this service) as before."""
    return f"{server}:{patient_ref}" if server else patient_ref


def risk_assessment(
    result: GradeResult, patient_ref: str, base: str, code: str = "current-grade", server: str = ""
) -> dict[str, Any]:
    sy = systems(base)
    # `at` in UTC: one id per instant
    key = business_key(keyed_ref(patient_ref, server), result.method, code, result.at)
    prediction: dict[str, Any] = {"outcome": _outcome(result, sy["outcome"]), "rationale": result.rationale}
    if result.grade is not None:
        prediction["qualitativeRisk"] = _qualitative(QUALITATIVE[result.grade])
    ra = _envelope(base, key, patient_ref, result.method, result.scale, code)
    ra["occurrenceDateTime"] = result.at.isoformat()
    ra["prediction"] = [prediction]
    if result.basis:
        ra["basis"] = [{"reference": r} for r in result.basis]
    return ra


def course_assessment(
    course: Course, peak: GradeResult | None, patient_ref: str, base: str, cfg: CourseConfig, server: str = ""
) -> dict[str, Any]:
    """The maximum grade since day 0 on one scale: code max-grade, occurrencePeriod day 0 to `at`."""
    sy = systems(base)
    code = "max-grade"
    key = business_key(keyed_ref(patient_ref, server), course.method, code, course.at)
    summary = GradeResult(
        course.method,
        course.scale,
        course.at,
        course.peak_grade,
        "",
        (),
        () if course.peak_grade is not None else ("gradable data since day 0",),
    )
    prediction: dict[str, Any] = {"outcome": _outcome(summary, sy["outcome"]), "rationale": course.rationale(cfg)}
    if course.peak_grade is not None:
        prediction["qualitativeRisk"] = _qualitative(QUALITATIVE[course.peak_grade])
    # A course cut to its last IECTOX_COURSE_MAX_DAYS never claims a maximum since day 0: its
    # period and text name the span that was sampled.
    if course.sampled_from is None:
        start, text = course.start, "Maximum grade since day 0"
    else:
        start, text = course.sampled_from, "Maximum grade over the sampled span only (not since day 0)"
    ra = _envelope(base, key, patient_ref, course.method, course.scale, code, text)
    ra["occurrencePeriod"] = {"start": start.isoformat(), "end": course.at.isoformat()}
    ra["prediction"] = [prediction]
    if peak is not None and peak.basis:
        ra["basis"] = [{"reference": r} for r in peak.basis]
    return ra


def course_parameters(
    courses: list[Course], current: dict[str, GradeResult], base: str, cfg: CourseConfig
) -> dict[str, Any]:
    """`$course`: the course of every scale, as a Parameters resource (one `course` per scale)."""
    sy = systems(base)

    def grade(g: int | None) -> dict[str, Any]:
        code = "indeterminate" if g is None else f"grade-{g}"
        return {"system": sy["outcome"], "code": code, "display": "Indeterminate" if g is None else f"Grade {g}"}

    params = []
    for c in courses:
        parts: list[dict[str, Any]] = [
            {"name": "method", "valueCoding": {"system": sy["method"], "code": c.method}},
            {"name": "scale", "valueString": c.scale},
            {"name": "start", "valueDateTime": c.start.isoformat()},
            {"name": "end", "valueDateTime": c.at.isoformat()},
        ]
        if c.sampled_from is not None:  # the span was cut to the last IECTOX_COURSE_MAX_DAYS days
            parts.append({"name": "sampled-from", "valueDateTime": c.sampled_from.isoformat()})
        if c.method in current:
            parts.append({"name": "current-grade", "valueCoding": grade(current[c.method].grade)})
        parts.append({"name": "max-grade", "valueCoding": grade(c.peak_grade)})
        for name, t in (("onset", c.onset), ("peak-time", c.peak_time), ("resolution", c.resolution)):
            if t is not None:
                parts.append({"name": name, "valueDateTime": t.isoformat()})
        if c.duration is not None:
            hours = round(c.duration.total_seconds() / 3600, 2)
            parts.append(
                {"name": "duration", "valueQuantity": {"value": hours, "unit": "h", "system": UCUM, "code": "h"}}
            )
        for day, g in c.daily_max:
            parts.append(
                {
                    "name": "daily-max",
                    "part": [
                        {"name": "day", "valueInteger": day},
                        {"name": "grade", "valueCoding": grade(g)},
                    ],
                }
            )
        parts.append({"name": "rationale", "valueString": c.rationale(cfg)})
        params.append({"name": "course", "part": parts})
    return {"resourceType": "Parameters", "parameter": params}


def score_assessment(result: ScoreResult, patient_ref: str, base: str, server: str = "") -> dict[str, Any]:
    """A risk score as a RiskAssessment: code risk-score, the score value in the /score extension,
    probabilities as fractions 0-1, qualitativeRisk only where a verified cut-off exists."""
    sy = systems(base)
    code = "risk-score"
    # The time point's label is part of the key: indeterminate points share the evaluation time.
    key = business_key(keyed_ref(patient_ref, server), result.method, f"{code}@{result.label}", result.at)
    predictions = []
    for p in result.predictions:
        if result.indeterminate:
            outcome = {
                "coding": [{"system": sy["outcome"], "code": "indeterminate", "display": "Indeterminate"}],
                "text": f"{p.text}: indeterminate, missing {', '.join(result.missing)}",
            }
        else:
            outcome = {"coding": [{"system": sy["outcome"], "code": p.outcome, "display": p.text}], "text": p.text}
        pred: dict[str, Any] = {"outcome": outcome, "rationale": p.rationale}
        if p.probability is not None:
            pred["probabilityDecimal"] = p.probability
        if p.qualitative is not None:
            pred["qualitativeRisk"] = _qualitative(p.qualitative)
        if p.relative_risk is not None:
            pred["relativeRisk"] = p.relative_risk
        predictions.append(pred)
    ra = _envelope(base, key, patient_ref, result.method, result.citation, code, f"{result.method} at {result.label}")
    ra["occurrenceDateTime"] = result.at.isoformat()
    ra["prediction"] = predictions
    if result.value is not None:
        ra["extension"] = [{"url": sy["score"], "valueDecimal": round(result.value, 6)}]
    if result.basis:
        ra["basis"] = [{"reference": r} for r in result.basis]
    return ra


def provenance(targets: list[dict[str, Any]], inputs: Iterable[str], base: str, recorded: datetime) -> dict[str, Any]:
    target_ids = sorted(t["id"] for t in targets)
    prov: dict[str, Any] = {
        "resourceType": "Provenance",
        "id": str(uuid.uuid5(ID_NAMESPACE, "provenance|" + "|".join(target_ids))),
        "target": [{"reference": f"RiskAssessment/{i}"} for i in target_ids],
        "recorded": recorded.isoformat(),
        "activity": {"text": "iectox evaluation (ASTCT 2019 grading)"},
        "agent": [
            {
                "type": {"coding": [{"system": PROVENANCE_ROLE, "code": "assembler", "display": "Assembler"}]},
                "who": {
                    "identifier": {"system": systems(base)["device"], "value": "iectox"},
                    "display": f"iectox {__version__}",
                },
            }
        ],
    }
    entities = [{"role": "source", "what": {"reference": r}} for r in dict.fromkeys(inputs) if r]
    if entities:
        prov["entity"] = entities
    return prov


# Reference.reference's own type (R4B: a FHIR string), to validate many references at once.
_REFERENCES = TypeAdapter(list[Annotated[str, String()]])


def validate_emitted(resources: list[dict[str, Any]]) -> None:
    """Every emitted resource passes fhir.resources R4B (raises pydantic.ValidationError)."""
    models: dict[str, type[FHIRAbstractModel]] = {
        "RiskAssessment": RiskAssessment,
        "Provenance": Provenance,
        "Bundle": Bundle,
        "Parameters": Parameters,
        "OperationOutcome": OperationOutcome,
    }
    for res in resources:
        entities = res.get("entity") if res["resourceType"] == "Provenance" else None
        if isinstance(entities, list) and len(entities) > 1 and all(map(_is_source_entity, entities)):
            # Hundreds of entities of one shape ({role: source, what: {reference}}, `provenance`):
            # the model checks that shape on the first, the references as the FHIR strings they
            # are (measured: 0.08 ms instead of 10.5 ms for 600 entities).
            Provenance.model_validate({**res, "entity": entities[:1]})
            _REFERENCES.validate_python([e["what"]["reference"] for e in entities])
        else:
            models[res["resourceType"]].model_validate(res)


def _is_source_entity(e: Any) -> bool:
    return (
        isinstance(e, dict)
        and e.keys() == {"role", "what"}
        and e["role"] == "source"
        and isinstance(e["what"], dict)
        and e["what"].keys() == {"reference"}
    )


UNMAPPED_SHOWN = 10  # codes named per group in the informational issue; the rest are counted


def inputs_outcome(
    rows: list[LeftOut], unmapped: Mapping[tuple[str, str], int], patient_ref: str, at: datetime
) -> dict[str, Any]:
    """The evaluation's warnings (returned with it, never stored or written back): one warning
    issue per problem of each input left out of grading (lenient handling), with its FHIRPath;
    then one informational issue per resource group whose codes the codebook does not map (not
    inputs to grading), with counts, most frequent first (`iectox codebook check` lists them all)."""
    issues = [
        {
            "severity": "warning",
            "code": "value",
            "diagnostics": f"{r.ref or r.path}: left out of grading ({r.concept or 'unknown input'}): {reason}",
            "expression": [path],
        }
        for r in rows
        for path, reason in (r.problems or ((r.path, r.reason),))
    ]
    groups: dict[str, list[tuple[str, int]]] = {}
    for (group, code), n in unmapped.items():
        groups.setdefault(group, []).append((code, n))
    for group, codes in sorted(groups.items()):
        codes.sort(key=lambda x: (-x[1], x[0]))
        shown = ", ".join(f"{code} ({n})" for code, n in codes[:UNMAPPED_SHOWN])
        more = f"; and {len(codes) - UNMAPPED_SHOWN} more codes" if len(codes) > UNMAPPED_SHOWN else ""
        total = sum(n for _, n in codes)
        issues.append(
            {
                "severity": "information",
                "code": "informational",
                "diagnostics": f"{total} {group} codings not mapped by the codebook (not inputs to grading; "
                f"map them with a site overlay): {shown}{more}",
                "expression": [group],
            }
        )
    oid = assessment_id(business_key(patient_ref, "left-out", "OperationOutcome", at))
    return {"resourceType": "OperationOutcome", "id": oid, "issue": issues}


def collection(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources],
    }
