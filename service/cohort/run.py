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
from .export import ExportError, SplitResult, export_files, split_file
from .grade import PartitionResult, grade_partition
from .report import render_report

COURSE_COLUMNS = (
    "patient",
    "method",
    "max_grade",
    "max_grade_at_least",
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
DAILY_COLUMNS = ("patient", "method", "day", "max_grade")
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


def _partitions(files: list[Path], workers: int, partition_mb: float) -> int:
    size = sum(p.stat().st_size * (GZIP_RATIO if p.name.endswith(".gz") else 1) for p in files)
    return max(workers, math.ceil(size / (partition_mb * 2**20)))


def for_workers(settings: Settings) -> Settings:
    """The settings grading reads, without what a worker has no business holding (the database
    URL, EHR credentials, keys): they travel to the cluster's workers."""
    return settings.model_copy(
        update={
            "database_url": "sqlite://",
            "ehr_servers": {},
            "auth_jwks": None,
            "auth_cds_clients": {},
            "app_client_id": None,
            "app_issuer": None,
            "app_fhir_base": None,
            "app_jwks_url": None,
        }
    )


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


class _Parquet:
    """A Parquet file written a partition at a time (the driver never holds the whole table)."""

    def __init__(self, path: Path, columns: tuple[str, ...]) -> None:
        self.path, self.columns = path, columns
        self.writer: Any = None

    def write(self, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not rows:
            return
        table = pa.Table.from_pylist(rows).select(list(self.columns))
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema)
        else:
            table = table.cast(self.writer.schema)
        self.writer.write_table(table)

    def close(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.writer is None:  # no rows: an empty table with the columns
            pq.write_table(pa.table({n: pa.array([], pa.string()) for n in self.columns}), self.path)
        else:
            self.writer.close()


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
    """Grade every patient of the export in `folder` into `out` (see the module docstring).
    ExportError when the export cannot be graded (no files, a file that cannot be read, data
    the workers could not find); nothing is written to `out` then."""
    started = time.monotonic()
    folder, out = folder.resolve(), out.resolve()  # the same paths on every worker
    files, other = export_files(folder)
    if not files:
        raise ExportError(f"no NDJSON files (Type.ndjson or Type.ndjson.gz) in {folder}")
    out.mkdir(parents=True, exist_ok=True)
    work = out / ".work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        with _client(workers, scheduler) as client:
            n_workers = max(1, len(client.scheduler_info()["workers"]))
            partitions = _partitions(files, n_workers, partition_mb)
            tasks = client.map(split_file, files, range(len(files)), work=work, partitions=partitions, pure=False)
            split: list[SplitResult] = client.gather(tasks)
            known = frozenset().union(*(s.patients for s in split))
            warnings = [
                {"patient": None, "where": name, "reason": "not an NDJSON file of the export: skipped"}
                for name in other
            ]
            for s in split:
                warnings += [{"patient": None, "where": w.where, "reason": w.reason} for w in s.warnings]
                if s.unnamed:
                    warnings.append(
                        {"patient": None, "where": s.file, "reason": f"{s.unnamed} more bad lines, skipped"}
                    )
                for rtype, n in sorted(s.not_read.items()):
                    reason = f"{n} {rtype}: a type grading does not read"
                    warnings.append({"patient": None, "where": s.file, "reason": reason})
            job = _Job(client, work, out, partitions, for_workers(settings), now, at, known)
            summary = job.run(warnings, progress)
            peaks = [p for p in client.run(_peak_rss_mib).values() if p is not None]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    peak = max(peaks, default=None)
    return CohortSummary(summary[0], summary[1], summary[2], partitions, time.monotonic() - started, out, peak)


@dataclass
class _Job:
    client: Any
    work: Path
    out: Path
    partitions: int
    settings: Settings
    now: datetime
    at: datetime | None
    known: frozenset[str]

    def run(self, warnings: list[dict[str, Any]], progress: bool | None) -> tuple[int, int, int]:
        """Pass 2: grade the partitions; the outputs are written under temporary names and
        renamed once every partition is graded (a failed job leaves no half output)."""
        from dask.distributed import as_completed

        client = self.client
        (known_f,) = client.scatter([self.known], broadcast=True)  # one object (a bare set would scatter its items)
        futures = [
            client.submit(grade_partition, self.work, k, self.settings, self.at, self.now, known_f, pure=False)
            for k in range(self.partitions)
        ]
        part = self.work / "out"
        part.mkdir()
        bar = _Progress(len(self.known), sys.stderr.isatty() if progress is None else progress)
        courses: list[dict[str, Any]] = []
        registry: list[dict[str, Any]] = []
        seen: set[str] = set()
        patients = resources = 0
        daily, scores = (
            _Parquet(part / "daily.parquet", DAILY_COLUMNS),
            _Parquet(part / "scores.parquet", SCORE_COLUMNS),
        )
        with (part / "RiskAssessment.ndjson").open("wb") as ras, (part / "Provenance.ndjson").open("wb") as provs:
            for future in as_completed(futures):
                result: PartitionResult = future.result()
                future.release()
                ras.write(result.risk_assessments)
                provs.write(result.provenances)
                daily.write(result.daily)
                scores.write(result.scores)
                courses += result.courses
                registry += result.registry
                warnings += result.warnings
                seen |= result.seen
                patients += result.patients
                resources += result.resources
                bar.update(result)
        bar.close()
        daily.close()
        scores.close()
        lost = len(self.known - seen)
        if lost:  # every patient is graded or named: else the workers did not see the shards
            raise ExportError(
                f"{lost} patients' data were not found by the workers: with --scheduler, the export and --out must be "
                "on a file system every worker shares, at the same path"
            )
        courses.sort(key=lambda r: (r["patient"], r["method"]))
        registry.sort(key=lambda r: r["patient"])
        _write_csv(part / "courses.csv", COURSE_COLUMNS, courses)
        courses_parquet = _Parquet(part / "courses.parquet", COURSE_COLUMNS)
        courses_parquet.write(courses)
        courses_parquet.close()
        _write_csv(part / "registry.csv", REGISTRY_COLUMNS, registry)
        _write_csv(part / "warnings.csv", WARNING_COLUMNS, warnings)
        (part / "report.html").write_text(render_report(courses, registry, warnings, patients, resources, self.now))
        for f in part.iterdir():
            f.replace(self.out / f.name)
        return patients, resources, len(warnings)
