"""Benchmark: cohort grading from a Bulk FHIR export (service/cohort) on a local Dask cluster.

A synthetic cohort (every scenario in turn) is written as NDJSON, then graded with 1 and with 2
worker processes. Prints patients/s, resources/s, the wall time (cluster start included) and the
peak resident memory of the largest worker (VmHWM), with the machine's load average.

Run: .venv/bin/python bench/cohort.py [--patients N] [--days D]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from service.cohort.run import grade_cohort
from service.config.settings import Settings
from service.devtools.synth import generate_cohort, write_ndjson


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=48)
    parser.add_argument("--days", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        export = Path(tmp) / "export"
        cohort = generate_cohort(args.patients, 1, days=args.days)
        write_ndjson(cohort, export)
        resources = sum(len(p.bundle["entry"]) for p in cohort)
        size_mb = sum(f.stat().st_size for f in export.iterdir()) / 2**20
        print(f"export: {args.patients} patients, {resources} resources, {size_mb:.1f} MB NDJSON")
        print(f"{'workers':>7} {'seconds':>8} {'patients/s':>11} {'resources/s':>12} {'peak MiB (largest worker)':>26}")
        for workers in (1, 2):
            load = os.getloadavg()[0]
            s = grade_cohort(
                export, Path(tmp) / f"out{workers}", Settings(), datetime.now(UTC), workers=workers, progress=False
            )
            peak = f"{s.worker_peak_mib:.0f}" if s.worker_peak_mib else "-"
            print(
                f"{workers:>7} {s.seconds:>8.1f} {s.patients / s.seconds:>11.1f} {s.resources / s.seconds:>12,.0f} "
                f"{peak:>26}   (load average before: {load:.2f} on {os.cpu_count()} cores)"
            )


if __name__ == "__main__":
    main()
