"""`iectox cohort grade`: a Bulk FHIR export in, every patient graded on every scale, tables, FHIR
output and a report out, with Dask as the engine.

Pass 1 sorts the export's lines by patient into partition shards (one task per file); pass 2
grades each partition (one task per partition, on any worker). Memory on a worker is bounded by a
partition (`partition_mb` of NDJSON, about 80,000 resources by default), not by the cohort. The
driver writes the FHIR output as partitions finish and keeps only the tables' rows.

By default a local Dask cluster with one worker process per core (nothing to install or start);
`scheduler="tcp://host:8786"` runs the same job on an existing cluster, whose workers have iectox
installed and see the export and `OUT` at the same paths (a shared file system).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ..config.settings import Settings
from .export import SplitResult, export_files, split_file
from .grade import PartitionResult, grade_partition
from .report import render_report

COURSE_COLUMNS = (
    "patient",
    "method",
    "max_grade",
    "onset",
    "peak_at",
    "resolved_at",
    "duration_hours",
    "indeterminate_hours",
    "current_grade",
    "missing_now",
    "at",
    "day0",
    "sampled_from",
)
REGISTRY_COLUMNS = (
    "patient",
    "product",
    "indication",
    "infusion_date",
    "crs",
    "crs_onset",
    "crs_max_grade",
    "icans",
    "icans_onset",
    "icans_max_grade",
    "tocilizumab_first",
    "corticosteroids_first",
)
WARNING_COLUMNS = ("patient", "where", "reason")
SCORE_COLUMNS = (
    "patient",
    "method",
    "label",
    "at",
    "value",
    "indeterminate",
    "missing",
    "prediction",
    "probability",
    "citation",
)
GZIP_RATIO = 8  # a gzip NDJSON file holds about this many times its size


@dataclass(frozen=True)
class CohortSummary:
    patients: int
    resources: int
    warnings: int
    partitions: int
    seconds: float
    out: Path
    worker_peak_mib: float | None = None  # the largest worker's peak resident memory (Linux), when known


def _peak_rss_mib() -> float | None:
    """This process's peak resident memory (VmHWM), in MiB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


@contextmanager
def _client(workers: int | None, scheduler: str | None) -> Iterator[Any]:
    from dask.distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.WARNING)  # its INFO lines are not the job's output
    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    n = workers or os.cpu_count() or 1
    with (
        LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.WARNING
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def _partitions(files: list[tuple[Path, str]], workers: int, partition_mb: float) -> int:
    size = sum(p.stat().st_size * (GZIP_RATIO if p.name.endswith(".gz") else 1) for p, _ in files)
    return max(workers, math.ceil(size / (partition_mb * 2**20)))


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _write_parquet(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows) if rows else pa.table({n: pa.array([], pa.string()) for n in columns})
    pq.write_table(table.select(list(columns)), path)


class _Progress:
    """Patients done, resources per second and time left on a terminal; quiet without one."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        self.started = time.monotonic()
        self.resources = 0
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="patient", desc="grading", file=sys.stderr)

    def update(self, result: PartitionResult) -> None:
        self.resources += result.resources
        if self.bar is not None:
            rate = self.resources / max(time.monotonic() - self.started, 1e-9)
            self.bar.set_postfix_str(f"{rate:,.0f} resources/s")
            self.bar.update(result.patients)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def grade_cohort(
    folder: Path,
    out: Path,
    settings: Settings,
    now: datetime,
    *,
    at: datetime | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    partition_mb: float = 64.0,
    progress: bool | None = None,
) -> CohortSummary:
    started = time.monotonic()
    files = export_files(folder)
    if not files:
        raise ValueError(f"no NDJSON files (Type.ndjson or Type.ndjson.gz) in {folder}")
    out.mkdir(parents=True, exist_ok=True)
    work = out / ".work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        with _client(workers, scheduler) as client:
            n_workers = max(1, len(client.scheduler_info()["workers"]))
            partitions = _partitions(files, n_workers, partition_mb)
            split: list[SplitResult] = client.gather(
                client.map(split_file, [p for p, _ in files], work=work, partitions=partitions, pure=False)
            )
            known = frozenset().union(*(s.patients for s in split))
            warnings = [{"patient": w.patient, "where": w.where, "reason": w.reason} for s in split for w in s.warnings]
            for s in split:
                if s.unnamed:
                    warnings.append({"patient": None, "where": s.file, "reason": f"{s.unnamed} more bad lines"})
                for rtype, n in sorted(s.not_read.items()):
                    warnings.append(
                        {"patient": None, "where": s.file, "reason": f"{n} {rtype}: a type grading does not read"}
                    )
            summary = _grade(client, work, partitions, settings, now, at, known, out, warnings, progress)
            peaks = [p for p in client.run(_peak_rss_mib).values() if p is not None]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    peak = max(peaks, default=None)
    return CohortSummary(summary[0], summary[1], summary[2], partitions, time.monotonic() - started, out, peak)


def _grade(
    client: Any,
    work: Path,
    partitions: int,
    settings: Settings,
    now: datetime,
    at: datetime | None,
    known: frozenset[str],
    out: Path,
    warnings: list[dict[str, Any]],
    progress: bool | None,
) -> tuple[int, int, int]:
    from dask.distributed import as_completed

    (known_f,) = client.scatter([known], broadcast=True)  # one object (a bare set would scatter its items)
    futures = [
        client.submit(grade_partition, work, k, settings, at, now, known_f, pure=False) for k in range(partitions)
    ]
    bar = _Progress(len(known), sys.stderr.isatty() if progress is None else progress)
    courses: list[dict[str, Any]] = []
    daily: list[dict[str, Any]] = []
    scores: list[dict[str, Any]] = []
    registry: list[dict[str, Any]] = []
    patients = resources = 0
    with (out / "RiskAssessment.ndjson").open("wb") as ras, (out / "Provenance.ndjson").open("wb") as provs:
        for future in as_completed(futures):
            result: PartitionResult = future.result()
            future.release()
            ras.write(result.risk_assessments)
            provs.write(result.provenances)
            courses += result.courses
            daily += result.daily
            scores += result.scores
            registry += result.registry
            warnings += result.warnings
            patients += result.patients
            resources += result.resources
            bar.update(result)
    bar.close()
    courses.sort(key=lambda r: (r["patient"], r["method"]))
    daily.sort(key=lambda r: (r["patient"], r["method"], r["day"]))
    scores.sort(key=lambda r: (r["patient"], r["method"], r["at"] or ""))
    registry.sort(key=lambda r: r["patient"])
    _write_csv(out / "courses.csv", COURSE_COLUMNS, courses)
    _write_parquet(out / "courses.parquet", COURSE_COLUMNS, courses)
    _write_parquet(out / "daily.parquet", ("patient", "method", "day", "max_grade"), daily)
    _write_parquet(out / "scores.parquet", SCORE_COLUMNS, scores)
    _write_csv(out / "registry.csv", REGISTRY_COLUMNS, registry)
    _write_csv(out / "warnings.csv", WARNING_COLUMNS, warnings)
    (out / "report.html").write_text(render_report(courses, registry, warnings, patients, resources, now))
    return patients, resources, len(warnings)
