"""Explicit UCUM unit conversion to each concept's canonical unit (declared in concepts.py).

Only the conversions listed here exist. A unit not listed for a concept is an error, never
a guess (clinical-rules.md; fhir-integration.md "UCUM units").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .concepts import CONCEPTS, C, spec

# Creatinine: 1 mg/dL = 88.4 umol/L (molar mass 113.12 g/mol: 10,000 / 113.12 = 88.40).
CREATININE_UMOL_L_PER_MG_DL = 88.4


class UnitError(ValueError):
    """A value whose unit cannot be converted for its concept."""


@dataclass(frozen=True, slots=True)
class Conversion:
    to_unit: str
    factor: float = 1.0
    offset: float = 0.0
    # Multiply (1) or divide (-1) by body weight in kg; 0 when weight is not involved.
    weight_power: int = 0

    def apply(self, value: float, weight_kg: float | None) -> float:
        out = value * self.factor + self.offset
        if self.weight_power:
            if weight_kg is None:
                raise UnitError("needs body weight (LOINC 29463-7) to convert")
            out = out * weight_kg if self.weight_power > 0 else out / weight_kg
        return out


def _same(unit: str) -> Conversion:
    return Conversion(unit)


# canonical unit -> {source UCUM code -> conversion}
_TEMPERATURE = {"Cel": _same("Cel"), "[degF]": Conversion("Cel", 5 / 9, -32 * 5 / 9)}
_PRESSURE = {"mm[Hg]": _same("mm[Hg]")}
_PERCENT = {"%": _same("%"), "1": Conversion("%", 100.0)}
_FLOW = {"L/min": _same("L/min"), "mL/min": Conversion("L/min", 0.001)}
_WEIGHT = {"kg": _same("kg"), "g": Conversion("kg", 0.001), "[lb_av]": Conversion("kg", 0.45359237)}
_SCORE = {"{score}": _same("{score}")}
_MG_DL = {"mg/dL": _same("mg/dL"), "mg/L": Conversion("mg/dL", 0.1)}
_CREATININE = {"mg/dL": _same("mg/dL"), "umol/L": Conversion("mg/dL", 1 / CREATININE_UMOL_L_PER_MG_DL)}
_NG_ML = {"ng/mL": _same("ng/mL"), "ug/L": _same("ng/mL")}
_PG_ML = {"pg/mL": _same("pg/mL"), "ng/L": _same("pg/mL")}
# For enzyme activity the international unit and U are the same unit (1 umol/min).
_ENZYME = {"U/L": _same("U/L"), "[IU]/L": _same("U/L")}
_COUNT = {"10*9/L": _same("10*9/L"), "10*3/uL": _same("10*9/L"), "/uL": Conversion("10*9/L", 0.001)}
_HB = {"g/dL": _same("g/dL"), "g/L": Conversion("g/dL", 0.1)}
_UG_MIN = {
    "ug/min": _same("ug/min"),
    "ug/kg/min": Conversion("ug/min", weight_power=1),
    "mg/h": Conversion("ug/min", 1000 / 60),
    "ug/h": Conversion("ug/min", 1 / 60),
}
_UG_KG_MIN = {"ug/kg/min": _same("ug/kg/min"), "ug/min": Conversion("ug/kg/min", weight_power=-1)}
# Vasopressin is dosed in units/min; UCUM's U is the enzyme unit, so sites send
# [iU]/min or [USP'U]/min, and U/min is accepted as sent (fhir-integration.md).
_VASOPRESSIN = {
    "U/min": _same("U/min"),
    "[iU]/min": _same("U/min"),
    "[USP'U]/min": _same("U/min"),
    "U/h": Conversion("U/min", 1 / 60),
    "[iU]/h": Conversion("U/min", 1 / 60),
    "[USP'U]/h": Conversion("U/min", 1 / 60),
}

# Unit spellings real systems send that are not UCUM codes, read as the UCUM code they
# unambiguously mean (docs/codebook.md, "Unit aliases"). Looked up only when the unit as sent is
# not itself accepted. Spellings that could mean something else are deliberately absent: "C" is
# the UCUM coulomb, "F" the farad, "U" (as sent) is already accepted where the codebook allows it.
UNIT_ALIASES: dict[str, str] = {
    # temperature
    "degF": "[degF]",
    "°F": "[degF]",
    "deg F": "[degF]",
    "degC": "Cel",
    "°C": "Cel",
    "deg C": "Cel",
    # pressure
    "mmHg": "mm[Hg]",
    "mm Hg": "mm[Hg]",
    # vasopressor rates ("mcg" is the clinical spelling of ug)
    "mcg/min": "ug/min",
    "mcg/kg/min": "ug/kg/min",
    "mcg/h": "ug/h",
    "mcg/hr": "ug/h",
    "mg/hr": "mg/h",
    "units/min": "U/min",
    "units/h": "U/h",
    "units/hr": "U/h",
    "unit/min": "U/min",
    "unit/h": "U/h",
    # volume rates (infusion pumps), read with the bag's concentration
    "mL/hr": "mL/h",
    "ml/hr": "mL/h",
    "ml/h": "mL/h",
    # oxygen flow, weight
    "lpm": "L/min",
    "LPM": "L/min",
    "lb": "[lb_av]",
    "lbs": "[lb_av]",
}


def ucum_code(unit: str) -> str:
    """The UCUM code of a unit as sent: itself, or its entry in UNIT_ALIASES."""
    return UNIT_ALIASES.get(unit, unit)


# Keyed by the registry (service/core/concepts.py); checked against it at import.
CONVERSIONS: dict[str, dict[str, Conversion]] = {
    C.BODY_TEMPERATURE: _TEMPERATURE,
    C.SYSTOLIC_BP: _PRESSURE,
    C.MEAN_ARTERIAL_PRESSURE: _PRESSURE,
    C.SPO2: _PERCENT,
    C.FIO2: _PERCENT,
    C.OXYGEN_FLOW: _FLOW,
    C.BODY_WEIGHT: _WEIGHT,
    C.ICE_SCORE: _SCORE,
    C.CAPD_SCORE: _SCORE,
    C.CARTOX_10: _SCORE,
    C.CRP: _MG_DL,
    C.FERRITIN: _NG_ML,
    C.LDH: _ENZYME,
    C.PLATELETS: _COUNT,
    C.CREATININE: _CREATININE,
    C.ANC: _COUNT,
    C.HEMOGLOBIN: _HB,
    C.AST: _ENZYME,
    C.ALT: _ENZYME,
    C.IL6: _PG_ML,
    C.MCP1: _PG_ML,
    C.BM_BLASTS: {"%": _same("%")},
    C.NOREPINEPHRINE: _UG_MIN,
    C.EPINEPHRINE: _UG_MIN,
    C.PHENYLEPHRINE: _UG_MIN,
    C.DOPAMINE: _UG_KG_MIN,
    C.VASOPRESSIN: _VASOPRESSIN,
}


def _check_against_registry() -> None:
    """Every concept with a canonical unit has its conversions here, all into that unit, and no other."""
    unknown = set(CONVERSIONS) - set(CONCEPTS)
    if unknown:
        raise RuntimeError(f"units.py: conversions for unregistered concepts {sorted(unknown)}")
    for name, s in CONCEPTS.items():
        table = CONVERSIONS.get(name)
        if (s.unit is None) != (table is None):
            raise RuntimeError(f"units.py: {name} has canonical unit {s.unit!r} but conversions {table!r}")
        if table is not None and {c.to_unit for c in table.values()} != {s.unit}:
            raise RuntimeError(f"units.py: {name} converts to a unit other than its canonical {s.unit!r}")


_check_against_registry()


def units_for(concept: str) -> list[str]:
    return list(CONVERSIONS.get(concept, {}))


def canonical_unit(concept: str) -> str:
    s = spec(concept)
    if s is None or s.unit is None:
        raise KeyError(concept)
    return s.unit


def converter(concept: str, unit: str) -> Callable[[float, float | None], float]:
    """The conversion of `unit` to the concept's canonical unit, or UnitError."""
    table = CONVERSIONS.get(concept)
    if table is None:
        raise UnitError(f"concept {concept!r} carries no quantity")
    conv = table.get(unit)
    if conv is None:
        conv = table.get(ucum_code(unit))
    if conv is None:
        raise UnitError(f"unit {unit!r} is not accepted for {concept} (accepted: {', '.join(table)})")
    return conv.apply
