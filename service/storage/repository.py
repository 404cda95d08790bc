"""All queries live here. Callers pass a Session; they never commit (the request does).

Storage parses no FHIR: the application layer hands it the index fields (patient, version,
method, code, occurrence) next to the resource it stores verbatim.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, NamedTuple, TypeVar

import orjson
import psycopg
from sqlalchemy import (
    ARRAY,
    String,
    bindparam,
    cast,
    column,
    delete,
    func,
    literal,
    literal_column,
    select,
    table,
    tuple_,
    union_all,
)
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlmodel import Session, col
from sqlmodel import select as sm_select

from .models import (
    AuditEvent,
    CdsCard,
    CdsFeedback,
    CdsLastAnswer,
    EmittedResource,
    RejectedInput,
    SeenToken,
    StoredResource,
    WatchedPatient,
    utc,
)

T = TypeVar("T")


@dataclass(frozen=True)
class WriteOutcome:
    resource_type: str
    id: str
    version_id: int
    status: str  # "201 Created" | "200 OK"
    changed: bool = True  # False when the stored version was kept (same or newer)


class NewVersion(NamedTuple):
    """A version of an input resource to store, with the index fields the app layer read from it."""

    server: str  # the EHR server it came from ("" = an API client's): part of its key
    resource_type: str
    id: str
    patient_id: str | None
    source_version: str  # meta.versionId as sent ("" when absent)
    source_last_updated: str  # meta.lastUpdated as sent ("" when absent)
    version_number: int  # the version order as numbers: see StoredResource
    updated_us: int
    body: bytes  # the resource's JSON, stored verbatim


# Rows a statement. SQLite: at most 9 parameters a row, under its 32,766 variables. PostgreSQL
# key lookups get each column as one array (unnest): psycopg converts a long parameter list slowly.
CHUNK = 1000

_STORED = StoredResource.metadata.tables[StoredResource.__tablename__]
_REJECTED = RejectedInput.metadata.tables[RejectedInput.__tablename__]
_EMITTED = EmittedResource.metadata.tables[EmittedResource.__tablename__]


def _postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _insert(session: Session, table: Any) -> Any:
    """The dialect's INSERT, which has ON CONFLICT (both dialects spell it the same)."""
    return (pg_insert if _postgres(session) else sqlite_insert)(table)


def _chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]


def _arrays(table: Any, names: Sequence[str]) -> Any:
    """PostgreSQL: rows from one array parameter per column, `unnest(:a, :b) AS anon(a, b)`."""
    params = [bindparam(name, type_=ARRAY(table.c[name].type)) for name in names]
    return func.unnest(*params).table_valued(*names).render_derived()


def _in_keys(session: Session, table: Any, keys: Sequence[tuple[str, str]], server: str) -> tuple[Any, dict[str, Any]]:
    """A WHERE clause for (resource_type, id) in `keys` of one `server`, and its parameters."""
    c = table.c
    mine = c.server == bindparam("server")
    if not _postgres(session):
        # One JSON parameter read by json_each, not two bound parameters per key: measured 3-4x
        # faster for a CDS prefetch (1,900 keys: 15 -> 5 ms), the statement compiled once.
        pairs = func.json_each(bindparam("keys")).table_valued("value")
        wanted = select(func.json_extract(pairs.c.value, "$[0]"), func.json_extract(pairs.c.value, "$[1]"))
        return mine & tuple_(c.resource_type, c.id).in_(wanted), {
            "keys": orjson.dumps(list(keys)).decode(),
            "server": server,
        }
    arrays = _arrays(table, ("resource_type", "id"))
    types, ids = (list(column) for column in zip(*keys, strict=True))
    return mine & tuple_(c.resource_type, c.id).in_(select(arrays.c.resource_type, arrays.c.id)), {
        "resource_type": types,
        "id": ids,
        "server": server,
    }


# PostgreSQL: the rows an upsert stores go first into a temporary table of the connection, by
# binary COPY: 2,000 rows of a CDS prefetch (2 MB) took 50 ms to send as a bytea[] parameter and
# 5 ms to COPY. Emptied at each commit (and by each upsert, for the rounds of one transaction).
_NEW_ROWS = table("iectox_new_rows", *(column(name, _STORED.c[name].type) for name in NewVersion._fields))
_NEW_ROWS_DDL = (
    "CREATE TEMPORARY TABLE IF NOT EXISTS iectox_new_rows (server text, resource_type text, id text, "
    "patient_id text, source_version text, source_last_updated text, version_number bigint, "
    "updated_us bigint, body bytea) ON COMMIT DELETE ROWS"
)
_NEW_ROWS_TYPES = ("text", "text", "text", "text", "text", "text", "int8", "int8", "bytea")  # as NewVersion


_COPY_NEW_ROWS = f"COPY iectox_new_rows ({', '.join(NewVersion._fields)}) FROM STDIN (FORMAT BINARY)"


def _copy_new_rows(session: Session, rows: Sequence[NewVersion]) -> None:
    """PostgreSQL: `rows`, and only they, in the connection's temporary table `iectox_new_rows`
    (within the session's transaction: the table empties at commit). The COPY runs on the
    driver's connection, so its errors are raised as SQLAlchemy's (a broken connection is an
    OperationalError, a 503), never the driver's own."""
    conn = session.connection()
    conn.exec_driver_sql(_NEW_ROWS_DDL)
    conn.exec_driver_sql("DELETE FROM iectox_new_rows")
    driver = conn.connection.driver_connection
    try:
        with driver.cursor() as cur, cur.copy(_COPY_NEW_ROWS) as copy:  # type: ignore[union-attr]
            copy.set_types(_NEW_ROWS_TYPES)
            for row in rows:
                copy.write_row(row)
    except psycopg.Error as exc:
        raise DBAPIError.instance(_COPY_NEW_ROWS, None, exc, psycopg.Error, hide_parameters=True) from None


def _upsert_stored(postgres: bool) -> Any:
    """The upsert of input rows: on PostgreSQL from the temporary table `_copy_new_rows` fills,
    in key order (the lock order); on SQLite with one `VALUES (?, ...)` row of positional
    placeholders, repeated per row by `_sqlite_upsert`."""
    ins: Any
    if postgres:
        # Byte order ("C"), as Python sorts: the lock order whatever the database's collation.
        by_key = (_NEW_ROWS.c.resource_type.collate("C"), _NEW_ROWS.c.id.collate("C"))
        new_rows = select(*_NEW_ROWS.c, literal(1)).order_by(*by_key)
        ins = pg_insert(_STORED).from_select([*NewVersion._fields, "version_id"], new_rows)
    else:
        ins = sqlite_insert(_STORED).values({**{f: literal_column("?") for f in NewVersion._fields}, "version_id": 1})
    new, old = ins.excluded, _STORED.c
    # PostgreSQL compares text by the database's collation; versionIds compare as bytes (as Python does).
    new_version = new.source_version.collate("C") if postgres else new.source_version
    newer = tuple_(new.version_number, new_version, new.updated_us) > tuple_(
        old.version_number, old.source_version, old.updated_us
    )
    unversioned = (new.source_version == "") & (new.source_last_updated == "")
    return ins.on_conflict_do_update(
        index_elements=[old.server, old.resource_type, old.id],
        set_={
            "patient_id": new.patient_id,
            "source_version": new.source_version,
            "source_last_updated": new.source_last_updated,
            "version_number": new.version_number,
            "updated_us": new.updated_us,
            "body": new.body,
            "version_id": old.version_id + 1,
        },
        where=(old.body != new.body) & (unversioned | newer),
    ).returning(old.resource_type, old.id, old.version_id)


@lru_cache(maxsize=1)
def _sqlite_upsert_parts() -> tuple[str, str, str, tuple[int, ...]]:
    """SQLAlchemy's SQLite upsert with positional parameters, in pieces: what comes before its
    one VALUES row, the row, what comes after, and the NewVersion field of each parameter of a
    row (in the order the statement lists its columns)."""
    sql = str(_upsert_stored(False).compile(dialect=sqlite_dialect(), compile_kwargs={"literal_binds": True}))
    head, _, rest = sql.partition(") VALUES (")
    one, _, tail = rest.partition(")")
    columns = [name.strip() for name in head.partition("(")[2].split(",")]
    placeholders = [v.strip() for v in one.split(",")]
    order = tuple(NewVersion._fields.index(c) for c, v in zip(columns, placeholders, strict=True) if v == "?")
    if len(order) != len(NewVersion._fields):
        raise RuntimeError("the SQLite upsert does not bind every NewVersion field once")
    return f"{head}) VALUES ", f"({one})", tail, order


def _sqlite_upsert(rows: Sequence[NewVersion]) -> tuple[str, tuple[Any, ...]]:
    """The SQLite upsert of `rows` as one statement with every value bound in place: a fraction
    of the cost of an executemany, which builds each row's parameters in Python (1,800 rows:
    34 -> 14 ms)."""
    head, row, tail, order = _sqlite_upsert_parts()
    return head + ", ".join([row] * len(rows)) + tail, tuple(r[i] for r in rows for i in order)


def upsert_resources(session: Session, items: Sequence[NewVersion]) -> list[WriteOutcome]:
    """Store input resources with set-based statements; one outcome per item, in order.

    A stored row changes only when the item is newer by (version_number, source_version,
    updated_us), or says no version (neither meta.versionId nor meta.lastUpdated) and its body
    differs. That condition is part of the statement, so whichever process writes last, an older
    version never replaces a newer one. The same body again, or an older version: unchanged.
    Rows go in key order (one lock order for every writer, so PostgreSQL writers queue rather
    than deadlock); an id repeated in `items` goes into a later statement, as a statement may
    change a row only once.
    """
    if not items:
        return []
    rounds: list[list[int]] = []  # round n: the n-th occurrence of each id
    seen: dict[tuple[str, str, str], int] = {}
    for i, item in enumerate(items):
        key = (item.server, item.resource_type, item.id)
        n = seen.get(key, 0)
        seen[key] = n + 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append(i)
    servers = {item.server for item in items}
    if len(servers) != 1:  # one call stores one server's resources (the caller's namespace)
        raise ValueError("upsert_resources stores the resources of one server")
    (server,) = servers
    conn, postgres = session.connection(), _postgres(session)
    outcomes: list[WriteOutcome] = [None] * len(items)  # type: ignore[list-item]  # every slot is set below
    for indices in rounds:
        indices.sort(key=lambda i: (items[i].resource_type, items[i].id))
        written: dict[tuple[str, str], int] = {}
        for part in [indices] if postgres else _chunks(indices):  # COPY has no parameter limit
            rows = [items[i] for i in part]
            if postgres:
                _copy_new_rows(session, rows)
                returned = conn.execute(_upsert_stored(True))
            else:
                returned = conn.exec_driver_sql(*_sqlite_upsert(rows))
            written.update(((t, rid), v) for t, rid, v in returned.all())  # one fetch, not one per row
        kept = _stored_versions(
            session, [k for i in indices if (k := (items[i].resource_type, items[i].id)) not in written], server
        )
        for i in indices:
            rtype, rid = items[i].resource_type, items[i].id
            version = written.get((rtype, rid))
            if version is None:
                outcomes[i] = WriteOutcome(rtype, rid, kept[(rtype, rid)], "200 OK", changed=False)
            else:  # a new row is version 1; an updated one at least 2
                outcomes[i] = WriteOutcome(rtype, rid, version, "201 Created" if version == 1 else "200 OK")
    return outcomes


def _stored_versions(session: Session, keys: Sequence[tuple[str, str]], server: str) -> dict[tuple[str, str], int]:
    found: dict[tuple[str, str], int] = {}
    c, conn = _STORED.c, session.connection()
    for part in _chunks(keys):
        where, params = _in_keys(session, _STORED, part, server)
        rows = conn.execute(select(c.resource_type, c.id, c.version_id).where(where), params)
        found.update(((t, rid), v) for t, rid, v in rows)
    return found


def read_resource(session: Session, rtype: str, rid: str, *, server: str) -> dict[str, Any] | None:
    """A stored input resource of `server` as stored, with this service's version in meta.versionId."""
    c = _STORED.c
    where = (c.server == server) & (c.resource_type == rtype) & (c.id == rid)
    row = session.connection().execute(select(c.body, c.version_id).where(where)).first()
    if row is None:
        return None
    res: dict[str, Any] = orjson.loads(row.body)
    res["meta"] = {**(res.get("meta") or {}), "versionId": str(row.version_id)}
    return res


def _of_patient(*columns: Any, patient_id: str, server: str) -> Any:
    """`columns` of the patient's stored rows of `server`: those that reference it and the Patient
    itself, as two indexed queries ((server, patient_id); the primary key). One query with an OR
    has SQLite factor the server out and walk the whole namespace."""
    c = _STORED.c
    referencing = select(*columns).where(c.server == server, c.patient_id == patient_id)
    itself = select(*columns).where(
        c.server == server, c.resource_type == "Patient", c.id == patient_id, c.patient_id.is_distinct_from(patient_id)
    )
    return union_all(referencing, itself)


def patient_inputs(
    session: Session,
    patient_id: str,
    *,
    server: str,
    parsed: Mapping[tuple[str, str, int], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The stored Patient of `server` and everything that references it (plus referenced
    Medications), in (type, id) order: the same stored data give the same entries, whatever
    order the database returns rows in. `parsed`: resources already at hand by (type, id, this
    service's version), as this transaction stored them (not read or parsed again; when they are
    all the patient's rows, no body is read at all: a new patient's 2 MB)."""
    c = _STORED.c
    conn = session.connection()
    known = parsed or {}

    def rows(*columns: Any) -> list[tuple[Any, ...]]:
        # Plain tuples: SQLAlchemy's Row compares in Python (sorting 2,000 Rows cost 15 ms, tuples 1 ms).
        return sorted(map(tuple, conn.execute(_of_patient(*columns, patient_id=patient_id, server=server))))

    key = (c.resource_type, c.id, c.version_id)
    keys = rows(*key) if known else []
    if keys and all(k in known for k in keys):
        resources = [known[k] for k in keys]
    else:
        resources = [known.get((t, rid, v)) or orjson.loads(body) for t, rid, v, body in rows(*key, c.body)]
    med_ids = {
        ref.split("/", 1)[1]
        for r in resources
        if r.get("resourceType") == "MedicationAdministration"
        and isinstance(ref := (r.get("medicationReference") or {}).get("reference"), str)
        and ref.startswith("Medication/")
    }
    if med_ids:
        of_server = (c.server == server) & (c.resource_type == "Medication") & c.id.in_(med_ids)
        meds = conn.execute(select(c.body).where(of_server).order_by(c.id)).scalars()
        resources += [orjson.loads(body) for body in meds]
    return resources


def has_patient(session: Session, patient_id: str, *, server: str) -> bool:
    """Whether anything of the patient is stored under `server` (one index probe)."""
    c = _STORED.c
    mine = select(literal(1)).where(c.server == server, c.patient_id == patient_id).limit(1)
    return session.connection().execute(mine).first() is not None


def stored_bodies(
    session: Session, keys: Sequence[tuple[str, str]], *, server: str
) -> dict[tuple[str, str], tuple[bytes, int]]:
    """(body as stored, this service's version) of `server`'s stored input resources among `keys`."""
    c = _STORED.c
    out: dict[tuple[str, str], tuple[bytes, int]] = {}
    conn = session.connection()
    for part in _chunks(sorted(set(keys))):
        where, params = _in_keys(session, _STORED, part, server)
        for row in conn.execute(select(c.resource_type, c.id, c.body, c.version_id).where(where), params):
            out[(row.resource_type, row.id)] = (bytes(row.body), row.version_id)
    return out


def input_fingerprint(session: Session, patient_id: str, *, server: str) -> str:
    """A digest of what an evaluation of the patient reads: every stored input's server version,
    the Medications' versions (any of them: a change to one changes this) and the kept rejected
    inputs. Equal fingerprints, equal inputs."""
    c, r = _STORED.c, RejectedInput.__table__.c  # type: ignore[attr-defined]
    conn = session.connection()
    # "type/id/version;" of each row, joined by the database (2,000 rows: 1 ms, not 5 in Python).
    # The lines are sorted, so equal rows give equal text; an order the database did not keep
    # could only make equal inputs look changed (graded again), never the reverse: ids hold no
    # "/" or ";", so the text names each row.
    line = (c.resource_type + "/" + c.id + "/" + cast(c.version_id, String) + ";").label("line")
    lines = _of_patient(line, patient_id=patient_id, server=server).subquery()
    if _postgres(session):
        joined = select(func.string_agg(lines.c.line, aggregate_order_by(literal(""), lines.c.line)))
    else:  # SQLite (3.40 has no ORDER BY in an aggregate): it joins in the order of a sorted subquery
        ordered = select(lines.c.line).order_by(lines.c.line).subquery()
        joined = select(func.group_concat(ordered.c.line, ""))
    digest = hashlib.blake2b(digest_size=16)
    digest.update((conn.execute(joined).scalar() or "").encode())
    meds = conn.execute(
        select(func.count(), func.coalesce(func.sum(c.version_id), 0)).where(
            (c.server == server) & (c.resource_type == "Medication")
        )
    ).one()
    digest.update(f"Medication:{meds[0]}:{meds[1]};".encode())
    for row in conn.execute(
        select(r.resource_type, r.id, r.body)
        .where((r.server == server) & (r.patient_id == patient_id))
        .order_by(r.resource_type, r.id)
    ):
        digest.update(f"rejected {row.resource_type}/{row.id}:".encode() + bytes(row.body))
    return digest.hexdigest()


def stored_version(session: Session, rtype: str, rid: str, *, server: str) -> tuple[str, str] | None:
    """(meta.versionId, meta.lastUpdated) as sent, of `server`'s stored input resource; None when absent."""
    c = _STORED.c
    where = (c.server == server) & (c.resource_type == rtype) & (c.id == rid)
    row = session.connection().execute(select(c.source_version, c.source_last_updated).where(where)).first()
    return None if row is None else (row.source_version, row.source_last_updated)


def save_rejected(session: Session, res: dict[str, Any], patient_id: str, *, server: str) -> None:
    """Keep a rejected EHR resource (replacing an earlier rejected version of it)."""
    meta = res.get("meta") or {}
    ins = _insert(session, _REJECTED)
    values = {
        "server": server,
        "resource_type": res["resourceType"],
        "id": res["id"],
        "patient_id": patient_id,
        "source_version": str(meta.get("versionId") or ""),
        "source_last_updated": str(meta.get("lastUpdated") or ""),
        "body": orjson.dumps(res),
    }
    new = ins.excluded
    session.connection().execute(
        ins.values(values).on_conflict_do_update(
            index_elements=[_REJECTED.c.server, _REJECTED.c.resource_type, _REJECTED.c.id],
            set_={k: new[k] for k in ("patient_id", "source_version", "source_last_updated", "body")},
        )
    )


def any_rejected(session: Session) -> bool:
    return session.connection().execute(select(_REJECTED.c.id).limit(1)).first() is not None


def rejected_versions(
    session: Session, keys: Collection[tuple[str, str]], *, server: str
) -> dict[tuple[str, str], tuple[str, str]]:
    """(meta.versionId, meta.lastUpdated) of `server`'s kept rejections among (type, id) `keys`."""
    c, conn = _REJECTED.c, session.connection()
    found: dict[tuple[str, str], tuple[str, str]] = {}
    for part in _chunks(sorted(set(keys))):
        where, params = _in_keys(session, _REJECTED, part, server)
        rows = conn.execute(select(c.resource_type, c.id, c.source_version, c.source_last_updated).where(where), params)
        found.update(((t, rid), (v, u)) for t, rid, v, u in rows)
    return found


def clear_rejected(session: Session, keys: Collection[tuple[str, str]], *, server: str) -> None:
    conn = session.connection()
    for part in _chunks(sorted(set(keys))):
        where, params = _in_keys(session, _REJECTED, part, server)
        conn.execute(delete(_REJECTED).where(where), params)


def rejected_inputs(session: Session, patient_id: str, *, server: str) -> list[dict[str, Any]]:
    """The rejected EHR resources of one patient of `server`, as read, in (type, id) order."""
    r = _REJECTED.c
    mine = (r.server == server) & (r.patient_id == patient_id)
    rows = session.connection().execute(select(r.body).where(mine).order_by(r.resource_type, r.id))
    return [orjson.loads(body) for body in rows.scalars()]


@dataclass(frozen=True)
class Emitted:
    """An emitted resource with its index fields (method and code: RiskAssessments only)."""

    resource: dict[str, Any]
    occurrence: datetime
    method: str | None = None
    code: str | None = None


def save_emitted(session: Session, patient_id: str, emitted: list[Emitted], now: datetime, *, server: str) -> None:
    """Upsert RiskAssessments and their Provenance by their deterministic ids (never duplicates),
    in one statement: concurrent evaluations of a patient queue on the rows, never collide. Each
    resource gets its stored version in meta.versionId (the body is stored without it)."""
    if not emitted:
        return
    rows = {
        (item.resource["resourceType"], item.resource["id"]): {
            "resource_type": item.resource["resourceType"],
            "id": item.resource["id"],
            "server": server,
            "patient_id": patient_id,
            "method": item.method,
            "code": item.code,
            "occurrence": item.occurrence,
            "version_id": 1,
            "body": orjson.dumps(_unversioned(item.resource)),
            "updated": utc(now),
        }
        for item in emitted
    }
    ins = _insert(session, _EMITTED)
    stmt = ins.on_conflict_do_update(
        index_elements=[_EMITTED.c.resource_type, _EMITTED.c.id],
        set_={"body": ins.excluded.body, "version_id": _EMITTED.c.version_id + 1, "updated": ins.excluded.updated},
    ).returning(_EMITTED.c.resource_type, _EMITTED.c.id, _EMITTED.c.version_id)
    conn = session.connection()
    versions: dict[tuple[str, str], int] = {}
    for part in _chunks([rows[key] for key in sorted(rows)]):  # key order: one lock order
        versions.update(((t, rid), v) for t, rid, v in conn.execute(stmt, part))
    for item in emitted:
        res = item.resource
        res.setdefault("meta", {})["versionId"] = str(versions[(res["resourceType"], res["id"])])


def _unversioned(res: dict[str, Any]) -> dict[str, Any]:
    meta = res.get("meta")
    if not isinstance(meta, dict) or "versionId" not in meta:
        return res
    return {**res, "meta": {k: v for k, v in meta.items() if k != "versionId"}}


def _versioned(body: bytes, version_id: int) -> dict[str, Any]:
    res: dict[str, Any] = orjson.loads(body)
    res["meta"] = {**(res.get("meta") or {}), "versionId": str(version_id)}
    return res


def get_emitted(session: Session, rtype: str, rid: str, *, server: str) -> dict[str, Any] | None:
    c = _EMITTED.c
    where = (c.server == server) & (c.resource_type == rtype) & (c.id == rid)
    row = session.connection().execute(select(c.body, c.version_id).where(where)).first()
    return None if row is None else _versioned(row.body, row.version_id)


def emitted_by_id(session: Session, rtype: str, ids: Collection[str]) -> dict[str, dict[str, Any]]:
    """The stored emitted resources of type `rtype` among `ids` (one query), by id."""
    if not ids:
        return {}
    c = _EMITTED.c
    rows = session.connection().execute(
        select(c.id, c.body, c.version_id).where((c.resource_type == rtype) & c.id.in_(list(ids)))
    )
    return {row.id: _versioned(row.body, row.version_id) for row in rows}


def search_assessments(
    session: Session,
    patient_id: str | None,
    method: str | None,
    newest_first: bool,
    limit: int,
    offset: int,
    *,
    server: str,
) -> tuple[int, list[dict[str, Any]]]:
    c = _EMITTED.c
    where = [c.resource_type == "RiskAssessment", c.server == server]
    if patient_id is not None:
        where.append(c.patient_id == patient_id)
    if method is not None:
        where.append(c.method == method)
    conn = session.connection()
    total = conn.execute(select(func.count()).select_from(_EMITTED).where(*where)).scalar_one()
    order = c.occurrence.desc() if newest_first else c.occurrence.asc()
    rows = conn.execute(select(c.body, c.version_id).where(*where).order_by(order, c.id).offset(offset).limit(limit))
    return int(total), [_versioned(row.body, row.version_id) for row in rows]


def new_id() -> str:
    return str(uuid.uuid4())


# --- Inbound security: audit log and seen JWT ids ---------------------------------------------


def add_audit_event(session: Session, event: AuditEvent) -> None:
    """Add an audit row; when it names a stored resource but no patient, the resource's patient."""
    if event.patient_id is None and event.resource_type and event.resource_id:
        if event.resource_type == "Patient":
            event.patient_id = event.resource_id
        else:
            conn = session.connection()
            for table in (_STORED, _EMITTED):
                c = table.c
                key = (c.server == event.server, c.resource_type == event.resource_type, c.id == event.resource_id)
                event.patient_id = conn.execute(select(c.patient_id).where(*key)).scalar()
                if event.patient_id is not None:
                    break
    session.add(event)


def audit_events(
    session: Session,
    patient_id: str | None = None,
    limit: int = 100,
    recorded: Sequence[tuple[str, datetime]] = (),
    server: str | None = None,
) -> list[AuditEvent]:
    """The newest audit rows first, optionally those of one patient (of `server`; None: of any
    server); `recorded`: bounds as (operator, time) with operator ge, gt, le or lt."""
    query = sm_select(AuditEvent)
    if server is not None:
        query = query.where(col(AuditEvent.server) == server)
    if patient_id is not None:
        query = query.where(col(AuditEvent.patient_id) == patient_id)
    column = col(AuditEvent.recorded)
    ops = {"ge": column.__ge__, "gt": column.__gt__, "le": column.__le__, "lt": column.__lt__}
    for op, t in recorded:
        query = query.where(ops[op](utc(t)))
    return list(session.exec(query.order_by(col(AuditEvent.id).desc()).limit(limit)).all())


def remember_token(session: Session, key: str, expires: datetime, now: datetime) -> bool:
    """Record a JWT id until `expires`; False if it is already recorded (a replay).

    Rows past their expiry are deleted first. Concurrent requests with the same key conflict
    on the primary key: one of them gets False.
    """
    session.exec(delete(SeenToken).where(col(SeenToken.expires) < now))
    if session.get(SeenToken, key) is not None:
        return False
    try:
        with session.begin_nested():
            session.add(SeenToken(key=key, expires=expires))
    except IntegrityError:
        return False
    return True


def add_watched(session: Session, target: str, patient_id: str, checkpoint: str, now: datetime) -> bool:
    """Add a patient to the poll (ON CONFLICT DO NOTHING: two first syncs never collide).
    True when added, False when it was already watched."""
    table = WatchedPatient.__table__  # type: ignore[attr-defined]
    stmt = _insert(session, table).values(target=target, patient_id=patient_id, checkpoint=checkpoint, updated=now)
    stmt = stmt.on_conflict_do_nothing(index_elements=["target", "patient_id"]).returning(table.c.patient_id)
    return session.execute(stmt).first() is not None  # RETURNING: rowcount is not reliable here


def last_answer(
    session: Session, patient_id: str, hook: str, user_id: str, *, server: str
) -> tuple[str, datetime | None] | None:
    """(state, when a card was last shown) of the last answer to this hook for the patient (of
    `server`) and user (None: none yet)."""
    row = session.get(CdsLastAnswer, (server, patient_id, hook, user_id))
    if row is None:
        return None
    return row.state, None if row.shown is None else utc(row.shown)


def set_last_answer(
    session: Session,
    patient_id: str,
    hook: str,
    user_id: str,
    state: str,
    now: datetime,
    *,
    shown: bool,
    server: str,
) -> None:
    """Record this answer (one statement: two concurrent answers never collide); `shown`: a card
    was returned (else the time the user was last shown one stays)."""
    ins = pg_insert(CdsLastAnswer) if _postgres(session) else sqlite_insert(CdsLastAnswer)
    now = utc(now)
    values: dict[str, Any] = {"server": server, "patient_id": patient_id, "hook": hook, "user_id": user_id}
    values |= {"state": state, "answered": now}
    stmt = ins.values(**values, shown=now if shown else None)
    update = {"state": stmt.excluded.state, "answered": stmt.excluded.answered}
    if shown:
        update["shown"] = stmt.excluded.shown
    session.connection().execute(
        stmt.on_conflict_do_update(index_elements=["server", "patient_id", "hook", "user_id"], set_=update)
    )


def cards_and_feedback(session: Session, since: datetime | None) -> tuple[list[CdsCard], list[CdsFeedback]]:
    """The cards issued and the feedback received since `since` (everything when None)."""
    cards = sm_select(CdsCard)
    feedback = sm_select(CdsFeedback)
    if since is not None:
        cards = cards.where(col(CdsCard.issued) >= since)
        feedback = feedback.where(col(CdsFeedback.received) >= since)
    return list(session.exec(cards)), list(session.exec(feedback))


def stored_patient_ids(session: Session, *, server: str) -> list[str]:
    """The ids of every stored Patient of `server`, in order."""
    c = _STORED.c
    where = (c.server == server) & (c.resource_type == "Patient")
    rows = session.connection().execute(select(c.id).where(where).order_by(c.id))
    return [r.id for r in rows]


def emitted_for_export(
    session: Session, rtype: str, since: datetime | None, batch: int = CHUNK, *, server: str
) -> Iterator[list[dict[str, Any]]]:
    """The stored RiskAssessments or Provenances of `server`'s patients (with their versions),
    stored at or after `since`, in id order, a batch at a time (an export never holds them all)."""
    c = _EMITTED.c
    last = ""
    conn = session.connection()
    while True:
        query = select(c.id, c.body, c.version_id).where(c.server == server, c.resource_type == rtype, c.id > last)
        if since is not None:
            query = query.where(c.updated >= utc(since))
        rows = conn.execute(query.order_by(c.id).limit(batch)).all()
        if not rows:
            return
        yield [_versioned(r.body, r.version_id) for r in rows]
        last = rows[-1].id
