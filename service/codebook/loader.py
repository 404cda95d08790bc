"""The codebook: which FHIR codes feed which grading concept.

Defaults (default.json) are LOINC for vitals and labs, RxNorm for drugs, and project-local
codes (under the configurable canonical base) where no standard code exists. A site adds its
own codes with an overlay file of the same shape (IECTOX_CODEBOOK_PATH); overlays only add.
Concept names and kinds are the registry's (service/core/concepts.py): a name it does not
know, a kind it disagrees with, or a registered concept left out of default.json stops
loading with the path of the entry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..core.concepts import ConceptName, Kind
from ..core.concepts import spec as registry_spec
from ..core.units import units_for

DEFAULT_PATH = Path(__file__).with_name("default.json")
Coding = tuple[str, str]  # (system, code)
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"


class CodebookError(ValueError):
    def __init__(self, message: str, path: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


@dataclass(frozen=True)
class Concept:
    name: str
    kind: Kind  # the registry's kind of the concept (checked at load)
    codings: tuple[Coding, ...]
    values: dict[str, tuple[Coding, ...]] = field(default_factory=dict)
    text: tuple[str, ...] = ()  # lower-case substrings matched against text, last resort
    value_text: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Codebook:
    concepts: dict[str, Concept]
    by_coding: dict[Coding, str]
    value_by_coding: dict[str, dict[Coding, str]]
    text_patterns: tuple[tuple[str, str], ...]  # (lower-case pattern, concept)
    value_text: dict[str, tuple[tuple[str, str], ...]]  # concept -> (lower-case pattern, value)

    def concept_for(self, codings: list[Coding], text: str | None) -> str | None:
        for c in codings:
            name = self.by_coding.get(c)
            if name is not None:
                return name
        if text:
            low = text.lower()
            for pattern, name in self.text_patterns:
                if pattern in low:
                    return name
        return None

    def value_for(self, concept: str, codings: list[Coding], text: str | None = None) -> str | None:
        """The value name of a coded concept: exact coding, then ICD-10-CM parent category
        (its codes are hierarchical by prefix: C83.31 falls under C83.3), then text."""
        table = self.value_by_coding.get(concept, {})
        for c in codings:
            if c in table:
                return table[c]
        for system, code in codings:
            if system == ICD10CM:
                for cut in range(len(code) - 1, 2, -1):
                    parent = (system, code[:cut].rstrip("."))
                    if parent in table:
                        return table[parent]
        if text:
            low = text.lower()
            for pattern, value in self.value_text.get(concept, ()):
                if pattern in low:
                    return value
        return None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, c in self.concepts.items():
            entry: dict[str, Any] = {
                "codings": [{"system": s, "code": k} for s, k in c.codings],
                "units": units_for(name),
                "values": {},
            }
            for value, codings in c.values.items():
                (s, k), *also = codings
                v: dict[str, Any] = {"system": s, "code": k}
                if also:
                    v["also"] = [{"system": s2, "code": k2} for s2, k2 in also]
                if c.value_text.get(value):
                    v["text"] = list(c.value_text[value])
                entry["values"][value] = v
            if c.text:
                entry["text"] = list(c.text)
            out[name] = entry
        return {"concepts": out}


def _codings(raw: Any, path: str, base: str) -> list[Coding]:
    items = raw if isinstance(raw, list) else [raw]
    out = []
    for i, item in enumerate(items):
        p = f"{path}[{i}]" if isinstance(raw, list) else path
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("system"), str)
            or not isinstance(item.get("code"), str)
        ):
            raise CodebookError("expected {'system': str, 'code': str}", p)
        out.append((item["system"].replace("{base}", base), item["code"]))
    return out


def _merge(concepts: dict[str, dict[str, Any]], doc: Any, base: str, source: str, *, overlay: bool) -> None:
    if not isinstance(doc, dict) or not isinstance(doc.get("concepts"), dict):
        raise CodebookError("expected an object with 'concepts'", source)
    for name, spec in doc["concepts"].items():
        path = f"{source}: concepts.{name}"
        if overlay and name not in concepts:
            raise CodebookError("unknown concept (overlays may only add codes to existing concepts)", path)
        registered = registry_spec(name)
        if registered is None:
            raise CodebookError("unknown concept (not in the registry, service/core/concepts.py)", path)
        if not isinstance(spec, dict):
            raise CodebookError("expected an object", path)
        kind = spec.get("kind")
        if (kind is not None or not overlay) and kind != registered.kind:
            raise CodebookError(f"kind {kind!r} disagrees with the registry's {registered.kind!r}", f"{path}.kind")
        entry = concepts.setdefault(
            name, {"kind": registered.kind, "codings": [], "values": {}, "text": [], "value_text": {}}
        )
        entry["codings"] += _codings(spec.get("codings", []), f"{path}.codings", base)
        for value, raw in (spec.get("values") or {}).items():
            if overlay and value not in entry["values"]:
                raise CodebookError("unknown value name", f"{path}.values.{value}")
            entry["values"].setdefault(value, [])
            entry["values"][value] += _codings(raw, f"{path}.values.{value}", base)
            for item in raw if isinstance(raw, list) else [raw]:
                entry["value_text"].setdefault(value, [])
                entry["value_text"][value] += [str(t).lower() for t in item.get("text", [])]
        entry["text"] += [str(t).lower() for t in spec.get("text", [])]


@lru_cache(maxsize=8)
def load_codebook(base: str, overlay: Path | None = None) -> Codebook:
    """The default codebook with an optional site overlay; immutable once built."""
    merged: dict[str, dict[str, Any]] = {}
    _merge(merged, json.loads(DEFAULT_PATH.read_text()), base, "default.json", overlay=False)
    absent = [c.value for c in ConceptName if c not in merged]
    if absent:
        raise CodebookError(f"registered concepts without an entry: {', '.join(absent)}", "default.json: concepts")
    if overlay is not None:
        try:
            doc = json.loads(Path(overlay).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CodebookError(f"cannot read codebook overlay: {exc}", str(overlay)) from exc
        _merge(merged, doc, base, str(overlay), overlay=True)
    concepts: dict[str, Concept] = {}
    by_coding: dict[Coding, str] = {}
    value_by_coding: dict[str, dict[Coding, str]] = {}
    patterns: list[tuple[str, str]] = []
    for name, e in merged.items():
        c = Concept(
            name,
            e["kind"],
            tuple(dict.fromkeys(e["codings"])),
            {v: tuple(dict.fromkeys(cs)) for v, cs in e["values"].items()},
            tuple(dict.fromkeys(e["text"])),
            {v: tuple(dict.fromkeys(ts)) for v, ts in e["value_text"].items() if ts},
        )
        concepts[name] = c
        # An event's value codes (cart-infusion.<product>) also identify the event itself.
        own = c.codings + (tuple(x for cs in c.values.values() for x in cs) if c.kind == Kind.EVENT else ())
        for coding in own:
            other = by_coding.setdefault(coding, name)
            if other != name:
                raise CodebookError(f"coding {coding} is mapped to both {other} and {name}", f"concepts.{name}")
        value_by_coding[name] = {coding: v for v, cs in c.values.items() for coding in cs}
        patterns += [(t, name) for t in c.text]
    value_text = {name: tuple((t, v) for v, ts in c.value_text.items() for t in ts) for name, c in concepts.items()}
    return Codebook(concepts, by_coding, value_by_coding, tuple(patterns), value_text)
