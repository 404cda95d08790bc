"""Write-back to the EHR: the transaction Bundles that carry one stored evaluation.

Every write is idempotent, so a re-delivery (or a re-evaluation at the same `at`) updates the
EHR's copies and never adds one (docs/writeback.md):

- mode "conditional" (default): `PUT RiskAssessment?identifier=<write-back identifier>`
  (conditional update; the server keeps or assigns the ids), in Bundles of at most
  `writeback_max_bundle_entries` (8: Medplum runs a transaction with conditional entries only up
  to 8), each with a Provenance for its own RiskAssessments, targets as `urn:uuid:` fullUrls
  that the server rewrites.
- mode "id": `PUT RiskAssessment/<id>` and `PUT Provenance/<id>` on the deterministic ids
  (update as create), for servers that accept client-assigned ids but no conditional updates.
  References need no rewriting, so an evaluation is split at the same size (the Provenance
  last; the worker delivers a patient's rows in order).

Both modes add the write-back identifier `<base>/identifier/risk-assessment-id` | `<id>` next to
the business identifier `<base>/identifier/risk-assessment` | `patient|method|code|at`. The
business key holds `|`: FHIR search escapes it as `\\|`, but servers differ (Medplum splits a
token on every `|` and matches nothing, so every conditional update would create a copy). The
deterministic id is a uuid5 of the business key, one to one with it, in plain token characters.
It is stored bare, not as `urn:uuid:<id>`: servers rewrite `urn:uuid:` placeholders anywhere in
a transaction, identifier values included.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal
from urllib.parse import quote

Mode = Literal["id", "conditional"]


def writeback_id_system(base: str) -> str:
    return f"{base}/identifier/risk-assessment-id"


def search_escape(value: str) -> str:
    """FHIR search escaping of a parameter value: `\\`, `|`, `,` and `$` get a backslash."""
    for ch in ("\\", "|", ",", "$"):
        value = value.replace(ch, "\\" + ch)
    return value


def conditional_url(rtype: str, system: str, value: str) -> str:
    """`<rtype>?identifier=<system>|<value>`, the value search-escaped, the whole token URL-encoded."""
    return f"{rtype}?identifier=" + quote(f"{system}|{search_escape(value)}", safe="")


def _assessment(res: dict[str, Any], system: str) -> dict[str, Any]:
    """The RiskAssessment as the EHR gets it: no local meta, plus the write-back identifier."""
    body = {k: v for k, v in res.items() if k != "meta"}
    body["identifier"] = [*(res.get("identifier") or []), {"system": system, "value": res["id"]}]
    return body


def _transaction(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def transaction_bundles(
    resources: list[dict[str, Any]], base: str, *, mode: Mode = "conditional", max_entries: int = 8
) -> list[dict[str, Any]]:
    """The transaction Bundles writing one evaluation's RiskAssessments and Provenance, in order."""
    system = writeback_id_system(base)
    assessments = [r for r in resources if r["resourceType"] == "RiskAssessment"]
    provenances = [{k: v for k, v in r.items() if k != "meta"} for r in resources if r["resourceType"] == "Provenance"]
    if mode == "conditional":
        return conditional_bundles(assessments, provenances, system, max_entries)
    entries = [
        {
            "fullUrl": f"urn:uuid:{r['id']}",
            "resource": r,
            "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
        }
        for r in [*(_assessment(a, system) for a in assessments), *provenances]
    ]
    size = max(1, max_entries)
    return [_transaction(entries[i : i + size]) for i in range(0, len(entries), size)]


def conditional_bundles(
    assessments: list[dict[str, Any]], provenances: list[dict[str, Any]], system: str, max_entries: int
) -> list[dict[str, Any]]:
    """Conditional updates on the write-back identifier, in Bundles of at most `max_entries`
    entries: each holds up to `max_entries - 1` RiskAssessments and a Provenance for exactly
    those (targets as `urn:uuid:` fullUrls that the server rewrites to the ids it keeps or
    assigns). Each Bundle is atomic and complete on its own; one Bundle keeps the original
    Provenance id, several get ids derived from it and the part number (stable across runs)."""
    per = max(1, max_entries - (1 if provenances else 0))
    chunks = [assessments[i : i + per] for i in range(0, len(assessments), per)] or [[]]
    bundles = []
    for n, chunk in enumerate(chunks):
        entries: list[dict[str, Any]] = []
        full_urls: dict[str, str] = {}
        for res in chunk:
            rid = res["id"]
            full_urls[f"RiskAssessment/{rid}"] = f"urn:uuid:{rid}"
            body = {k: v for k, v in _assessment(res, system).items() if k != "id"}  # the server keeps/assigns ids
            entries.append(
                {
                    "fullUrl": f"urn:uuid:{rid}",
                    "resource": body,
                    "request": {"method": "PUT", "url": conditional_url("RiskAssessment", system, rid)},
                }
            )
        for prov in provenances:
            targets = [{"reference": full_urls[t["reference"]]} for t in prov["target"] if t["reference"] in full_urls]
            if not targets:
                continue
            pid = prov["id"] if len(chunks) == 1 else str(uuid.uuid5(uuid.NAMESPACE_URL, f"{prov['id']}/part/{n}"))
            entries.append(
                {
                    "fullUrl": f"urn:uuid:{pid}",
                    "resource": {**prov, "id": pid, "target": targets},
                    "request": {"method": "PUT", "url": f"Provenance/{pid}"},
                }
            )
        bundles.append(_transaction(entries))
    return bundles
