"""Grading whole cohorts after the fact from a Bulk FHIR export (NDJSON), on one machine or a Dask
cluster: `iectox cohort grade DIR --out OUT`.

What lives here: reading the export and partitioning it by patient (export.py), grading one
partition with the same evaluation as `$evaluate` (grade.py), the Dask job, its progress and its
outputs (run.py), and the report page (report.py). What never does: HTTP or the database.
"""
