"""FHIR in: lean parsing of R4 JSON into the core's normalised, unit-tagged series.

This is the hot path of `$evaluate`, so resources are read as plain dicts (orjson) and only
the elements the rules need are checked, with the FHIRPath of every problem. fhir.resources
validation (~100-300 µs a resource) is kept for what the service emits.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_right
from calendar import monthrange
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from functools import lru_cache
from typing import Any, NamedTuple

import msgspec
import orjson

from ..codebook import Codebook, Coding
from ..core.concepts import C, Kind
from ..core.concepts import spec as concept_spec
from ..core.model import BIRTH_DATE, UNKNOWN_DRUG, Administration, Ignored, LeftOut, PatientData, Sample, fmt_time
from ..core.units import UnitError, canonical_unit, converter, ucum_code
from .errors import FhirError, Issue

UCUM = "http://unitsofmeasure.org"
# The default longest run of a drip event charted without an end (Settings.infusion_event_max_hours).
INFUSION_EVENT_MAX_HOURS = 4.0
MAX_ISSUES = 25

OBS_USED = frozenset({"final", "amended", "corrected"})
OBS_IGNORED = frozenset({"registered", "preliminary", "cancelled", "entered-in-error", "unknown"})
MED_USED = frozenset({"in-progress", "completed", "stopped"})
MED_IGNORED = frozenset({"not-done", "entered-in-error", "on-hold", "unknown"})
PROC_USED = frozenset({"completed", "in-progress"})
PROC_IGNORED = frozenset({"preparation", "not-done", "on-hold", "stopped", "entered-in-error", "unknown"})


@lru_cache(maxsize=512)
def is_resource_type(name: str) -> bool:
    """True for an R4 resource type name (Observation), false for data types or junk."""
    from fhir.resources.R4B import get_fhir_model_class
    from fhir.resources.R4B.resource import Resource

    try:
        return issubclass(get_fhir_model_class(name), Resource)
    except (KeyError, ValueError, AttributeError, ImportError):
        return False


def read_json(body: bytes) -> Any:
    """A request body as JSON: orjson, and what it refuses that the standard library reads (a
    byte order mark, UTF-16, NaN) as before; json.JSONDecodeError for what neither reads, or
    what storage could not keep (a lone surrogate, an integer beyond 64 bits)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = json.loads(body)
        try:
            orjson.dumps(doc)
        except TypeError as exc:
            raise json.JSONDecodeError(f"not storable as JSON: {exc}", "", 0) from None
        return doc


def load_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise FhirError.one(400, "structure", f"malformed JSON: {exc}", None) from exc


class CheckedObservation(NamedTuple):
    """An Observation as the storage check normalised it (check_for_storage's `checked`), with no
    issue and nothing ignored: exactly what a parse of the same resource, with the same codebook
    and site timezone, adds (tests/test_checked_once.py)."""

    samples: tuple[Sample, ...]
    placed: bool  # a time without a timezone read in the site timezone (named as assumed)
    unmapped: tuple[tuple[tuple[str, str], int], ...]  # (group, "system|code") the codebook does not map, counted


@dataclass(slots=True)
class Entry:
    resource: dict[str, Any]
    path: str  # FHIRPath of the resource, e.g. Bundle.entry[3].resource
    full_url: str | None = None
    # The Bundle entry's JSON when its resource was set aside (stream_entries): `resource` then
    # holds only resourceType, id and meta, and `loaded()` parses the rest.
    raw: Any = None
    # What the storage check made of this very Observation when it had no issue and ignored
    # nothing: the parse takes it instead of normalising the resource again.
    checked: CheckedObservation | None = None
    # resourceType and the reference, read once (the parse asks for them per rule); an Entry's
    # resource is not changed after the Entry is made.
    type: str = field(init=False)
    ref: str = field(init=False)

    def __post_init__(self) -> None:
        self.type = str(self.resource.get("resourceType"))
        rid = self.resource.get("id")
        self.ref = f"{self.type}/{rid}" if rid else (self.full_url or "")

    def set_aside(self, raw: Any) -> Entry:
        """This entry holding only what splitting reads of its resource, and `raw` to parse again."""
        kept: dict[str, Any] = {k: self.resource[k] for k in ("resourceType", "id", "meta") if k in self.resource}
        return Entry(kept, self.path, self.full_url, raw)

    def loaded(self) -> Entry:
        """This entry with its whole resource (parsed again when it was set aside)."""
        if self.raw is None:
            return self
        return Entry(orjson.loads(memoryview(self.raw))["resource"], self.path, self.full_url)


# The version order (version_key) as storage keeps it: 64-bit integers, so the upsert compares
# versions in SQL. A longer numeric versionId ties on the number and compares as a string.
MAX_VERSION_NUMBER = 2**63 - 1
NO_INSTANT = -(10**17)  # µs: before datetime.min, for an absent or unreadable meta.lastUpdated
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def version_key(res: dict[str, Any]) -> tuple[int, str, int]:
    """Orders versions of one resource: meta.versionId (numeric), then meta.lastUpdated as an instant."""
    meta = _obj(res.get("meta"))
    return version_key_of(str(meta.get("versionId") or ""), meta.get("lastUpdated"))


def version_key_of(version_id: str, last_updated: Any) -> tuple[int, str, int]:
    """(versionId as a number, -1 when not one; versionId; lastUpdated in µs since the epoch)."""
    numeric = version_id.isascii() and version_id.isdigit()
    # int() of a very long digit string is refused (and slow): past 19 digits it is past int64 anyway.
    number = (
        (min(int(version_id), MAX_VERSION_NUMBER) if len(version_id) <= 19 else MAX_VERSION_NUMBER) if numeric else -1
    )
    return (number, version_id, _instant_key(last_updated))


def _instant_key(raw: Any) -> int:
    """meta.lastUpdated in µs since the epoch, so offsets compare as instants; NO_INSTANT when
    absent or unreadable."""
    try:
        t = datetime.fromisoformat(str(raw))
        return (t - _EPOCH) // _MICROSECOND if t.tzinfo is not None else NO_INSTANT
    except (ValueError, OverflowError):
        return NO_INSTANT


def split_entries(doc: Any, *, max_entries: int, bundle_types: frozenset[str]) -> list[Entry]:
    """The resources of a Bundle (or one resource), newest version per id, structurally checked."""
    if not isinstance(doc, dict):
        raise FhirError.one(400, "structure", "expected a JSON object (a FHIR resource)")
    rtype = doc.get("resourceType")
    if rtype != "Bundle":
        return newest_versions([Entry(doc, str(rtype))])
    _check_bundle_type(doc.get("type"), bundle_types)
    raw = doc.get("entry") or []
    if not isinstance(raw, list):
        raise FhirError.one(400, "structure", "Bundle.entry must be an array", "Bundle.entry")
    _check_count(len(raw), max_entries)
    issues: list[Issue] = []
    entries = [en for i, e in enumerate(raw) if (en := _bundle_entry(i, e, issues)) is not None]
    if issues:
        raise FhirError(422, issues[:MAX_ISSUES])
    return newest_versions(entries)


def stream_entries(body: bytes, *, max_entries: int, bundle_types: frozenset[str]) -> list[Entry]:
    """`split_entries(load_json(body), ...)` without ever holding the whole parsed Bundle, for
    large bodies (peak memory; bench/memory.py). msgspec finds the entries without parsing them
    (slices of the body); orjson then reads everything else as one document (the body with its
    entry array emptied) and each entry on its own at the depth it has in the Bundle, so the same
    JSON is accepted, nested and read as by the whole parse. An Observation's resource is set
    aside and parsed again when graded (`Entry.loaded`). Anything but a Bundle of an accepted
    type with an entry array takes `split_entries` itself, so every error stays the same."""

    def whole() -> list[Entry]:
        return split_entries(load_json(body), max_entries=max_entries, bundle_types=bundle_types)

    try:
        top = msgspec.json.decode(body, type=dict[str, msgspec.Raw])
        entry = top.get("entry")
        if entry is None or (at := body.find(memoryview(entry))) < 0:
            return whole()
        head = orjson.loads(body[:at] + b"[]" + body[at + len(entry) :])
        raws = msgspec.json.decode(entry, type=list[msgspec.Raw])
    except (msgspec.MsgspecError, orjson.JSONDecodeError, RecursionError):
        return whole()
    if not isinstance(head, dict) or head.get("entry") != []:  # the bytes found were not the entry array
        return whole()
    btype = head.get("type")
    if not isinstance(btype, str) or btype not in bundle_types or head.get("resourceType") != "Bundle":
        return whole()
    issues: list[Issue] = []
    entries = []
    for i, raw in enumerate(raws):
        try:
            e = orjson.loads(b"[[" + bytes(raw) + b"]]")[0][0]  # read at its depth in the Bundle
        except orjson.JSONDecodeError:  # what msgspec passed and orjson does not (a number out of range)
            return whole()
        en = _bundle_entry(i, e, issues)
        if en is not None:
            entries.append(en.set_aside(raw) if en.type == "Observation" else en)
    _check_count(len(raws), max_entries)  # after the JSON of every entry, as the whole parse
    if issues:
        raise FhirError(422, issues[:MAX_ISSUES])
    return newest_versions(entries)


def _check_bundle_type(btype: Any, bundle_types: frozenset[str]) -> None:
    if not isinstance(btype, str) or btype not in bundle_types:
        raise FhirError.one(422, "value", f"Bundle.type must be one of {sorted(bundle_types)}", "Bundle.type")


def _check_count(n: int, max_entries: int) -> None:
    if n > max_entries:
        raise FhirError.one(413, "too-long", f"Bundle has {n} entries; the limit is {max_entries}", "Bundle.entry")


def _bundle_entry(i: int, e: Any, issues: list[Issue]) -> Entry | None:
    """Bundle.entry[i] as an Entry, or None with its issue."""
    res = e.get("resource") if isinstance(e, dict) else None
    if not isinstance(res, dict):
        issues.append(Issue("required", "entry has no resource", f"Bundle.entry[{i}].resource"))
        return None
    full_url = e.get("fullUrl")
    if full_url is not None and not isinstance(full_url, str):
        issues.append(Issue("structure", "fullUrl must be a string", f"Bundle.entry[{i}].fullUrl"))
        return None
    return Entry(res, f"Bundle.entry[{i}].resource", full_url)


def newest_versions(entries: list[Entry]) -> list[Entry]:
    """The entries' resources checked (resourceType, id), newest version per id."""
    issues: list[Issue] = []
    # The same id seen twice keeps the newest meta.versionId (else meta.lastUpdated).
    newest: dict[str, Entry] = {}
    out: list[Entry] = []
    for en in entries:
        rt = en.resource.get("resourceType")
        if not isinstance(rt, str) or not rt:
            issues.append(Issue("required", "resourceType is missing", f"{en.path}.resourceType"))
        elif not is_resource_type(rt):
            issues.append(Issue("not-supported", f"unknown resourceType {rt!r}", f"{en.path}.resourceType"))
        rid = en.resource.get("id")
        if rid is None:
            out.append(en)
        elif not (isinstance(rid, str) and rid and len(rid) <= 64):
            issues.append(Issue("value", "id must be a non-empty string of at most 64 characters", f"{en.path}.id"))
        else:
            old = newest.get(en.ref)  # "{type}/{id}"
            if old is None or version_key(en.resource) > version_key(old.resource):
                newest[en.ref] = en
    if issues:
        raise FhirError(422, issues[:MAX_ISSUES])
    out.extend(newest.values())
    return out


# --- element readers (each raises into the issue list with its path) ----------------


class TooManyIssues(Exception):
    pass


PARTIAL_DATE = re.compile(r"(\d{4})(?:-(\d{2}))?")
# Clinical instants outside these years are charting errors (year 0001, 9999 placeholders); they
# are left out, named, so that window arithmetic never leaves the calendar and no course spans
# millennia. Documented in docs/clinical-choices.md ("Dates").
FIRST_YEAR, LAST_YEAR = 1900, 2199


def year_out_of_range(t: datetime | date) -> str:
    """Why a time is outside the supported years, or ""."""
    if FIRST_YEAR <= t.year <= LAST_YEAR:
        return ""
    return f"year {t.year} is outside the supported range {FIRST_YEAR}-{LAST_YEAR} (a charting error)"


@dataclass
class _Reader:
    issues: list[Issue] = field(default_factory=list)
    site_tz: tzinfo | None = None  # places a dateTime that has a time but no timezone (site setting)
    placed: list[str] = field(default_factory=list)  # FHIRPaths placed by the site timezone

    def fail(self, code: str, msg: str, path: str) -> None:
        self.issues.append(Issue(code, msg, path))
        if len(self.issues) >= MAX_ISSUES:
            raise TooManyIssues

    def instant(self, raw: Any, path: str) -> datetime | None:
        if not isinstance(raw, str):
            self.fail("value", "expected a dateTime string", path)
            return None
        if PARTIAL_DATE.fullmatch(raw):
            self.fail("value", f"partial date {raw!r}: the rules need an instant (date, time and timezone)", path)
            return None
        try:
            t = datetime.fromisoformat(raw)
        except ValueError:
            self.fail("value", f"invalid dateTime {raw!r}", path)
            return None
        if bad := year_out_of_range(t):
            self.fail("value", f"dateTime {raw!r}: {bad}", path)
            return None
        if t.tzinfo is None:
            if "T" not in raw:
                self.fail("value", f"date-only {raw!r}: the rules need an instant (a time and a timezone)", path)
                return None
            if self.site_tz is None:
                self.fail(
                    "value",
                    f"dateTime {raw!r} has no timezone and no site timezone is set (IECTOX_SITE_TIMEZONE)",
                    path,
                )
                return None
            self.placed.append(path)
            return t.replace(tzinfo=self.site_tz)
        return t

    def when(self, res: dict[str, Any], path: str, prefix: str) -> tuple[datetime | None, datetime | None, bool]:
        """(start, end, found) from <prefix>DateTime / <prefix>Period / <prefix>Instant."""
        if f"{prefix}DateTime" in res:
            t = self.instant(res[f"{prefix}DateTime"], f"{path}.{prefix}DateTime")
            return t, t, True
        if f"{prefix}Instant" in res:
            t = self.instant(res[f"{prefix}Instant"], f"{path}.{prefix}Instant")
            return t, t, True
        period = res.get(f"{prefix}Period")
        if isinstance(period, dict):
            p = f"{path}.{prefix}Period"
            start = self.instant(period["start"], f"{p}.start") if "start" in period else None
            end = self.instant(period["end"], f"{p}.end") if "end" in period else None
            if start is None and "start" not in period:
                self.fail("required", "period needs a start", f"{p}.start")
            if start is not None and end is not None and end < start:
                self.fail("value", "period end is before its start", f"{p}.end")
            return start, end, True
        return None, None, False


def _obj(x: Any) -> dict[str, Any]:
    """A JSON object element, or {} when it is absent or of another JSON type."""
    return x if isinstance(x, dict) else {}


def _arr(x: Any) -> list[Any]:
    """A JSON array element, or [] when it is absent or of another JSON type."""
    return x if isinstance(x, list) else []


def _codings(cc: Any) -> list[Coding]:
    return [
        (c.get("system", ""), c.get("code", ""))
        for c in _arr(_obj(cc).get("coding"))
        if isinstance(c, dict) and isinstance(c.get("system", ""), str) and isinstance(c.get("code", ""), str)
    ]


def _coded_concept(cb: Codebook, cc: Any) -> str | None:
    """`cb.concept_for(_codings(cc), None)` without building the list: the parse's hot path."""
    coding = cc.get("coding") if isinstance(cc, dict) else None
    if isinstance(coding, list):
        by_coding = cb.by_coding
        for c in coding:
            if isinstance(c, dict):
                system, code = c.get("system", ""), c.get("code", "")
                if isinstance(system, str) and isinstance(code, str):
                    name = by_coding.get((system, code))
                    if name is not None:
                        return name
    return None


def codeable_text(cc: Any) -> str | None:
    if not isinstance(cc, dict):
        return None
    parts = [cc.get("text") or ""] + [c.get("display") or "" for c in _arr(cc.get("coding")) if isinstance(c, dict)]
    joined = " ".join(p for p in parts if isinstance(p, str) and p)
    return joined or None


def _is_absolute(ref: str) -> bool:
    return ref.startswith(("http://", "https://", "urn:"))


def _base_of(full_url: str | None) -> str | None:
    """The service base of an absolute RESTful fullUrl (https://x/fhir/Type/id -> https://x/fhir)."""
    if not full_url or not full_url.startswith(("http://", "https://")):
        return None
    parts = full_url.rstrip("/").rsplit("/", 2)
    return parts[0] if len(parts) == 3 else None


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _within(value: float, bounds: tuple[float | None, float | None]) -> bool:
    """`value` inside (low, high), None unbounded; NaN never is."""
    lo, hi = bounds
    return (lo is None or value >= lo) and (hi is None or value <= hi)


def _shown(raw: float, unit: str, value: float, canonical: str) -> str:
    """A quantity as sent, with its canonical value when the unit differs (for rationales)."""
    return f"{_fmt(raw)} {unit}" if unit == canonical else f"{_fmt(raw)} {unit} (= {_fmt(value)} {canonical})"


def implausible(concept: str, value: float) -> str:
    """Why a value (canonical unit) is physiologically impossible for the concept, or ""."""
    spec = concept_spec(concept)
    bounds = spec.plausible_range if spec is not None else None
    if bounds is None or _within(value, bounds):
        return ""
    lo, hi = bounds
    unit = spec.unit if spec is not None and spec.unit else ""
    shown = f"{'-' if lo is None else f'{lo:g}'} to {'-' if hi is None else f'{hi:g}'} {unit}".strip()
    return f"value {_fmt(value)} {unit} is outside the plausible range {shown} (a charting or unit error)"


@dataclass
class _RawDose:
    concept: str
    start: datetime
    end: datetime | None
    ref: str
    path: str
    rate: float | None = None
    rate_unit: str | None = None
    product: str | None = None
    status: str = ""
    open_end: bool = False  # charted with a start and no end (effectivePeriod.start, effectiveDateTime)
    shown: str | None = None  # the rate as sent, when it was converted at parse time (mL/h)


# A Medication.ingredient.strength numerator: UCUM code -> (factor, base) of the amount it is
# in; the base is the amount unit of the concept's canonical rate (ug for the catecholamines,
# U for vasopressin). Only these are read; any other is "concentration unknown".
_AMOUNT = {
    "ug": (1.0, "ug"),
    "mg": (1000.0, "ug"),
    "g": (1_000_000.0, "ug"),
    "U": (1.0, "U"),
    "[iU]": (1.0, "U"),
    "[IU]": (1.0, "U"),
    "[USP'U]": (1.0, "U"),
}
_VOLUME_ML = {"mL": 1.0, "L": 1000.0, "dL": 100.0}
VOLUME_RATE = "mL/h"
UNRESOLVED_MEDICATION = UNKNOWN_DRUG  # a medicationReference not resolved (left out, named)


Convert = Callable[[float, float | None], float]  # (value, body weight kg) -> canonical value


@lru_cache(maxsize=1024)
def _conversion(concept: str, unit: str) -> tuple[Convert, str, tuple[float | None, float | None]]:
    """(conversion of `unit` to the concept's canonical unit, canonical unit, plausible range);
    UnitError (not cached) when the unit is not accepted. Pure: computed once per process."""
    apply, canonical = converter(concept, unit), canonical_unit(concept)
    spec = concept_spec(concept)
    bounds = spec.plausible_range if spec is not None else None
    return apply, canonical, bounds or (None, None)


@lru_cache(maxsize=16)
def _hours(hours: float) -> timedelta:
    return timedelta(hours=hours)  # made once: the storage check makes a Normaliser per resource


class Normaliser:
    """Builds one patient's PatientData from checked entries; collects every issue."""

    def __init__(
        self,
        codebook: Codebook,
        site_tz: tzinfo | None = None,
        infusion_event_max_hours: float = INFUSION_EVENT_MAX_HOURS,
    ) -> None:
        self.cb = codebook
        self.max_open = _hours(infusion_event_max_hours)
        self.r = _Reader(site_tz=site_tz)
        self.samples: dict[str, list[Sample]] = {}
        self.added: list[str] = []  # concept of every sample added, in order (rollback journal)
        self.doses: list[_RawDose] = []
        self.ignored: list[Ignored] = []
        self.medications: dict[str, dict[str, Any]] = {}
        self.indications: list[tuple[str, str]] = []
        # (group, "system|code") of the codes the codebook does not map: not inputs, counted
        # (iectox codebook check lists the same) so a site sees what its overlay should map.
        self.unmapped: Counter[tuple[str, str]] = Counter()

    # Quantities -----------------------------------------------------------------
    def _quantity(self, concept: str, q: Any, path: str) -> tuple[float, str, str] | None:
        if not isinstance(q, dict):
            self.r.fail("structure", "expected a Quantity", path)
            return None
        value = q.get("value")
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.r.fail("required", "Quantity.value must be a number", f"{path}.value")
            return None
        system = q.get("system")
        if system is not None and system != UCUM:
            self.r.fail("value", f"Quantity.system must be UCUM ({UCUM}), not {system!r}", f"{path}.system")
            return None
        # The UCUM code; without one, the unit text is used only if it is itself an accepted code.
        unit = q.get("code") or q.get("unit")
        if not unit:
            self.r.fail("required", "Quantity has no unit (UCUM code expected)", f"{path}.code")
            return None
        try:
            apply, canonical, _ = _conversion(concept, unit)
        except UnitError as exc:
            self.r.fail("value", f"{exc}", f"{path}.code")
            return None
        v = apply(float(value), None)
        return v, unit, _shown(float(value), unit, v, canonical)

    def _not_mapped(self, group: str, *ccs: Any) -> None:
        codes = [f"{system}|{code}" for cc in ccs for system, code in _codings(cc)]
        self.unmapped.update((group, c) for c in codes or ["(no coding)"])

    def drop_samples_since(self, added: int) -> None:
        """Take back the samples added since the journal held `added` entries."""
        while len(self.added) > added:
            concept = self.added.pop()
            series = self.samples[concept]
            series.pop()
            if not series:
                del self.samples[concept]

    def add_checked(self, checked: CheckedObservation, path: str) -> None:
        """What normalising the Observation at `path` again would add (its caller names it as
        assumed when `checked.placed`, as for any resource read in the site timezone)."""
        for s in checked.samples:
            self._add(s)
        if checked.unmapped:
            self.unmapped.update(dict(checked.unmapped))
        if checked.placed:
            self.r.placed.append(path)

    def _add(self, s: Sample) -> None:
        self.samples.setdefault(s.concept, []).append(s)
        self.added.append(s.concept)  # the journal a left-out resource is rolled back by

    def _usable(self, en: Entry, status: Any, used: frozenset[str], ignored: frozenset[str], concept: str) -> bool:
        """Whether a status counts; an ignored status is noted, an unknown one is a 422."""
        if status in used:
            return True
        if status in ignored:
            self.ignored.append(Ignored(en.ref, f"status {status}", concept))
        else:
            self.r.fail("value", f"unknown {en.type}.status {status!r}", f"{en.path}.status")
        return False

    # Observation ----------------------------------------------------------------
    def observation(self, en: Entry) -> None:
        if en.checked is not None:  # normalised by the storage check: the same outcome
            self.add_checked(en.checked, en.path)
            return
        res, path, r = en.resource, en.path, self.r
        status = res.get("status")
        if status is None:
            r.fail("required", "Observation.status is required", f"{path}.status")
            return
        concept = _coded_concept(self.cb, res.get("code"))
        if concept is not None and status in OBS_USED and "component" not in res and self._quick(en, concept):
            return
        components = _arr(res.get("component"))
        comp_concepts = [_coded_concept(self.cb, c.get("code")) if isinstance(c, dict) else None for c in components]
        if concept is None and not any(comp_concepts):
            if not isinstance(res.get("code"), dict):
                r.fail("required", "Observation.code is required", f"{path}.code")
            else:  # a code the codebook does not map: not an input to grading
                self._not_mapped("Observation", res["code"])
            return
        if not self._usable(en, status, OBS_USED, OBS_IGNORED, concept or next(c for c in comp_concepts if c)):
            return
        start, _, found = r.when(res, path, "effective")
        if not found:
            r.fail("required", "Observation needs effectiveDateTime, effectivePeriod or effectiveInstant", path)
            return
        if start is None:
            return
        if concept is not None and not self._quick_value(concept, res, start, en.ref):
            self._value(concept, res, path, start, en.ref)
        for i, (comp, cconcept) in enumerate(zip(components, comp_concepts, strict=False)):
            if not isinstance(comp, dict):
                r.fail("structure", "a component must be an object", f"{path}.component[{i}]")
            elif cconcept is not None and not self._quick_value(cconcept, comp, start, en.ref):
                issues, added = len(r.issues), len(self.added)
                self._value(cconcept, comp, f"{path}.component[{i}]", start, en.ref)
                if len(r.issues) > issues:  # a component left out takes nothing of it along
                    self.drop_samples_since(added)

    def _quick(self, en: Entry, concept: str) -> bool:
        """The common Observation in one step: a used status (the caller checks), an
        effectiveDateTime with time and timezone, one value `_quick_value` takes, no components.
        False: the general path, which names every problem."""
        res = en.resource
        raw_t = res.get("effectiveDateTime")
        if type(raw_t) is not str or "T" not in raw_t:
            return False
        try:
            t = datetime.fromisoformat(raw_t)
        except ValueError:
            return False
        if t.tzinfo is None or year_out_of_range(t):
            return False
        return self._quick_value(concept, res, t, en.ref)

    def _quick_value(self, concept: str, holder: dict[str, Any], t: datetime, ref: str) -> bool:
        """`_value` in one step for the common value: a valueQuantity (UCUM, an accepted unit, a
        plausible value, no referenceRange) or a valueCodeableConcept the codebook maps. The
        Sample is the one `_value` makes (tests/test_ingest_quick.py compares both); False:
        anything else, for `_value`."""
        kind = self.cb.concepts[concept].kind
        if "valueQuantity" not in holder:  # present but null is not absent: `_value` names it
            if kind is not Kind.CODED or "valueCodeableConcept" not in holder:
                return False
            value = self.cb.value_for(concept, _codings(holder["valueCodeableConcept"]))
            if value is None:
                return False
            self._add(Sample(concept, t, ref, code=value, shown=value))
            return True
        q = holder["valueQuantity"]
        if kind is not Kind.QUANTITY or type(q) is not dict or "referenceRange" in holder:
            return False
        number, unit = q.get("value"), q.get("code") or q.get("unit")
        if isinstance(number, bool) or not isinstance(number, int | float) or type(unit) is not str:
            return False
        if q.get("system", UCUM) != UCUM:
            return False
        try:
            apply, canonical, bounds = _conversion(concept, unit)
            raw = float(number)
            v = apply(raw, None)
        except (UnitError, OverflowError):
            return False
        if not _within(v, bounds):
            return False  # implausible: the general path leaves it out, named
        self._add(Sample(concept, t, ref, value=v, unit=unit, shown=_shown(raw, unit, v, canonical)))
        return True

    def _value(self, concept: str, holder: dict[str, Any], path: str, t: datetime, ref: str) -> None:
        kind = self.cb.concepts[concept].kind
        if "valueQuantity" in holder:
            if kind in (Kind.CODED, Kind.DRUG, Kind.VASOPRESSOR, Kind.EVENT):
                self.r.fail("value", f"{concept} expects a coded value", f"{path}.valueQuantity")
                return
            raw = holder["valueQuantity"]
            if kind == Kind.SCORE and isinstance(raw, dict) and not (raw.get("code") or raw.get("unit")):
                raw = {**raw, "code": "{score}"}  # a score sent as a bare number: a score has no unit
            q = self._quantity(concept, raw, f"{path}.valueQuantity")
            if q is not None:
                v, unit, shown = q
                high = self._reference_high(concept, holder.get("referenceRange"), path)
                self._add(Sample(concept, t, ref, value=v, unit=unit, shown=shown, ref_high=high))
        elif "valueInteger" in holder and kind == Kind.SCORE:
            v = holder["valueInteger"]
            if isinstance(v, bool) or not isinstance(v, int):
                self.r.fail("value", "valueInteger must be an integer", f"{path}.valueInteger")
                return
            self._add(Sample(concept, t, ref, value=float(v), unit="{score}", shown=f"{v}"))
        elif "valueCodeableConcept" in holder and kind == Kind.CODED:
            value = self.cb.value_for(concept, _codings(holder["valueCodeableConcept"]))
            if value is None:
                self.r.fail(
                    "value",
                    f"code not in the codebook values for {concept}",
                    f"{path}.valueCodeableConcept",
                )
                return
            self._add(Sample(concept, t, ref, code=value, shown=value))
        elif "dataAbsentReason" in holder or not any(k.startswith("value") for k in holder):
            self.ignored.append(Ignored(ref, "no value", concept))
        else:
            self.r.fail("value", f"value type not usable for {concept} ({kind})", path)
            return
        if kind in (Kind.SCORE, Kind.QUANTITY):
            self._check_plausible(concept, path)

    def _reference_high(self, concept: str, ranges: Any, path: str) -> float | None:
        """The upper limit of normal: the first referenceRange with a `high`, in the concept's unit."""
        if not isinstance(ranges, list):
            return None
        for i, rr in enumerate(ranges):
            if isinstance(rr, dict) and "high" in rr:
                q = self._quantity(concept, rr["high"], f"{path}.referenceRange[{i}].high")
                return q[0] if q is not None else None
        return None

    def _check_plausible(self, concept: str, path: str) -> None:
        """The value just added against the registry: a score's valid range (ICE 0-10, CAPD 0-32,
        CARTOX-10 0-10), a quantity's plausibility bounds (core/concepts.py); outside, it is removed."""
        spec = concept_spec(concept)
        series = self.samples.get(concept)
        if spec is None or not series or series[-1].value is None:
            return
        v = series[-1].value
        if spec.score_range is not None:
            lo, hi = spec.score_range
            if not (lo <= v <= hi and v == int(v)):
                series.pop()
                self.added.pop()
                self.r.fail("value", f"{concept} must be an integer {lo}-{hi}", path)
            return
        bad = implausible(concept, v)
        if bad:
            series.pop()
            self.added.pop()
            self.r.fail("value", f"{concept} {bad}", f"{path}.valueQuantity.value")

    # MedicationAdministration / Procedure ---------------------------------------------
    def resolve(self, en: Entry, ref: str) -> dict[str, Any] | None:
        """The Medication a medicationReference names: contained (#id), a Bundle entry by its
        reference or fullUrl (relative, absolute, urn:uuid), or an absolute reference on the base
        of the administration's own fullUrl."""
        res = en.resource
        if ref.startswith("#"):
            return next(
                (c for c in _arr(res.get("contained")) if isinstance(c, dict) and f"#{c.get('id')}" == ref),
                None,
            )
        med = self.medications.get(ref)
        if med is not None:
            return med
        base = _base_of(en.full_url)
        if base is not None:
            if ref.startswith(base + "/"):
                return self.medications.get(ref[len(base) + 1 :])
            if not _is_absolute(ref):
                return self.medications.get(f"{base}/{ref}")
        return None

    def _medication(self, en: Entry) -> tuple[str | None, str | None, dict[str, Any] | None]:
        """(concept, product, Medication) of a MedicationAdministration's medication[x]."""
        res, path = en.resource, en.path
        if "medicationCodeableConcept" in res:
            concept, product = self.concept_and_product(res["medicationCodeableConcept"])
            return concept, product, None
        ref = _obj(res.get("medicationReference")).get("reference")
        if not isinstance(ref, str):
            self.r.fail("required", "medication[x] is required", f"{path}.medication[x]")
            return None, None, None
        med = self.resolve(en, ref)
        if med is None:
            # Never silent: the drug is unknown, so the administration cannot be graded.
            self.ignored.append(
                Ignored(
                    en.ref,
                    f"medicationReference {ref!r} not resolved (not contained, not in the Bundle or the fetch): "
                    "administration left out",
                    UNRESOLVED_MEDICATION,
                )
            )
            return None, None, None
        concept, product = self.concept_and_product(med.get("code"), med.get("ingredient"))
        return concept, product, med

    def concept_and_product(self, cc: Any, ingredients: Any = None) -> tuple[str | None, str | None]:
        """Codings first (the product's or its ingredients'), then text, as a last resort."""
        items = [i.get("itemCodeableConcept") for i in _arr(ingredients) if isinstance(i, dict)]
        ccs = [cc, *items]
        codings = [c for x in ccs for c in _codings(x)]
        concept = self.cb.concept_for(codings, None)
        text = codeable_text(cc)
        if concept is None:
            for x in ccs:
                concept = self.cb.concept_for([], codeable_text(x))
                if concept is not None:
                    text = codeable_text(x)
                    break
        product = self.cb.value_for(concept, codings, text) if concept == C.CART_INFUSION else None
        return concept, product

    def _concentration(self, med: dict[str, Any] | None, concept: str) -> tuple[float, str, str] | None:
        """(amount per mL in the base unit, base unit, as sent) from Medication.ingredient.strength:
        the ingredient of `concept` (or the only ingredient with a strength); None when unknown."""
        if med is None:
            return None
        found = []
        for ing in _arr(med.get("ingredient")):
            if not isinstance(ing, dict) or not isinstance(ing.get("strength"), dict):
                continue
            item = ing.get("itemCodeableConcept")
            mine = item is not None and self.cb.concept_for(_codings(item), codeable_text(item)) == concept
            found.append((mine, ing["strength"]))
        chosen = [st for mine, st in found if mine] or ([found[0][1]] if len(found) == 1 else [])
        if not chosen:
            return None
        num, den = chosen[0].get("numerator") or {}, chosen[0].get("denominator") or {}
        n_val, d_val = num.get("value"), den.get("value", 1)
        n_unit = ucum_code(str(num.get("code") or num.get("unit") or ""))
        d_unit = ucum_code(str(den.get("code") or den.get("unit") or ""))
        if (
            not isinstance(n_val, int | float)
            or not isinstance(d_val, int | float)
            or isinstance(n_val, bool)
            or d_val <= 0
            or n_unit not in _AMOUNT
            or d_unit not in _VOLUME_ML
        ):
            return None
        factor, base = _AMOUNT[n_unit]
        per_ml = float(n_val) * factor / (float(d_val) * _VOLUME_ML[d_unit])
        d_shown = "" if d_val == 1 else f"{_fmt(float(d_val))} "
        return per_ml, base, f"{_fmt(float(n_val))} {n_unit}/{d_shown}{d_unit}"

    def _rate(self, dosage: dict[str, Any], path: str) -> tuple[float, str, str] | bool | None:
        """(value, unit, path) of dosage.rateQuantity or dosage.rateRatio; None if absent, False if bad."""
        r = self.r
        if "rateQuantity" in dosage:
            p, q = f"{path}.dosage.rateQuantity", dosage["rateQuantity"]
            value = q.get("value") if isinstance(q, dict) else None
            if isinstance(value, bool) or not isinstance(value, int | float):
                r.fail("required", "rateQuantity.value must be a number", f"{p}.value")
                return False
            unit = q.get("code") or q.get("unit")
            if not unit:
                r.fail("required", "rateQuantity has no unit", f"{p}.code")
                return False
            return float(value), str(unit), p
        if "rateRatio" in dosage:
            # A rate as a Ratio (5 ug / 1 min): read like rateQuantity, numerator per denominator.
            p, ratio = f"{path}.dosage.rateRatio", dosage["rateRatio"]
            num = ratio.get("numerator") if isinstance(ratio, dict) else None
            den = ratio.get("denominator") if isinstance(ratio, dict) else None
            if not isinstance(num, dict) or not isinstance(den, dict):
                r.fail("required", "rateRatio needs a numerator and a denominator", p)
                return False
            n_val, d_val = num.get("value"), den.get("value", 1)
            n_unit = num.get("code") or num.get("unit")
            d_unit = den.get("code") or den.get("unit")
            if isinstance(n_val, bool) or not isinstance(n_val, int | float):
                r.fail("required", "rateRatio.numerator.value must be a number", f"{p}.numerator.value")
                return False
            if isinstance(d_val, bool) or not isinstance(d_val, int | float) or d_val <= 0:
                r.fail("value", "rateRatio.denominator.value must be a positive number", f"{p}.denominator.value")
                return False
            if not n_unit or not d_unit:
                r.fail("required", "rateRatio needs units on numerator and denominator", f"{p}.numerator.code")
                return False
            n_unit, d_unit = ucum_code(str(n_unit)), ucum_code(str(d_unit))
            # "1 min" and "1 h" as the denominator unit: the ratio is then numerator-unit/min or /h.
            if d_unit in ("min", "h"):
                return float(n_val) / float(d_val), f"{n_unit}/{d_unit}", p
            r.fail("value", f"rateRatio denominator unit {d_unit!r} is not a time (min or h)", f"{p}.denominator.code")
            return False
        return None

    def administration(self, en: Entry) -> None:
        res, path, r = en.resource, en.path, self.r
        status = res.get("status")
        if status is None:
            r.fail("required", "MedicationAdministration.status is required", f"{path}.status")
            return
        concept, product, med = self._medication(en)
        if concept is None:
            if med is not None:
                items = [i.get("itemCodeableConcept") for i in _arr(med.get("ingredient")) if isinstance(i, dict)]
                self._not_mapped("MedicationAdministration", med.get("code"), *items)
            elif "medicationCodeableConcept" in res:
                self._not_mapped("MedicationAdministration", res["medicationCodeableConcept"])
            return
        if not self._usable(en, status, MED_USED, MED_IGNORED, concept):
            return
        start, end, found = r.when(res, path, "effective")
        if not found:
            r.fail("required", "effective[x] is required", f"{path}.effective[x]")
            return
        if start is None:
            return
        kind = self.cb.concepts[concept].kind
        open_end = False
        point = end is None or "effectiveDateTime" in res or "effectiveInstant" in res
        if kind == Kind.VASOPRESSOR and status != "stopped" and point:
            # A drip charted as events (start, rate changes; a stop is status stopped or rate 0):
            # assembled into an episode in finish(). A point in time is an event too.
            open_end, end = True, None
        elif status in ("stopped", "completed") and end is None:
            # Finished, with no recorded end: counts at its start only, never as still running.
            end = start
            self.ignored.append(Ignored(en.ref, f"{status} without an end: counted at its start only", concept))
        dose = _RawDose(concept, start, end, en.ref, path, product=product, status=str(status), open_end=open_end)
        dosage = res.get("dosage") or {}
        rate = self._rate(dosage, path) if kind == Kind.VASOPRESSOR and isinstance(dosage, dict) else None
        if rate is False:
            return
        if isinstance(rate, tuple):
            value, unit, p = rate
            if ucum_code(unit) == VOLUME_RATE:
                conc = self._concentration(med, concept)
                if conc is None:
                    # The drug is running; how much of it is unknown without the bag's concentration.
                    self.ignored.append(
                        Ignored(en.ref, f"rate {_fmt(value)} {unit} without a concentration: rate unknown", concept)
                    )
                    self.doses.append(dose)
                    return
                per_ml, base, conc_shown = conc
                dose.rate, dose.rate_unit = value * per_ml / 60, f"{base}/min"
                dose.shown = f"{_fmt(value)} {unit} of {conc_shown}"
                try:
                    converter(concept, dose.rate_unit)
                except UnitError as exc:
                    r.fail("value", f"{exc} (from {dose.shown})", f"{p}.code")
                    return
            else:
                try:
                    converter(concept, unit)
                except UnitError as exc:
                    r.fail("value", str(exc), f"{p}.code")
                    return
                dose.rate, dose.rate_unit = value, unit
        self.doses.append(dose)

    def procedure(self, en: Entry) -> None:
        res, path, r = en.resource, en.path, self.r
        concept, product = self.concept_and_product(res.get("code"))
        if concept not in (C.CART_INFUSION, C.LYMPHODEPLETION):
            self._not_mapped("Procedure", res.get("code"))
            return
        if not self._usable(en, res.get("status"), PROC_USED, PROC_IGNORED, concept):
            return
        start, end, found = r.when(res, path, "performed")
        if not found:
            r.fail("required", "performed[x] is required to place the procedure in time", f"{path}.performed[x]")
        elif start is not None:
            end = end if end is not None else start
            self.doses.append(_RawDose(concept, start, end, en.ref, path, product=product))

    def condition(self, en: Entry) -> None:
        """A diagnosis the codebook maps to an indication (product baseline, disease burden)."""
        res = en.resource
        value = self.cb.value_for(C.INDICATION, _codings(res.get("code")), codeable_text(res.get("code")))
        if value is None:
            return
        verification = {c for _, c in _codings(res.get("verificationStatus"))}
        if verification & {"refuted", "entered-in-error"}:
            self.ignored.append(Ignored(en.ref, f"verificationStatus {'/'.join(sorted(verification))}", C.INDICATION))
            return
        self.indications.append((value, en.ref))

    # Assembly -------------------------------------------------------------------------
    def _episodes(self) -> None:
        """Close the events of drips charted as events (docs/clinical-choices.md, "Infusions
        charted as events"): an event without an end runs until the next event of the same drug
        (a rate change, a stop or a new start), at most `max_open` after its start; the last
        in-progress event is still running. Consecutive events form one episode."""
        by_concept: dict[str, list[_RawDose]] = {}
        for d in self.doses:
            by_concept.setdefault(d.concept, []).append(d)
        cap = self.max_open
        for doses in by_concept.values():
            doses.sort(key=lambda d: d.start)
            for i, d in enumerate(doses):
                if not d.open_end:
                    continue
                nxt = next((x.start for x in doses[i + 1 :] if x.start > d.start), None)
                limit = d.start + cap
                if nxt is not None and nxt <= limit:
                    d.end = nxt
                    why = f"until the next {d.concept} event at {fmt_time(nxt)}"
                elif nxt is None and d.status == "in-progress":
                    # In progress, nothing charted since: still running, like an open period. Not
                    # capped: ending a running drip early could only lower the grade.
                    continue
                else:
                    d.end = limit
                    why = f"for at most {cap.total_seconds() / 3600:g} h (IECTOX_INFUSION_EVENT_MAX_HOURS)"
                note = f"{d.status} event without an end: taken as running from {fmt_time(d.start)} {why}"
                self.ignored.append(Ignored(d.ref, note, d.concept))

    def finish(self, patient_ref: str, birth: date | None) -> PatientData:
        for series in self.samples.values():
            series.sort(key=lambda s: s.t)
        self._episodes()
        weights = self.samples.get(C.BODY_WEIGHT, [])
        weight_times = [w.t for w in weights]
        admins: dict[str, list[Administration]] = {}
        for d in self.doses:
            rate = None
            shown = ""
            if d.rate is not None and d.rate_unit is not None:
                shown = d.shown or f"{_fmt(d.rate)} {d.rate_unit}"
                weight = None
                if weights:  # latest weight at or before the dose, else the first one
                    i = bisect_right(weight_times, d.start)
                    weight = weights[max(i - 1, 0)].value
                try:
                    rate = converter(d.concept, d.rate_unit)(d.rate, weight)
                except UnitError:
                    self.ignored.append(Ignored(d.ref, "rate not normalised: no body weight", d.concept))
            admins.setdefault(d.concept, []).append(
                Administration(d.concept, d.start, d.end, d.ref, rate=rate, shown=shown, product=d.product)
            )
        for adm in admins.values():
            adm.sort(key=lambda a: a.start)
        return PatientData(patient_ref, birth, self.samples, admins, self.ignored, self.indications)


@dataclass
class Parsed:
    patient: Entry
    data: PatientData
    entries: list[Entry]
    unmapped: Counter[tuple[str, str]] = field(default_factory=Counter)  # (group, "system|code") -> count


def _subject_ok(res: dict[str, Any], patient_refs: set[str], path: str, r: _Reader, elem: str = "subject") -> bool:
    if elem in res and not isinstance(res[elem], dict):
        r.fail("structure", f"{elem} must be a Reference (a JSON object)", f"{path}.{elem}")
        return False
    ref = _obj(res.get(elem)).get("reference")
    if ref is None:
        r.fail("required", f"{elem} must reference the patient", f"{path}.{elem}")
        return False
    if ref not in patient_refs:
        r.fail("value", f"{elem} {ref!r} is not the Patient of this request", f"{path}.{elem}.reference")
        return False
    return True


def parse_birth_date(raw: Any) -> tuple[date, date | None] | None:
    """A birthDate as (first possible day, last possible day or None when exact): FHIR allows
    "1980", "1980-05" and "1980-05-17"; None when it is none of these."""
    if not isinstance(raw, str):
        return None
    m = PARTIAL_DATE.fullmatch(raw)
    try:
        if m is None:
            return date.fromisoformat(raw), None
        year = int(m.group(1))
        if m.group(2) is None:
            return date(year, 1, 1), date(year, 12, 31)
        month = int(m.group(2))
        return date(year, month, 1), date(year, month, monthrange(year, month)[1])
    except ValueError:
        return None


def _entry_concept(norm: Normaliser, en: Entry) -> str | None:
    """The concept a resource would feed, read without checks (to name a left-out resource)."""
    res = en.resource
    if en.type == "Observation":
        comps = [c for c in _arr(res.get("component")) if isinstance(c, dict)]
        found = [_coded_concept(norm.cb, x.get("code")) for x in (res, *comps)]
        return next((c for c in found if c), None)
    if en.type == "MedicationAdministration":
        cc = res.get("medicationCodeableConcept")
        if cc is None:
            ref = _obj(res.get("medicationReference")).get("reference")
            med = norm.medications.get(ref) if isinstance(ref, str) else None
            if med is None and isinstance(ref, str) and ref.startswith("#"):
                med = next((c for c in _arr(res.get("contained")) if _obj(c).get("id") == ref[1:]), None)
            cc = med.get("code") if isinstance(med, dict) else None
        return norm.cb.concept_for(_codings(cc), codeable_text(cc))
    if en.type in ("Procedure", "Condition"):
        return norm.cb.concept_for(_codings(res.get("code")), codeable_text(res.get("code")))
    return None


def _entry_time(res: dict[str, Any], site_tz: tzinfo | None) -> datetime | None:
    """The time of a resource when it is readable as an instant, else None (any window)."""
    for prefix in ("effective", "performed"):
        period = _obj(res.get(f"{prefix}Period"))
        for raw in (res.get(f"{prefix}DateTime"), res.get(f"{prefix}Instant"), period.get("start")):
            if isinstance(raw, str) and "T" in raw:
                try:
                    t = datetime.fromisoformat(raw)
                except ValueError:
                    continue
                if t.tzinfo is None and site_tz is not None:
                    t = t.replace(tzinfo=site_tz)
                if t.tzinfo is not None:
                    return t
    return None


class _Mark:
    """The Normaliser's output sizes before one resource, to take back what it added."""

    __slots__ = ("added", "doses", "ignored", "indications", "issues", "placed")

    def __init__(self, norm: Normaliser) -> None:
        self.issues, self.placed, self.doses = len(norm.r.issues), len(norm.r.placed), len(norm.doses)
        self.ignored, self.indications = len(norm.ignored), len(norm.indications)
        self.added = len(norm.added)  # samples are rolled back through the Normaliser's journal (O(1) to mark)

    def rollback(self, norm: Normaliser) -> None:
        del norm.r.issues[self.issues :], norm.r.placed[self.placed :], norm.doses[self.doses :]
        del norm.ignored[self.ignored :], norm.indications[self.indications :]
        norm.drop_samples_since(self.added)


def _component_parts(norm: Normaliser, en: Entry, issues: list[Issue], site_tz: tzinfo | None) -> list[LeftOut]:
    """One LeftOut per unusable component when every issue of the Observation is inside a
    component (its other values are kept); [] when any issue concerns the resource itself."""
    prefix = f"{en.path}.component["
    by_index: dict[int, list[tuple[str, str]]] = {}
    for issue in issues:
        expr = issue.expression or ""
        if not expr.startswith(prefix):
            return []
        index = int(expr[len(prefix) : expr.index("]", len(prefix))])
        by_index.setdefault(index, []).append((expr, issue.diagnostics))
    components = _arr(en.resource.get("component"))
    t = _entry_time(en.resource, site_tz)
    out = []
    for index, problems in sorted(by_index.items()):
        comp = components[index]
        concept = _coded_concept(norm.cb, comp.get("code")) if isinstance(comp, dict) else None
        # A component that cannot be read at all could have been any value of the panel: take the
        # panel's own concept, so a grade it could change becomes indeterminate.
        concept = concept or _entry_concept(norm, en)
        reason = "; ".join(d for _, d in problems)
        out.append(LeftOut(en.ref, f"{prefix}{index}]", reason, concept, t, tuple(problems)))
    return out


def _implausible_rates(data: PatientData, entries: list[Entry], r: _Reader) -> list[LeftOut]:
    """Administrations whose normalised rate is outside the concept's plausibility bounds (core/concepts.py)."""
    paths = {en.ref: en.path for en in entries if en.type == "MedicationAdministration"}  # a fullUrl may repeat
    out: list[LeftOut] = []
    for concept, admins in data.administrations.items():
        keep = []
        for a in admins:
            bad = implausible(concept, a.rate) if a.rate is not None else ""
            if not bad:
                keep.append(a)
                continue
            path = f"{paths.get(a.ref, a.ref)}.dosage.rateQuantity.value"
            r.issues.append(Issue("value", f"{concept} rate {bad}", path))
            out.append(LeftOut(a.ref, path, f"{concept} rate {bad}", concept, a.start, ((path, f"rate {bad}"),)))
        admins[:] = keep
    return out


def _unresolved_medications(
    norm: Normaliser, entries: list[Entry], r: _Reader, site_tz: tzinfo | None
) -> list[LeftOut]:
    """Administrations whose medicationReference could not be resolved: the drug is unknown, so
    they are left out (a 422 when strict) and could hide a vasopressor or a masking drug."""
    unresolved = [i for i in norm.ignored if i.concept == UNRESOLVED_MEDICATION]
    if not unresolved:
        return []
    norm.ignored = [i for i in norm.ignored if i.concept != UNRESOLVED_MEDICATION]
    by_ref = {en.ref: en for en in entries if en.type == "MedicationAdministration"}  # a fullUrl may repeat
    out = []
    for item in unresolved:
        en = by_ref.get(item.ref)
        path = f"{en.path if en else item.ref}.medicationReference.reference"
        r.issues.append(Issue("not-found", item.reason, path))
        t = _entry_time(en.resource, site_tz) if en else None
        out.append(LeftOut(item.ref, path, item.reason, UNRESOLVED_MEDICATION, t, ((path, item.reason),)))
    return out


def parse_patient_entries(
    entries: list[Entry],
    codebook: Codebook,
    *,
    strict: bool = True,
    site_tz: tzinfo | None = None,
    infusion_event_max_hours: float = INFUSION_EVENT_MAX_HOURS,
) -> Parsed:
    """Normalise one patient's entries.

    Structural problems (no or several Patients, a resource whose subject is not the patient)
    are a 422 in both modes. A resource the rules cannot use (bad date, unknown unit, implausible
    value, ...) is a 422 with every problem and its FHIRPath when `strict`; otherwise it is left
    out and named (PatientData.left_out), never silently dropped.
    """
    patients = [e for e in entries if e.type == "Patient"]
    if len(patients) != 1:
        raise FhirError.one(
            422,
            "required" if not patients else "not-supported",
            f"expected exactly one Patient, found {len(patients)}",
            "Bundle.entry.resource.ofType(Patient)",
        )
    patient = patients[0]
    pres = patient.resource
    refs = {patient.ref, f"Patient/{pres.get('id')}"} | ({patient.full_url} if patient.full_url else set())
    norm = Normaliser(codebook, site_tz, infusion_event_max_hours)
    r = norm.r
    birth: date | None = None
    birth_latest: date | None = None
    left_out: list[LeftOut] = []
    assumed: list[Ignored] = []
    if "birthDate" in pres:
        parsed_birth = parse_birth_date(pres["birthDate"])
        if parsed_birth is not None:
            birth, birth_latest = parsed_birth
        else:
            path, why = f"{patient.path}.birthDate", "birthDate must be YYYY, YYYY-MM or YYYY-MM-DD to compute age"
            r.issues.append(Issue("value", why, path))
            left_out.append(LeftOut(patient.ref, path, why, BIRTH_DATE, None, ((path, why),)))
    for en in entries:
        if en.type == "Medication":
            norm.medications[en.ref] = en.resource
            if en.full_url:
                norm.medications[en.full_url] = en.resource
    structural: list[Issue] = []
    handlers = {
        "Observation": norm.observation,
        "MedicationAdministration": norm.administration,
        "Procedure": norm.procedure,
        "Condition": norm.condition,
    }
    for en in entries:
        handle = handlers.get(en.type)
        if handle is None:
            continue
        if en.checked is not None and en.ref and _subject_ref(en.resource) in refs:
            # What the general path does for a checked entry, without its bookkeeping (no issue)
            norm.add_checked(en.checked, en.path)
            if en.checked.placed:
                assumed.append(Ignored(en.ref, placed_note(site_tz), _entry_concept(norm, en) or en.type))
            continue
        en = en.loaded()
        mark = _Mark(norm)
        try:
            subject = en.resource.get("subject")
            if not (isinstance(subject, dict) and subject.get("reference") in refs):
                check = r if strict else _Reader()  # strict: one list, in entry order
                if not _subject_ok(en.resource, refs, en.path, check):
                    structural += [] if strict else check.issues
                    continue
            if en.ref:
                handle(en)
            else:  # a basis must reference its input
                r.fail(
                    "required", "the resource has neither an id nor a fullUrl: it cannot be referenced", f"{en.path}.id"
                )
        except TooManyIssues:
            if strict:
                break
        except MALFORMED as exc:
            r.issues.append(malformed(en, exc))
        new, placed = r.issues[mark.issues :], r.placed[mark.placed :]
        parts = None if strict or not new else _component_parts(norm, en, new, site_tz)
        if parts:
            # Only components are unusable (one bad value of a panel): they alone are left out.
            left_out += parts
            del r.issues[mark.issues :]
        elif new:
            problems = tuple((i.expression or en.path, i.diagnostics) for i in new)
            concept, t = _entry_concept(norm, en), _entry_time(en.resource, site_tz)
            reason = "; ".join(d for _, d in problems)
            left_out.append(LeftOut(en.ref, problems[0][0], reason, concept, t, problems))
            if not strict:
                mark.rollback(norm)
                del r.issues[mark.issues :]
        elif placed:
            assumed.append(Ignored(en.ref, placed_note(site_tz), _entry_concept(norm, en) or en.type))
    if structural:
        raise FhirError(422, structural[:MAX_ISSUES])
    left_out += _unresolved_medications(norm, entries, r, site_tz)
    data = norm.finish(patient.ref, birth)
    left_out += _implausible_rates(data, entries, r)
    if strict and r.issues:
        raise FhirError(422, r.issues[:MAX_ISSUES])
    data.birth_latest, data.left_out, data.assumed = birth_latest, left_out, assumed
    return Parsed(patient, data, entries, norm.unmapped)


def placed_note(site_tz: tzinfo | None) -> str:
    return f"time without a timezone read in the site timezone {site_tz} (site setting)"


def _subject_ref(res: dict[str, Any]) -> str | None:
    subject = res.get("subject")
    ref = subject.get("reference") if isinstance(subject, dict) else None
    return ref if isinstance(ref, str) else None


# An element of an unexpected JSON type that the readers did not foresee: the resource is left
# out (or a 4xx when strict / when stored), named with its path, never a 500.
MALFORMED = (AttributeError, TypeError, ValueError, KeyError, IndexError, OverflowError)


def malformed(en: Entry, exc: Exception) -> Issue:
    return Issue("structure", f"{en.type} has an element of an unexpected JSON type ({type(exc).__name__})", en.path)


FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
CLINICAL_TYPES = ("Observation", "MedicationAdministration", "Procedure", "Condition")
STORABLE_TYPES = frozenset({"Patient", "Medication", *CLINICAL_TYPES})


def check_for_storage(
    en: Entry,
    codebook: Codebook,
    site_tz: tzinfo | None = None,
    body: bytes | None = None,
    checked: list[CheckedObservation] | None = None,
) -> tuple[str | None, list[Issue]]:
    """(patient id, problems) for one resource about to be stored: the checks grading relies on
    (a dateTime without a timezone passes when the site timezone `site_tz` places it). `body`:
    the resource as JSON when the caller has it (else it is made here, to check JSON holds it).
    `checked`: gets what normalising an Observation gave when it had no issue and ignored nothing
    (Entry.checked: what a parse of the same resource adds, with the same codebook and timezone)."""
    norm = Normaliser(codebook, site_tz)
    r = norm.r
    res, path, rtype = en.resource, en.path, en.type
    patient_id: str | None = None
    try:
        rid = res.get("id")
        if not (isinstance(rid, str) and FHIR_ID.fullmatch(rid)):
            r.fail("value", "id must match [A-Za-z0-9.-]{1,64} (FHIR id)", f"{path}.id")
        for issue in meta_issues(res.get("meta"), path):
            r.fail(issue.code, issue.diagnostics, str(issue.expression))
        if body is None:
            try:
                orjson.dumps(res)
            except TypeError:  # an integer beyond 64 bits (a parser other than orjson let it through)
                r.fail("value", "a number is beyond what storage keeps (64-bit integers)", path)
        if rtype not in STORABLE_TYPES:
            r.fail("not-supported", f"this server stores {', '.join(sorted(STORABLE_TYPES))}, not {rtype}", path)
        elif rtype == "Patient":
            patient_id = res.get("id")
            if "birthDate" in res and parse_birth_date(res["birthDate"]) is None:
                r.fail("value", "birthDate must be YYYY, YYYY-MM or YYYY-MM-DD", f"{path}.birthDate")
        elif rtype in CLINICAL_TYPES:
            ref = _obj(res.get("subject")).get("reference")
            if not (isinstance(ref, str) and ref.startswith("Patient/") and FHIR_ID.fullmatch(ref[len("Patient/") :])):
                r.fail("required", "subject must reference a Patient (Patient/<id>)", f"{path}.subject.reference")
            else:
                patient_id = ref.split("/", 1)[1]
                if rtype == "Observation":
                    norm.observation(en)
                    if checked is not None and not (r.issues or norm.ignored):
                        found = tuple(s for series in norm.samples.values() for s in series)
                        checked.append(CheckedObservation(found, bool(r.placed), tuple(norm.unmapped.items())))
                elif rtype == "MedicationAdministration":
                    norm.administration(en)
                elif rtype == "Procedure":
                    norm.procedure(en)
                elif rtype == "Condition":
                    norm.condition(en)
    except TooManyIssues:
        pass
    except MALFORMED as exc:
        r.issues.append(malformed(en, exc))
    return patient_id, r.issues


def meta_issues(meta: Any, path: str) -> list[Issue]:
    """meta.versionId and meta.lastUpdated order stored versions: what storage cannot keep as sent
    (a versionId that is no FHIR id, an instant over 40 characters) is rejected, never a 500."""
    if not meta:
        return []
    if not isinstance(meta, dict):
        return [Issue("structure", "meta must be an object", f"{path}.meta")]
    issues = []
    version, updated = meta.get("versionId"), meta.get("lastUpdated")
    if version not in (None, "") and not FHIR_ID.fullmatch(str(version)):
        issues.append(
            Issue("value", "meta.versionId must match [A-Za-z0-9.-]{1,64} (FHIR id)", f"{path}.meta.versionId")
        )
    if updated not in (None, "") and not (isinstance(updated, str) and len(updated) <= 40 and _is_instant(updated)):
        issues.append(Issue("value", "meta.lastUpdated must be a FHIR instant", f"{path}.meta.lastUpdated"))
    return issues


def _is_instant(raw: str) -> bool:
    if "\x00" in raw:  # fromisoformat lets a trailing NUL through; PostgreSQL text refuses it
        return False
    try:
        return datetime.fromisoformat(raw).tzinfo is not None
    except ValueError:
        return False
