"""Every UCUM conversion in service/core/units.py, as a table (units are never guessed)."""

from __future__ import annotations

import pytest

from service.core.units import (
    CONVERSIONS,
    CREATININE_UMOL_L_PER_MG_DL,
    UnitError,
    canonical_unit,
    converter,
    units_for,
)

# (concept, unit as sent, value, body weight kg, expected value in the canonical unit)
CONVERSION_TABLE = [
    pytest.param("body-temperature", "Cel", 38.0, None, 38.0, id="temp-Cel"),
    pytest.param("body-temperature", "[degF]", 100.4, None, 38.0, id="temp-degF-100.4"),
    pytest.param("body-temperature", "[degF]", 32.0, None, 0.0, id="temp-degF-freezing"),
    pytest.param("body-temperature", "[degF]", 212.0, None, 100.0, id="temp-degF-boiling"),
    pytest.param("systolic-bp", "mm[Hg]", 90.0, None, 90.0, id="sbp-mmHg"),
    pytest.param("mean-arterial-pressure", "mm[Hg]", 65.0, None, 65.0, id="map-mmHg"),
    pytest.param("spo2", "%", 92.0, None, 92.0, id="spo2-percent"),
    pytest.param("spo2", "1", 0.92, None, 92.0, id="spo2-fraction"),
    pytest.param("fio2", "1", 0.4, None, 40.0, id="fio2-fraction"),
    pytest.param("oxygen-flow", "L/min", 6.0, None, 6.0, id="flow-L/min"),
    pytest.param("oxygen-flow", "mL/min", 6100.0, None, 6.1, id="flow-mL/min"),
    pytest.param("body-weight", "kg", 70.0, None, 70.0, id="weight-kg"),
    pytest.param("body-weight", "g", 3500.0, None, 3.5, id="weight-g"),
    pytest.param("body-weight", "[lb_av]", 100.0, None, 45.359237, id="weight-lb"),
    pytest.param("ice-score", "{score}", 7.0, None, 7.0, id="ice-score"),
    pytest.param("capd-score", "{score}", 9.0, None, 9.0, id="capd-score"),
    pytest.param("crp", "mg/dL", 5.0, None, 5.0, id="crp-mg/dL"),
    pytest.param("crp", "mg/L", 50.0, None, 5.0, id="crp-mg/L-50"),
    pytest.param("ferritin", "ng/mL", 650.0, None, 650.0, id="ferritin-ng/mL"),
    pytest.param("ferritin", "ug/L", 650.0, None, 650.0, id="ferritin-ug/L"),
    pytest.param("il6", "pg/mL", 40.0, None, 40.0, id="il6-pg/mL"),
    pytest.param("il6", "ng/L", 40.0, None, 40.0, id="il6-ng/L"),
    pytest.param("mcp1", "ng/L", 1343.5, None, 1343.5, id="mcp1-ng/L"),
    pytest.param("bm-blasts", "%", 5.0, None, 5.0, id="bm-blasts-percent"),
    pytest.param("ldh", "U/L", 250.0, None, 250.0, id="ldh-U/L"),
    pytest.param("ldh", "[IU]/L", 250.0, None, 250.0, id="ldh-IU/L"),
    pytest.param("ast", "[IU]/L", 40.0, None, 40.0, id="ast-IU/L"),
    pytest.param("alt", "U/L", 40.0, None, 40.0, id="alt-U/L"),
    pytest.param("creatinine", "mg/dL", 1.0, None, 1.0, id="creat-mg/dL"),
    pytest.param("creatinine", "umol/L", 88.4, None, 1.0, id="creat-umol/L-88.4"),
    pytest.param("creatinine", "umol/L", 176.8, None, 2.0, id="creat-umol/L-176.8"),
    pytest.param("platelets", "10*9/L", 150.0, None, 150.0, id="plt-10*9/L"),
    pytest.param("platelets", "10*3/uL", 150.0, None, 150.0, id="plt-10*3/uL"),
    pytest.param("platelets", "/uL", 150000.0, None, 150.0, id="plt-/uL-150000"),
    pytest.param("anc", "10*3/uL", 1.2, None, 1.2, id="anc-10*3/uL"),
    pytest.param("anc", "/uL", 1200.0, None, 1.2, id="anc-/uL"),
    pytest.param("hemoglobin", "g/dL", 9.0, None, 9.0, id="hb-g/dL"),
    pytest.param("hemoglobin", "g/L", 90.0, None, 9.0, id="hb-g/L"),
    pytest.param("norepinephrine", "ug/min", 20.0, None, 20.0, id="ne-ug/min"),
    pytest.param("norepinephrine", "ug/kg/min", 0.1, 80.0, 8.0, id="ne-ug/kg/min-weight-80"),
    pytest.param("norepinephrine", "mg/h", 1.2, None, 20.0, id="ne-mg/h"),
    pytest.param("norepinephrine", "ug/h", 600.0, None, 10.0, id="ne-ug/h"),
    pytest.param("epinephrine", "ug/kg/min", 0.05, 100.0, 5.0, id="epi-ug/kg/min"),
    pytest.param("phenylephrine", "ug/min", 200.0, None, 200.0, id="phe-ug/min"),
    pytest.param("dopamine", "ug/kg/min", 10.0, None, 10.0, id="dopa-ug/kg/min"),
    pytest.param("dopamine", "ug/min", 800.0, 80.0, 10.0, id="dopa-ug/min-weight-80"),
    pytest.param("vasopressin", "U/min", 0.03, None, 0.03, id="vaso-U/min"),
    pytest.param("vasopressin", "[iU]/min", 0.03, None, 0.03, id="vaso-iU/min"),
    pytest.param("vasopressin", "[USP'U]/min", 0.04, None, 0.04, id="vaso-USP-U/min"),
    pytest.param("vasopressin", "U/h", 2.4, None, 0.04, id="vaso-U/h-2.4"),
    pytest.param("vasopressin", "[iU]/h", 1.8, None, 0.03, id="vaso-iU/h"),
    pytest.param("vasopressin", "[USP'U]/h", 1.8, None, 0.03, id="vaso-USP-U/h"),
]


@pytest.mark.parametrize(("concept", "unit", "value", "weight", "expected"), CONVERSION_TABLE)
def test_conversion(concept: str, unit: str, value: float, weight: float | None, expected: float) -> None:
    assert converter(concept, unit)(value, weight) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_every_listed_conversion_is_in_the_table() -> None:
    # Concepts share conversion tables (all counts, all enzymes ...): each (table, unit) once.
    def key(concept: str, unit: str) -> tuple[int, str]:
        return id(CONVERSIONS[concept]), unit

    tested = {key(p.values[0], p.values[1]) for p in CONVERSION_TABLE}
    untested = [(c, u) for c, table in CONVERSIONS.items() for u in table if key(c, u) not in tested]
    assert untested == [], "add a row to CONVERSION_TABLE for each new conversion"


@pytest.mark.parametrize(
    ("concept", "expected"),
    [
        pytest.param("body-temperature", "Cel", id="temperature"),
        pytest.param("crp", "mg/dL", id="crp-mg/dL-for-m-EASIX"),
        pytest.param("creatinine", "mg/dL", id="creatinine"),
        pytest.param("platelets", "10*9/L", id="platelets"),
        pytest.param("norepinephrine", "ug/min", id="norepinephrine"),
        pytest.param("dopamine", "ug/kg/min", id="dopamine"),
        pytest.param("vasopressin", "U/min", id="vasopressin"),
        pytest.param("oxygen-flow", "L/min", id="oxygen-flow"),
    ],
)
def test_canonical_unit(concept: str, expected: str) -> None:
    assert canonical_unit(concept) == expected
    assert expected in units_for(concept)


def test_creatinine_factor() -> None:
    assert CREATININE_UMOL_L_PER_MG_DL == 88.4


@pytest.mark.parametrize(
    ("concept", "unit", "accepted"),
    [
        pytest.param("body-temperature", "K", ["Cel", "[degF]"], id="temp-kelvin"),
        pytest.param("body-temperature", "cel", ["Cel"], id="temp-case-sensitive"),
        pytest.param("crp", "mg/mL", ["mg/dL", "mg/L"], id="crp-mg/mL"),
        pytest.param("creatinine", "mmol/L", ["mg/dL", "umol/L"], id="creat-mmol/L"),
        pytest.param("platelets", "10*6/L", ["10*9/L", "10*3/uL", "/uL"], id="plt-10*6/L"),
        pytest.param("vasopressin", "U", ["U/min", "[iU]/min"], id="vaso-no-time"),
        pytest.param("oxygen-flow", "%", ["L/min", "mL/min"], id="flow-percent"),
    ],
)
def test_unknown_unit_names_the_accepted_units(concept: str, unit: str, accepted: list[str]) -> None:
    with pytest.raises(UnitError) as err:
        converter(concept, unit)
    message = str(err.value)
    assert repr(unit) in message
    assert concept in message
    for u in accepted:
        assert u in message


def test_concept_without_quantity_raises() -> None:
    with pytest.raises(UnitError, match="carries no quantity"):
        converter("seizure", "{score}")


@pytest.mark.parametrize(
    ("concept", "unit"),
    [
        pytest.param("norepinephrine", "ug/kg/min", id="ne-ug/kg/min"),
        pytest.param("epinephrine", "ug/kg/min", id="epi-ug/kg/min"),
        pytest.param("phenylephrine", "ug/kg/min", id="phe-ug/kg/min"),
        pytest.param("dopamine", "ug/min", id="dopa-ug/min"),
    ],
)
def test_weight_dependent_conversion_without_weight_raises(concept: str, unit: str) -> None:
    convert = converter(concept, unit)  # the unit itself is accepted ...
    with pytest.raises(UnitError, match="body weight"):
        convert(1.0, None)  # ... but cannot be converted without a weight
