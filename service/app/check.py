"""`iectox codebook check`: mapping coverage of a site's FHIR data before go-live.

Given resources (from Bundles, NDJSON files or a folder of them), it reports
- every code the codebook does not map (Observation.code and component codes,
  MedicationAdministration medication -- its CodeableConcept or the contained / referenced
  Medication's code -- and Procedure.code), by resource type, with counts, most frequent first;
- every row that would be left out and why: the per-resource checks `$evaluate` and storage
  apply (service.fhir.ingest), grouped by reason, with counts and a few example paths.

Pure over parsed JSON (reading files is `read_path`); nothing is sent anywhere. The report names
codes, displays, reasons and counts only: no resource ids, no patient references, no values --
paths say `Observation[3].valueQuantity.code` (the 4th Observation read), dates are elided.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ..codebook import Codebook
from ..core.concepts import C
from ..fhir.errors import Issue
from ..fhir.ingest import STORABLE_TYPES, Entry, Normaliser, TooManyIssues, check_for_storage, codeable_text

READ_TYPES = ("Observation", "MedicationAdministration", "Procedure")
GROUPS = ("Observation", "Observation.component", "MedicationAdministration", "Procedure")
EXAMPLES = 3
_QUOTED_VALUE = re.compile(r"'[^']*'")  # every value a diagnostic quotes (dates, references, units)


@dataclass(frozen=True, slots=True)
class Code:
    system: str
    code: str
    display: str = field(default="", compare=False, hash=False)  # the first display seen is shown


@dataclass
class LeftOut:
    kind: str  # "rejected": left out of grading, named (422 when strict), not stored; "ignored": read, not used
    reason: str
    count: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass
class Report:
    files: int = 0
    resource_types: Counter[str] = field(default_factory=Counter)
    unmapped: dict[str, Counter[Code]] = field(default_factory=dict)
    left_out: dict[tuple[str, str], LeftOut] = field(default_factory=dict)
    not_read: Counter[str] = field(default_factory=Counter)  # resource types grading does not read
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (file, why)

    def to_json(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "resources": dict(sorted(self.resource_types.items())),
            "unmapped": {
                group: [
                    {"system": c.system, "code": c.code, "display": c.display, "count": n}
                    for c, n in _by_frequency(codes)
                ]
                for group, codes in self.groups()
            },
            "leftOut": [
                {"kind": x.kind, "reason": x.reason, "count": x.count, "examples": x.examples}
                for x in self.sorted_left_out()
            ],
            "notRead": dict(self.not_read.most_common()),
            "unreadable": [{"file": f, "reason": why} for f, why in self.unreadable],
        }

    def groups(self) -> list[tuple[str, Counter[Code]]]:
        return [(g, self.unmapped[g]) for g in GROUPS if self.unmapped.get(g)]

    def sorted_left_out(self) -> list[LeftOut]:
        return sorted(self.left_out.values(), key=lambda x: (x.kind != "rejected", -x.count, x.reason))

    def text(self) -> str:
        types = ", ".join(f"{t} {n}" for t, n in sorted(self.resource_types.items()))
        out = [f"{self.files} file(s), {sum(self.resource_types.values())} resource(s): {types or '-'}", ""]
        out.append("Codes the codebook does not map (a site overlay can add them, docs/codebook.md):")
        if not any(self.unmapped.values()):
            out.append("  none")
        for group, codes in self.groups():
            out.append(f"  {group}: {len(codes)} code(s), {sum(codes.values())} occurrence(s)")
            for c, n in _by_frequency(codes):
                out.append(f"    {n:6}  {c.system}|{c.code}" + (f"  {c.display}" if c.display else ""))
        out += ["", "Rows left out, and why:"]
        if not self.left_out:
            out.append("  none")
        for kind, title in (
            (
                "rejected",
                "left out by the per-resource checks ($evaluate names them, or 422 when strict; storage refuses them)",
            ),
            ("ignored", "ignored (read, not used for grading)"),
        ):
            rows = [x for x in self.sorted_left_out() if x.kind == kind]
            if rows:
                out.append(f"  {title}:")
            for x in rows:
                out.append(f"    {x.count:6}  {x.reason}")
                out.append(f"            e.g. {', '.join(x.examples)}")
        if self.not_read:
            out += ["", "Resource types grading does not read (left out as a whole):"]
            out.append("  " + ", ".join(f"{t} {n}" for t, n in self.not_read.most_common()))
        if self.unreadable:
            out += ["", "Files not read:"]
            out += [f"  {f}: {why}" for f, why in self.unreadable]
        return "\n".join(out) + "\n"


def _by_frequency(codes: Counter[Code]) -> list[tuple[Code, int]]:
    return sorted(codes.items(), key=lambda kv: (-kv[1], kv[0].system, kv[0].code))


# --- reading ---------------------------------------------------------------------------


def _resources_of(doc: Any) -> Iterator[dict[str, Any]]:
    if not isinstance(doc, dict):
        return
    if doc.get("resourceType") == "Bundle":
        for e in doc.get("entry") or ():
            res = e.get("resource") if isinstance(e, dict) else None
            if isinstance(res, dict):
                yield from _resources_of(res) if res.get("resourceType") == "Bundle" else (res,)
    else:
        yield doc


def read_path(path: Path, report: Report) -> list[tuple[dict[str, Any], str | None]]:
    """(resource, Bundle fullUrl) of every resource in a Bundle / NDJSON file or a folder of them;
    files that cannot be read are noted in the report."""
    files = sorted(p for p in path.rglob("*") if p.suffix in (".json", ".ndjson")) if path.is_dir() else [path]
    out: list[tuple[dict[str, Any], str | None]] = []
    for f in files:
        report.files += 1
        try:
            raw = f.read_bytes()
            docs = (
                [orjson.loads(line) for line in raw.splitlines() if line.strip()]
                if f.suffix == ".ndjson"
                else [orjson.loads(raw)]
            )
        except (OSError, orjson.JSONDecodeError) as exc:
            report.unreadable.append((str(f), type(exc).__name__ if isinstance(exc, OSError) else "malformed JSON"))
            continue
        for doc in docs:
            full_urls = {}
            if isinstance(doc, dict) and doc.get("resourceType") == "Bundle":
                for e in doc.get("entry") or ():
                    if isinstance(e, dict) and isinstance(e.get("resource"), dict):
                        full_urls[id(e["resource"])] = e.get("fullUrl")
            out += [(res, full_urls.get(id(res))) for res in _resources_of(doc)]
    return out


# --- checking ----------------------------------------------------------------------------


def _codings(cc: Any) -> list[Code]:
    if not isinstance(cc, dict):
        return []
    out = []
    for c in cc.get("coding") or ():
        if isinstance(c, dict):
            out.append(Code(str(c.get("system", "")), str(c.get("code", "")), str(c.get("display") or "")))
    if not out and isinstance(cc.get("text"), str):
        out.append(Code("", "", f"text only: {cc['text']}"))
    return out


def _maps(codebook: Codebook, cc: Any, *, text: bool) -> str | None:
    codings = [(c.system, c.code) for c in _codings(cc) if c.code]
    return codebook.concept_for(codings, codeable_text(cc) if text else None)


class _Checker:
    def __init__(self, codebook: Codebook, report: Report, medications: dict[str, dict[str, Any]]) -> None:
        self.cb, self.report, self.medications = codebook, report, medications
        self.ordinal: Counter[str] = Counter()

    def unmapped(self, group: str, codes: Iterable[Code]) -> None:
        self.report.unmapped.setdefault(group, Counter()).update(codes)

    def left_out(self, kind: str, reason: str, path: str) -> None:
        x = self.report.left_out.setdefault((kind, reason), LeftOut(kind, reason))
        x.count += 1
        if len(x.examples) < EXAMPLES:
            x.examples.append(path)

    def codes(self, rtype: str, en: Entry, norm: Normaliser) -> None:
        res = en.resource
        if rtype == "Observation":
            comps = [c for c in res.get("component") or () if isinstance(c, dict)]
            comp_read = [_maps(self.cb, c.get("code"), text=False) is not None for c in comps]
            if _maps(self.cb, res.get("code"), text=False) is None and not any(comp_read):
                self.unmapped("Observation", _codings(res.get("code")))
            for c, read in zip(comps, comp_read, strict=True):
                if not read:
                    self.unmapped("Observation.component", _codings(c.get("code")))
        elif rtype == "Procedure":
            if _maps(self.cb, res.get("code"), text=True) not in (C.CART_INFUSION, C.LYMPHODEPLETION):
                self.unmapped("Procedure", _codings(res.get("code")))
        elif rtype == "MedicationAdministration":
            self.medication(en, norm)

    def medication(self, en: Entry, norm: Normaliser) -> None:
        """Unmapped drug codes, resolved and mapped as grading does (contained, Bundle or absolute
        references; the Medication's code, then its ingredients)."""
        res = en.resource
        if "medicationCodeableConcept" in res:
            cc, ingredients = res["medicationCodeableConcept"], None
        else:
            ref = (res.get("medicationReference") or {}).get("reference")
            med = norm.resolve(en, ref) if isinstance(ref, str) else None
            if med is None:
                self.unmapped("MedicationAdministration", [Code("", "", "medicationReference not found in the input")])
                return
            cc, ingredients = med.get("code"), med.get("ingredient")
        if norm.concept_and_product(cc, ingredients)[0] is not None:
            return
        if cc is None:  # a Medication described by its ingredients only
            codes = [
                Code(c.system, c.code, f"{c.display} (ingredient; Medication has no code)".lstrip())
                for i in ingredients or ()
                if isinstance(i, dict)
                for c in _codings(i.get("itemCodeableConcept"))
            ]
            self.unmapped("MedicationAdministration", codes or [Code("", "", "Medication without code")])
        else:
            self.unmapped("MedicationAdministration", _codings(cc))

    def resource(self, res: dict[str, Any], full_url: str | None) -> None:
        rtype = str(res.get("resourceType"))
        self.report.resource_types[rtype] += 1
        path = f"{rtype}[{self.ordinal[rtype]}]"
        self.ordinal[rtype] += 1
        if rtype not in STORABLE_TYPES:
            self.report.not_read[rtype] += 1
            return
        en = Entry(res, path, full_url)
        norm = Normaliser(self.cb)
        norm.medications = self.medications
        if rtype in READ_TYPES:
            self.codes(rtype, en, norm)
        _, issues = check_for_storage(en, self.cb)
        if rtype in READ_TYPES:  # also when the subject is not `Patient/<id>` (urn:uuid in a Bundle)
            read = {"Observation": norm.observation, "MedicationAdministration": norm.administration}
            with suppress(TooManyIssues):  # the reader stops a resource after MAX_ISSUES problems
                read.get(rtype, norm.procedure)(en)
        seen: set[tuple[str, str | None]] = set()
        subject = (res.get("subject") or {}).get("reference")
        for issue in [*issues, *norm.r.issues]:
            key = (issue.diagnostics, issue.expression)
            if key not in seen:
                seen.add(key)
                reason = _reason(issue)
                if issue.expression == f"{path}.subject.reference" and str(subject).startswith("urn:"):
                    reason += ": a urn: subject is read by $evaluate within its Bundle, not stored"
                self.left_out("rejected", reason, issue.expression or path)
        for ig in norm.ignored:
            self.left_out("ignored", f"{ig.reason} ({ig.concept})", path)


def _reason(issue: Issue) -> str:
    """The issue's diagnostics without the data it quotes (dates, references)."""
    return _QUOTED_VALUE.sub("'…'", issue.diagnostics)


def check_resources(
    resources: Iterable[tuple[dict[str, Any], str | None]], codebook: Codebook, report: Report | None = None
) -> Report:
    """The coverage report of (resource, Bundle fullUrl) pairs against a codebook."""
    report = report or Report()
    items = [(r, u) for r, u in resources if isinstance(r, dict)]
    medications: dict[str, dict[str, Any]] = {}
    for res, full_url in items:
        if res.get("resourceType") == "Medication":
            if res.get("id"):
                medications[f"Medication/{res['id']}"] = res
            if full_url:
                medications[full_url] = res
    checker = _Checker(codebook, report, medications)
    for res, full_url in items:
        checker.resource(res, full_url)
    return report


def check_path(path: Path, codebook: Codebook) -> Report:
    report = Report()
    return check_resources(read_path(path, report), codebook, report)
