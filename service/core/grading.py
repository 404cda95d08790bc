"""Grading machinery shared by every scale: domains, their combination into one result, and
score bands.

A scale grades a window domain by domain (fever, hypotension, hypoxia, ICE, ...). A domain with
no data is unknown (grade None), never 0: an unknown domain that could still raise the grade
makes the result indeterminate (clinical-rules.md rule 3), and the result then states the
grade the data present already prove (`GradeResult.floor`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from .concepts import C
from .facts import FeverFacts
from .model import Administration, CrsFindings, DomainFinding, GradeResult, Ignored, PatientData, Sample

MAX_GRADE = 4  # grade 5 (death due to CRS/ICANS) needs attribution the data cannot give
IGNORED_SHOWN = 5  # ignored inputs named in a rationale; the rest are counted


def band(value: float, bands: tuple[tuple[int, int, int], ...]) -> int | None:
    """The grade of the (lowest, highest, grade) row that holds `value`; None outside every row."""
    for low, high, grade in bands:
        if low <= value <= high:
            return grade
    return None


def ignored_note(data: PatientData, concepts: frozenset[str]) -> list[str]:
    """What was left out of grading, for the rationale (statuses, missing values, ...)."""
    return ignored_items_note([i for i in data.ignored if i.concept in concepts])


def ignored_items_note(items: Sequence[Ignored]) -> list[str]:
    if not items:
        return []
    shown = ", ".join(f"{i.ref} ({i.concept}: {i.reason})" for i in items[:IGNORED_SHOWN])
    more = f" and {len(items) - IGNORED_SHOWN} more" if len(items) > IGNORED_SHOWN else ""
    return [f"Ignored: {shown}{more}."]


@dataclass
class Domain:
    """One domain's contribution: grade None = unknown (no data).

    `needs` names the missing inputs (codebook concepts) when unknown; `required` domains
    (CRS fever) are part of the basis of any grade they allow.
    """

    name: str
    grade: int | None
    why: str
    refs: tuple[str, ...] = ()
    needs: str = ""
    required: bool = False
    ceiling: int = MAX_GRADE  # the worst grade this domain could give if its data were there
    at_least: int = 0  # what an unknown domain already gives for sure (e.g. a pressor of unknown dose)
    # The finding alone, for the verdict sentence, when `why` goes on to the rule that fired
    # ("one vasopressor (...)" of "one vasopressor (...) -> grade 3"); None: `why` is the finding.
    finding: str | None = None

    @property
    def short(self) -> str:
        return self.why if self.finding is None else self.finding


def combine(
    method: str,
    scale: str,
    at: datetime,
    domains: list[Domain],
    head: str,
    notes: list[str],
    considered: list[str],
    crs: CrsFindings | None = None,
    *,
    brief: bool = False,
) -> GradeResult:
    """One result from the domains: the worst known grade, or indeterminate when an unknown
    domain could still raise it; the rationale is the verdict, `head`, each domain, `notes`.
    `brief`: the grade, floor, missing inputs and the CRS findings passed in only (no rationale, basis or
    considered inputs): what the course reads at each sample."""
    known = [d for d in domains if d.grade is not None]
    floor = max([d.grade for d in known if d.grade is not None] + [d.at_least for d in domains], default=0)
    # A domain without data matters only if it could still raise the grade.
    unknown = [d for d in domains if d.grade is None and d.ceiling > floor]
    if brief:
        missing = tuple(d.needs or d.name for d in unknown)
        if unknown:
            return GradeResult(method, scale, at, None, "", (), missing, floor=floor or None, crs=crs)
        return GradeResult(method, scale, at, floor, "", (), missing, crs=crs)
    deciding = [d for d in known if d.required or (d.grade == floor and floor > 0)] or known
    details = [head] + [f"{d.name}: {d.why.rstrip('.')}." for d in domains]
    if unknown:
        missing = tuple(d.needs or d.name for d in unknown)
        verdict = f"Indeterminate: no {' / '.join(missing)} in the window" + (
            f"; at least grade {floor} from the data present." if floor else "."
        )
        grade: int | None = None
        basis = tuple(r for d in known for r in d.refs)
    else:
        missing = ()
        grade = floor
        basis = tuple(r for d in deciding for r in d.refs)
        shown = [d for d in deciding if d.grade] or known[:2]
        why = "; ".join(d.short.rstrip(".") for d in shown)
        verdict = f"Grade {grade}: {why} (the worst domain decides)."
    lines = [verdict, *details]
    return GradeResult(
        method=method,
        scale=scale,
        at=at,
        grade=grade,
        rationale=" ".join(lines + notes),
        basis=tuple(dict.fromkeys(basis)),
        missing=missing,
        considered=tuple(dict.fromkeys(considered)),
        floor=floor if grade is None and floor else None,
        verdict=verdict,
        domains=tuple([DomainFinding(d.name, d.grade, d.refs, d.needs) for d in domains]),
        crs=crs,
    )


# --- CRS presence, the same on every CRS scale ----------------------------------------------

FEVER_GRADE = 1  # "Temperature >= 38 °C" is grade 1 on ASTCT and on every older CRS scale


@dataclass(frozen=True)
class FeverGate:
    """Whether CRS is present in the window (fever >= 38 °C, or, as ASTCT says, a CRS fever since
    day 0 masked by antipyretic/anti-cytokine therapy), for every CRS scale. `domain` is set when
    present; otherwise `grade` is 0 (no fever) or None (no temperature) with `why`."""

    domain: Domain | None
    grade: int | None
    why: str
    temps: tuple[Sample, ...]
    day0: Administration | None


def fever_gate(fever: FeverFacts) -> FeverGate:
    why, temps, day0 = fever.why, fever.temps, fever.day0
    if fever.present:
        assert fever.hottest is not None
        domain = Domain("fever", FEVER_GRADE, why, (fever.hottest.ref,), required=True)
        return FeverGate(domain, FEVER_GRADE, why, temps, day0)
    if fever.masked is not None:
        f, drug = fever.masked
        return FeverGate(Domain("fever", 0, why, (f.ref, drug.ref), required=True), 0, why, temps, day0)
    return FeverGate(None, 0 if fever.hottest is not None else None, why, temps, day0)


def crs_notes(gate: FeverGate) -> list[str]:
    notes = [] if gate.day0 else ["No CAR T infusion (day 0) found: masked fever looked for over all data."]
    notes.append("Attribution to another cause cannot be judged from data; graded as recorded.")
    return notes


def no_crs(
    method: str,
    scale: str,
    at: datetime,
    gate: FeverGate,
    head: str,
    notes: list[str],
    crs: CrsFindings | None = None,
    *,
    brief: bool = False,
) -> GradeResult:
    """Grade 0 (no fever) or indeterminate (no temperature): CRS is not established. `brief`: the
    grade, missing input and CRS findings only, as combine's brief result (the course)."""
    needs = "" if gate.grade == 0 else C.BODY_TEMPERATURE
    if brief:
        return GradeResult(method, scale, at, gate.grade, "", (), (needs,) if needs else (), crs=crs)
    refs = tuple(s.ref for s in gate.temps)
    verdict = f"{'Grade 0' if gate.grade == 0 else 'Indeterminate'}: {gate.why}"
    return GradeResult(
        method,
        scale,
        at,
        gate.grade,
        f"{verdict} {head} " + " ".join(notes),
        refs if gate.grade == 0 else (),
        (needs,) if needs else (),
        refs,
        verdict=verdict,
        domains=(DomainFinding("fever", gate.grade, refs, needs),),
        crs=crs,
    )
