"""SMART on FHIR scopes, v1 (`system/Observation.read`) and v2 (`system/Observation.rs`).

This service knows two kinds of access:
- read: GET by id, search and the read-only operations. v1 `read` or `*`; v2 `r` or `s`.
- write: storing (every store is an upsert on the client's id). v1 `write` or `*`; v2 `c` or `u`.
A scope grants them at `system/` or `user/` level, on its resource type or `*`. `patient/`
scopes grant nothing here (the service does not enforce a patient compartment), and neither
do v2 scopes with a query (`patient/Observation.rs?category=...`): their restriction could not
be honoured.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from .errors import forbidden

Access = Literal["read", "write"]
READ: Access = "read"
WRITE: Access = "write"

_SCOPE = re.compile(r"^(system|user|patient)/(\*|[A-Z][A-Za-z]{0,63})\.(read|write|\*|c?r?u?d?s?)$")
_V1 = {"read": frozenset("rs"), "write": frozenset("cud"), "*": frozenset("cruds")}
_LETTERS: dict[Access, frozenset[str]] = {"read": frozenset("rs"), "write": frozenset("cu")}
_GRANTING = ("system", "user")


@dataclass(frozen=True, slots=True)
class Grant:
    context: str  # system | user | patient
    resource: str  # a resource type or "*"
    perms: frozenset[str]  # SMART v2 letters c r u d s


def parse_scopes(raw: Any) -> tuple[Grant, ...]:
    """The resource scopes of a `scope` claim (space-separated string) or `scp` (string or list)."""
    if isinstance(raw, str):
        words = raw.split()
    elif isinstance(raw, list):
        words = [w for w in raw if isinstance(w, str)]
    else:
        return ()
    grants = []
    for w in words:
        m = _SCOPE.match(w)
        if m is None or not m.group(3):
            continue  # openid, launch, fhirUser, granular (?query) scopes, ...
        context, resource, perm = m.groups()
        grants.append(Grant(context, resource, _V1.get(perm) or frozenset(perm)))
    return tuple(grants)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: `actor` is written to the audit log (token iss + subject, or "dev")."""

    actor: str
    grants: tuple[Grant, ...] = ()
    dev: bool = False

    def allows(self, access: Access, rtype: str) -> bool:
        if self.dev:
            return True
        letters = _LETTERS[access]
        return any(g.context in _GRANTING and g.resource in ("*", rtype) and g.perms & letters for g in self.grants)

    def require(self, access: Access, *rtypes: str) -> None:
        """403 (OperationOutcome, insufficient_scope) unless every type is allowed."""
        for rtype in rtypes:
            if self.allows(access, rtype):
                continue
            need = f"system/{rtype}.{'rs' if access == READ else 'cu'}"
            text = (
                f"the token's scopes do not allow {access} on {rtype}: need system/ or user/ "
                f"{rtype} (or *) with {'read, r or s' if access == READ else 'write, c or u'}, e.g. {need}"
            )
            if any(g.context == "patient" for g in self.grants):
                text += "; patient/ scopes are not accepted by this service"
            raise forbidden(text, need)


DEV = Principal(actor="dev", dev=True)
ANONYMOUS = "anonymous"
