"""Pure core: normalised, unit-tagged time series, rule tables and grading functions.

What lives here: the input model (model.py), the concept registry, unit conversions, the
ASTCT and older scales' rule tables with their sources, the course and the risk scores.
What never does: FHIR, HTTP, a database, settings or a clock. The evaluation time `at` is
always a parameter. service.core imports nothing else from `service` (an import contract).
"""
