"""Pure core: normalised, unit-tagged time series, rule tables and grading functions.

No FHIR, HTTP, database or clock in here: evaluation time `at` is always a parameter.
"""
