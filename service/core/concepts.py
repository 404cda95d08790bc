"""The registry of input concepts: every name the service grades from, declared once.

A concept is an input to grading (a vital sign, a lab, a score, a coded finding, a drug, an
event or the indication). This module declares its name, its kind, its canonical unit (for
quantities, scores and vasopressor rates) and, for scores, the valid range. The codebook
(service/codebook/default.json) maps FHIR codes onto these names and is rejected at load when
it names a concept that is not here or gives it another kind; units.py holds the conversions
into each canonical unit and is checked against it at import. Code refers to a concept as a
member (`C.CREATININE`), so a misspelt name is an AttributeError at import, never a series
that is silently empty and a grade that is silently indeterminate.

Pure: imports nothing outside the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    """How a concept arrives in FHIR (docs/codebook.md, "Kinds")."""

    QUANTITY = "quantity"  # Observation valueQuantity
    SCORE = "score"  # Observation valueInteger (or valueQuantity in {score})
    CODED = "coded"  # Observation valueCodeableConcept, matched against the codebook's values
    DRUG = "drug"  # MedicationAdministration
    VASOPRESSOR = "vasopressor"  # MedicationAdministration with a rate
    EVENT = "event"  # Procedure or MedicationAdministration
    CONDITION = "condition"  # Condition.code, matched against the codebook's values

    def __repr__(self) -> str:
        return str.__repr__(self)


class ConceptName(StrEnum):
    """Every input concept. Members compare and hash equal to their names ("crp")."""

    BODY_TEMPERATURE = "body-temperature"
    SYSTOLIC_BP = "systolic-bp"
    MEAN_ARTERIAL_PRESSURE = "mean-arterial-pressure"
    SPO2 = "spo2"
    FIO2 = "fio2"
    OXYGEN_FLOW = "oxygen-flow"
    OXYGEN_DEVICE = "oxygen-device"
    BODY_WEIGHT = "body-weight"
    ICE_SCORE = "ice-score"
    CAPD_SCORE = "capd-score"
    CARTOX_10 = "cartox-10"
    CONSCIOUSNESS = "consciousness"
    SEIZURE = "seizure"
    MOTOR_WEAKNESS = "motor-weakness"
    CEREBRAL_EDEMA = "cerebral-edema"
    CRP = "crp"
    FERRITIN = "ferritin"
    LDH = "ldh"
    PLATELETS = "platelets"
    CREATININE = "creatinine"
    ANC = "anc"
    HEMOGLOBIN = "hemoglobin"
    AST = "ast"
    ALT = "alt"
    IL6 = "il6"
    MCP1 = "mcp1"
    NOREPINEPHRINE = "norepinephrine"
    EPINEPHRINE = "epinephrine"
    PHENYLEPHRINE = "phenylephrine"
    DOPAMINE = "dopamine"
    VASOPRESSIN = "vasopressin"
    TOCILIZUMAB = "tocilizumab"
    ANAKINRA = "anakinra"
    DEXAMETHASONE = "dexamethasone"
    METHYLPREDNISOLONE = "methylprednisolone"
    ACETAMINOPHEN = "acetaminophen"
    CART_INFUSION = "cart-infusion"
    LYMPHODEPLETION = "lymphodepletion"
    INDICATION = "indication"
    BM_BLASTS = "bm-blasts"
    EXTRAMEDULLARY_DISEASE = "extramedullary-disease"

    def __repr__(self) -> str:
        # As the plain name, so a message reads the same whether its concept came from the
        # codebook (a str) or from this registry.
        return str.__repr__(self)


C = ConceptName  # the short spelling used at call sites: C.CRP


@dataclass(frozen=True, slots=True)
class ConceptSpec:
    kind: Kind
    unit: str | None = None  # canonical UCUM unit (quantities, scores, vasopressor rates)
    score_max: int | None = None  # scores: valid values are the integers 0..score_max

    @property
    def score_range(self) -> tuple[int, int] | None:
        return None if self.score_max is None else (0, self.score_max)


def _q(unit: str) -> ConceptSpec:
    return ConceptSpec(Kind.QUANTITY, unit)


def _score(top: int) -> ConceptSpec:
    return ConceptSpec(Kind.SCORE, "{score}", top)


_CODED = ConceptSpec(Kind.CODED)
_DRUG = ConceptSpec(Kind.DRUG)
_EVENT = ConceptSpec(Kind.EVENT)

CONCEPTS: dict[ConceptName, ConceptSpec] = {
    C.BODY_TEMPERATURE: _q("Cel"),
    C.SYSTOLIC_BP: _q("mm[Hg]"),
    C.MEAN_ARTERIAL_PRESSURE: _q("mm[Hg]"),
    C.SPO2: _q("%"),
    C.FIO2: _q("%"),
    C.OXYGEN_FLOW: _q("L/min"),
    C.OXYGEN_DEVICE: _CODED,
    C.BODY_WEIGHT: _q("kg"),
    # ICE is 0-10 (ASTCT 2019); CAPD is 0-32 (Traube 2014); CARTOX-10 is 0-10 (Neelapu 2018).
    C.ICE_SCORE: _score(10),
    C.CAPD_SCORE: _score(32),
    C.CARTOX_10: _score(10),
    C.CONSCIOUSNESS: _CODED,
    C.SEIZURE: _CODED,
    C.MOTOR_WEAKNESS: _CODED,
    C.CEREBRAL_EDEMA: _CODED,
    C.CRP: _q("mg/dL"),
    C.FERRITIN: _q("ng/mL"),
    C.LDH: _q("U/L"),
    C.PLATELETS: _q("10*9/L"),
    C.CREATININE: _q("mg/dL"),
    C.ANC: _q("10*9/L"),
    C.HEMOGLOBIN: _q("g/dL"),
    C.AST: _q("U/L"),
    C.ALT: _q("U/L"),
    C.IL6: _q("pg/mL"),
    C.MCP1: _q("pg/mL"),
    C.NOREPINEPHRINE: ConceptSpec(Kind.VASOPRESSOR, "ug/min"),
    C.EPINEPHRINE: ConceptSpec(Kind.VASOPRESSOR, "ug/min"),
    C.PHENYLEPHRINE: ConceptSpec(Kind.VASOPRESSOR, "ug/min"),
    C.DOPAMINE: ConceptSpec(Kind.VASOPRESSOR, "ug/kg/min"),
    C.VASOPRESSIN: ConceptSpec(Kind.VASOPRESSOR, "U/min"),
    C.TOCILIZUMAB: _DRUG,
    C.ANAKINRA: _DRUG,
    C.DEXAMETHASONE: _DRUG,
    C.METHYLPREDNISOLONE: _DRUG,
    C.ACETAMINOPHEN: _DRUG,
    C.CART_INFUSION: _EVENT,
    C.LYMPHODEPLETION: _EVENT,
    C.INDICATION: ConceptSpec(Kind.CONDITION),
    C.BM_BLASTS: _q("%"),
    C.EXTRAMEDULLARY_DISEASE: _CODED,
}

if set(CONCEPTS) != set(ConceptName):  # pragma: no cover - a registry edit left a member without its spec
    raise RuntimeError(f"concepts without a spec: {sorted(set(ConceptName) - set(CONCEPTS))}")


def spec(name: str) -> ConceptSpec | None:
    """The registered spec of a concept name (a member or its string), or None if unregistered."""
    try:
        return CONCEPTS[ConceptName(name)]
    except ValueError:
        return None
