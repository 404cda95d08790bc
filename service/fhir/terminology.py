"""The project's CodeSystems and OperationDefinitions, served at their canonical URLs
(`<IECTOX_CANONICAL_BASE>/CodeSystem/<id>`, `.../OperationDefinition/<id>`: set the canonical base
to the service's public FHIR base and they resolve there). Built from the code that emits the
codes, so they cannot drift: a test checks every code of synthetic evaluations is defined."""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B.codesystem import CodeSystem
from fhir.resources.R4B.operationdefinition import OperationDefinition

from .. import __version__
from ..codebook import Codebook
from ..core.registry import REGISTRY
from ..core.scores import (
    BURDEN_CITATION,
    CRS_ANY,
    EASIX_CITATION,
    M_EASIX_CITATION,
    NEURO_ANY,
    PRODUCT_CITATION,
    S_EASIX_CITATION,
    SEVERE_CRS_ICANS,
    SEVERE_CRS_ICANS_TEXT,
)

SCORE_METHODS = (
    ("easix", "EASIX", EASIX_CITATION),
    ("m-easix", "m-EASIX", M_EASIX_CITATION),
    ("s-easix", "s-EASIX", S_EASIX_CITATION),
    ("product-baseline", "Product baseline rates", PRODUCT_CITATION),
    ("disease-burden", "Disease burden before lymphodepletion", BURDEN_CITATION),
)
OVERRIDE_REASONS = (
    ("already-managed", "Already aware; being managed"),
    ("not-applicable", "Not applicable to this patient"),
    ("data-wrong", "The inputs are wrong or out of date"),
    ("too-frequent", "Shown too often"),
)


def _concepts(rows: Any) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        code, display, *definition = row
        out.append({"code": code, "display": display, **({"definition": definition[0]} if definition else {})})
    return out


def code_systems(base: str, codebook: Codebook) -> dict[str, dict[str, Any]]:
    """id -> CodeSystem (validated)."""
    outcome = [(f"grade-{g}", f"Grade {g}") for g in range(5)] + [
        ("indeterminate", "Indeterminate", "Not gradable from the data present: never grade 0"),
        (SEVERE_CRS_ICANS, SEVERE_CRS_ICANS_TEXT),
        ("severe-crs", "Grade >= 3 CRS"),
        (CRS_ANY, "Any-grade CRS"),
        (NEURO_ANY, "Any-grade neurologic toxicity"),
        ("relapse-after-car-t", "Relapsed/refractory disease after CAR T"),
    ]
    local = sorted(
        {
            code
            for concept in codebook.concepts.values()
            for system, code in concept.codings
            if system == f"{base}/CodeSystem/local"
        }
    )
    definitions = {
        "method": ("Grading scales and scores", [(s.method, s.name) for s in REGISTRY] + list(SCORE_METHODS)),
        "assessment": (
            "What a RiskAssessment assesses",
            [
                ("current-grade", "Current grade", "The worst grade over the look-back window at the evaluation time"),
                ("max-grade", "Maximum grade since day 0", "The highest hourly grade of the course"),
                ("risk-score", "Risk score", "A published score at one time point"),
            ],
        ),
        "outcome": ("Grades and score outcomes", outcome),
        "override-reason": ("Why a clinician dismissed a CDS card", list(OVERRIDE_REASONS)),
        "local": ("Local codes of the default codebook", [(c, c) for c in local]),
    }
    out = {}
    for cs_id, (title, rows) in definitions.items():
        res = {
            "resourceType": "CodeSystem",
            "id": cs_id,
            "url": f"{base}/CodeSystem/{cs_id}",
            "version": __version__,
            "name": "Iectox" + "".join(part.capitalize() for part in cs_id.split("-")),
            "title": f"iectox: {title}",
            "status": "active",
            "content": "complete",
            "caseSensitive": True,
            "concept": _concepts(rows),
        }
        CodeSystem.model_validate(res)
        out[cs_id] = res
    return out


def operation_definitions(base: str) -> dict[str, dict[str, Any]]:
    """id -> OperationDefinition (validated) of the operations the CapabilityStatement names."""

    def op(
        op_id: str,
        code: str,
        title: str,
        *,
        system: bool,
        type_: bool,
        instance: bool,
        resource: list[str],
        params: list[dict[str, Any]],
        affects: bool,
    ) -> dict[str, Any]:
        res = {
            "resourceType": "OperationDefinition",
            "id": op_id,
            "url": f"{base}/OperationDefinition/{op_id}",
            "version": __version__,
            "name": "".join(p.capitalize() for p in op_id.replace("$", "").split("-")),
            "title": title,
            "status": "active",
            "kind": "operation",
            "affectsState": affects,
            "code": code,
            "system": system,
            "type": type_,
            "instance": instance,
            "parameter": params,
            **({"resource": resource} if resource else {}),
        }
        OperationDefinition.model_validate(res)
        return res

    def p(name: str, use: str, lo: int, hi: str, type_: str, doc: str) -> dict[str, Any]:
        return {"name": name, "use": use, "min": lo, "max": hi, "type": type_, "documentation": doc}

    at = p("at", "in", 0, "1", "dateTime", "Evaluation time (with a timezone); default: the latest input time")
    bundle = p(
        "return",
        "out",
        1,
        "1",
        "Bundle",
        "RiskAssessments (current and maximum grade per scale, scores) and their Provenance",
    )
    return {
        "evaluate": op(
            "evaluate",
            "evaluate",
            "Grade CRS and ICANS from a Bundle (nothing stored)",
            system=True,
            type_=False,
            instance=False,
            resource=[],
            params=[p("resource", "in", 1, "1", "Bundle", "The patient's data"), at, bundle],
            affects=False,
        ),
        "Patient-evaluate": op(
            "Patient-evaluate",
            "evaluate",
            "Grade a stored patient and store the result",
            system=False,
            type_=False,
            instance=True,
            resource=["Patient"],
            params=[at, bundle],
            affects=True,
        ),
        "Patient-course": op(
            "Patient-course",
            "course",
            "The course of a stored patient on every scale",
            system=False,
            type_=False,
            instance=True,
            resource=["Patient"],
            params=[at, p("return", "out", 1, "1", "Parameters", "One course per scale")],
            affects=False,
        ),
        "export": op(
            "export",
            "export",
            "Bulk Data export of the stored RiskAssessments and Provenance",
            system=True,
            type_=False,
            instance=False,
            resource=[],
            params=[
                p("_type", "in", 0, "1", "string", "RiskAssessment,Provenance"),
                p("_since", "in", 0, "1", "instant", "Versions stored at or after it"),
                p("_outputFormat", "in", 0, "1", "string", "application/fhir+ndjson"),
            ],
            affects=False,
        ),
    }
