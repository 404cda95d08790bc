"""Reading a Bulk FHIR export: a folder of NDJSON files, one or more per resource type
(`Observation.ndjson`, `Observation.2.ndjson`, ... optionally `.ndjson.gz`), every patient's
resources mixed. Pass 1 of a cohort job (one task per file) sorts each line into the shard of its
patient's partition, without holding the export in memory:

- a Patient goes to its own id's partition; a resource naming its patient (`subject` or
  `patient`: `Patient/<id>`, or an absolute URL ending so) to that patient's partition;
- a Medication is shared by every patient: it goes to the Medication shard every partition reads;
- a line that is not a JSON object with a resourceType, a resource of a type grading reads that
  names no patient, and each type grading does not read are named in the warnings (file and line,
  or a count per type), never dropped silently.

A shard line is `<patient id> TAB <file:line> TAB <the resource's JSON as read>`.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

# What grading reads (as service.ehr.sync reads a patient from an EHR), and the shared type.
PATIENT_TYPES = ("Patient", "Observation", "MedicationAdministration", "Condition", "Procedure")
SHARED = "Medication"
MAX_NAMED = 1000  # per file: bad lines named one by one; the rest counted
_FILE = re.compile(r"^([A-Z][A-Za-z]+)(?:\.[^/]*)?\.ndjson(?:\.gz)?$")
# Patient/<id>, an absolute URL ending so, or a version-specific reference (/_history/<v>): the
# resource goes to that patient, and the grading decides what it accepts (as `$evaluate` does).
_PATIENT_REF = re.compile(r"(?:^|/)Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$")
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
BOM = b"\xef\xbb\xbf"


class ExportError(ValueError):
    """The export cannot be graded as a whole (no files; a file that cannot be read)."""


def export_files(folder: Path) -> tuple[list[Path], list[str]]:
    """The export's NDJSON files, in name order, and every other entry of the folder (named in
    the warnings: a file not named `Type[.n].ndjson[.gz]`, a subfolder)."""
    found, other = [], []
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and _FILE.match(path.name):
            found.append(path)
        else:
            other.append(shown_name(path.name))
    return found, other


def shown_name(name: str) -> str:
    """A file name as the warnings show it (no control characters: a TAB or newline in a name
    cannot break a shard line or a CSV row)."""
    return _CONTROL.sub("?", name)


def open_lines(path: Path) -> IO[bytes]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]  # a GzipFile reads bytes
    return path.open("rb")


def partition_of(patient_id: str, partitions: int) -> int:
    """A stable partition for a patient (the same on every machine and run)."""
    return int.from_bytes(hashlib.blake2b(patient_id.encode(), digest_size=8).digest(), "big") % partitions


def patient_of(res: dict[str, Any]) -> str | None:
    """The id of the patient a resource is about (None: it names none)."""
    if res.get("resourceType") == "Patient":
        rid = res.get("id")
        return rid if isinstance(rid, str) and _FHIR_ID.fullmatch(rid) else None
    for key in ("subject", "patient"):
        holder = res.get(key)
        ref = holder.get("reference") if isinstance(holder, dict) else None
        m = _PATIENT_REF.search(ref) if isinstance(ref, str) else None
        if m:
            return m.group(1)
    return None


@dataclass
class Warning_:
    """One named problem of the export (file:line, or a file, and why)."""

    where: str
    reason: str


@dataclass
class SplitResult:
    """What pass 1 found in one file."""

    file: str
    lines: int = 0
    resources: int = 0
    patients: set[str] = field(default_factory=set)  # ids of the Patient resources in the file
    warnings: list[Warning_] = field(default_factory=list)
    not_read: Counter[str] = field(default_factory=Counter)  # resource types grading does not read
    unnamed: int = 0  # bad lines beyond MAX_NAMED (counted)


def _iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open_lines(path) as f:
        yield from enumerate(f, start=1)


def split_file(path: Path, index: int, work: Path, partitions: int) -> SplitResult:
    """Sort one export file's lines into `work/part-<k>/<index>.tsv` and `work/shared/<index>.tsv`.
    ExportError naming the file when it cannot be read whole (a corrupt gzip, an I/O error): the
    job stops rather than grade patients on part of their data."""
    name = shown_name(path.name)
    out = SplitResult(name)
    try:
        _split(path, name, index, work, partitions, out)
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise ExportError(f"{name} cannot be read ({type(exc).__name__}): fix or remove it and run again") from None
    return out


def _split(path: Path, name: str, index: int, work: Path, partitions: int, out: SplitResult) -> None:
    with ExitStack() as stack:
        shards: dict[int, IO[bytes]] = {}

        def shard(key: int | None) -> IO[bytes]:
            k = -1 if key is None else key
            if k not in shards:
                folder = work / ("shared" if key is None else f"part-{key}")
                folder.mkdir(parents=True, exist_ok=True)
                shards[k] = stack.enter_context((folder / f"{index:05d}.tsv").open("wb"))
            return shards[k]

        def bad(where: str, reason: str) -> None:
            if len(out.warnings) < MAX_NAMED:
                out.warnings.append(Warning_(where, reason))
            else:
                out.unnamed += 1

        for n, line in _iter_lines(path):
            out.lines += 1
            raw = line.strip()
            if n == 1 and raw.startswith(BOM):  # a byte order mark is not JSON
                raw = raw[len(BOM) :]
            if not raw:
                continue
            where = f"{name}:{n}"
            try:
                res = orjson.loads(raw)
            except orjson.JSONDecodeError:
                bad(where, "not JSON: the line is skipped")
                continue
            rtype = res.get("resourceType") if isinstance(res, dict) else None
            if not isinstance(rtype, str):
                bad(where, "not a FHIR resource (no resourceType): the line is skipped")
                continue
            out.resources += 1
            if rtype == SHARED:
                shard(None).write(b"\t".join((b"", where.encode(), raw)) + b"\n")
                continue
            if rtype not in PATIENT_TYPES:
                out.not_read[rtype] += 1
                continue
            pid = patient_of(res)
            if pid is None:
                what = (
                    "a Patient whose id is not a FHIR id" if rtype == "Patient" else f"a {rtype} that names no patient"
                )
                bad(where, f"{what}: not graded")
                continue
            if rtype == "Patient":
                out.patients.add(pid)
            shard(partition_of(pid, partitions)).write(b"\t".join((pid.encode(), where.encode(), raw)) + b"\n")


def read_shards(folder: Path) -> Iterator[tuple[str, str, bytes]]:
    """(patient id, file:line, raw JSON) of every line of a partition's (or the shared) shards."""
    if not folder.is_dir():
        return
    for shard in sorted(folder.glob("*.tsv")):
        with shard.open("rb") as f:
            for line in f:
                pid, where, raw = line.rstrip(b"\n").split(b"\t", 2)
                yield pid.decode(), where.decode(), raw
