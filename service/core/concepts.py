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
    # Plausibility bounds (low, high; None: unbounded) in the canonical unit: a value outside is
    # physiologically impossible or a charting error (3.72 for 37.2 °C), never graded but left out
    # and named. These are NOT grading thresholds (docs/clinical-choices.md, "Plausibility").
    plausible: tuple[float | None, float | None] | None = None

    @property
    def score_range(self) -> tuple[int, int] | None:
        return None if self.score_max is None else (0, self.score_max)

    @property
    def plausible_range(self) -> tuple[float | None, float | None] | None:
        """The plausible values: the score range for scores, else `plausible`."""
        return self.score_range or self.plausible


def _q(unit: str, low: float | None = None, high: float | None = None) -> ConceptSpec:
    return ConceptSpec(Kind.QUANTITY, unit, plausible=(low, high))


def _pressor(unit: str, high: float) -> ConceptSpec:
    return ConceptSpec(Kind.VASOPRESSOR, unit, plausible=(0.0, high))


def _score(top: int) -> ConceptSpec:
    return ConceptSpec(Kind.SCORE, "{score}", top)


_CODED = ConceptSpec(Kind.CODED)
_DRUG = ConceptSpec(Kind.DRUG)
_EVENT = ConceptSpec(Kind.EVENT)

# Plausibility bounds (the third and fourth arguments of _q, the bound of _pressor) are
# plausibility, not clinical cut-offs: outside them a value cannot be a measurement of a living
# patient (or is a unit/decimal error), so it is left out and named, never graded. Values near
# the edge (41.5 °C, systolic 50 mmHg) are graded. Labs without a documented upper bound are only
# required to be >= 0 (a concentration or count cannot be negative).
CONCEPTS: dict[ConceptName, ConceptSpec] = {
    # 25-45 °C: below 25 °C is profound accidental hypothermia (Swiss staging HT IV) and above
    # 45 °C is beyond the highest temperatures survived; on a ward chart such values are unit or
    # decimal errors (3.72 for 37.2 °C, 1000 for 100.0 °F).
    C.BODY_TEMPERATURE: _q("Cel", 25.0, 45.0),
    # Arterial pressures: a systolic < 20 or > 300 mmHg, a MAP < 10 or > 250 mmHg is not a
    # measurement of circulating blood (cardiac arrest is charted as such, not as a pressure).
    C.SYSTOLIC_BP: _q("mm[Hg]", 20.0, 300.0),
    C.MEAN_ARTERIAL_PRESSURE: _q("mm[Hg]", 10.0, 250.0),
    # Saturations and fractions are percentages: 0-100 % by definition.
    C.SPO2: _q("%", 0.0, 100.0),
    # FiO2 below room air (21 %) is not delivered by any oxygen device.
    C.FIO2: _q("%", 21.0, 100.0),
    # 80 L/min is above the maximum of high-flow nasal cannula systems (60-80 L/min).
    C.OXYGEN_FLOW: _q("L/min", 0.0, 80.0),
    C.OXYGEN_DEVICE: _CODED,
    # 0.3 kg (extreme prematurity) to 650 kg (beyond the heaviest recorded humans).
    C.BODY_WEIGHT: _q("kg", 0.3, 650.0),
    # ICE is 0-10 (ASTCT 2019); CAPD is 0-32 (Traube 2014); CARTOX-10 is 0-10 (Neelapu 2018).
    C.ICE_SCORE: _score(10),
    C.CAPD_SCORE: _score(32),
    C.CARTOX_10: _score(10),
    C.CONSCIOUSNESS: _CODED,
    C.SEIZURE: _CODED,
    C.MOTOR_WEAKNESS: _CODED,
    C.CEREBRAL_EDEMA: _CODED,
    C.CRP: _q("mg/dL", 0.0),
    C.FERRITIN: _q("ng/mL", 0.0),
    C.LDH: _q("U/L", 0.0),
    C.PLATELETS: _q("10*9/L", 0.0),
    C.CREATININE: _q("mg/dL", 0.0),
    C.ANC: _q("10*9/L", 0.0),
    # Hemoglobin above 30 g/dL is beyond any polycythaemia (a mg/dL or g/L value sent as g/dL).
    C.HEMOGLOBIN: _q("g/dL", 0.0, 30.0),
    C.AST: _q("U/L", 0.0),
    C.ALT: _q("U/L", 0.0),
    C.IL6: _q("pg/mL", 0.0),
    C.MCP1: _q("pg/mL", 0.0),
    # Vasopressor rates: >= 0 and below an absurd ceiling, about ten times the highest doses
    # used (norepinephrine/epinephrine ~1-3 ug/kg/min = ~100-300 ug/min; phenylephrine
    # ~200-400 ug/min; dopamine 20 ug/kg/min; vasopressin 0.04-0.07 U/min).
    C.NOREPINEPHRINE: _pressor("ug/min", 3000.0),
    C.EPINEPHRINE: _pressor("ug/min", 3000.0),
    C.PHENYLEPHRINE: _pressor("ug/min", 5000.0),
    C.DOPAMINE: _pressor("ug/kg/min", 200.0),
    C.VASOPRESSIN: _pressor("U/min", 1.0),
    C.TOCILIZUMAB: _DRUG,
    C.ANAKINRA: _DRUG,
    C.DEXAMETHASONE: _DRUG,
    C.METHYLPREDNISOLONE: _DRUG,
    C.ACETAMINOPHEN: _DRUG,
    C.CART_INFUSION: _EVENT,
    C.LYMPHODEPLETION: _EVENT,
    C.INDICATION: ConceptSpec(Kind.CONDITION),
    C.BM_BLASTS: _q("%", 0.0, 100.0),
    C.EXTRAMEDULLARY_DISEASE: _CODED,
}

if set(CONCEPTS) != set(ConceptName):  # pragma: no cover - a registry edit left a member without its spec
    raise RuntimeError(f"concepts without a spec: {sorted(set(ConceptName) - set(CONCEPTS))}")


_BY_NAME: dict[str, ConceptSpec] = {str(name): s for name, s in CONCEPTS.items()}


def spec(name: str) -> ConceptSpec | None:
    """The registered spec of a concept name (a member or its string), or None if unregistered."""
    return _BY_NAME.get(name)  # a member hashes and compares as its string
