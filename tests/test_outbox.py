"""The write-back outbox over both databases: enqueue in the request's transaction, the
transaction Bundle, claiming (leases, SKIP LOCKED, per-patient order), fenced marking, metrics.

Delivery to a real FHIR server is in tests/test_worker.py.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote

import httpx
import orjson
import pytest
from fhir.resources.R4B.bundle import Bundle
from sqlalchemy import Engine, func
from sqlmodel import Session, col, select

from service.config.ehr import FhirServerConfig
from service.config.settings import Settings
from service.fhir.writeback import conditional_url, search_escape, transaction_bundles, writeback_id_system
from service.storage import outbox
from service.storage.models import EmittedResource, OutboxRow
from tests import factories as f
from tests.auth import bearer as client_headers
from tests.fhir_validators import assert_valid_fhir

AT = "2026-01-06T12:00:00+00:00"
T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
BASE = f.BASE


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # a configured target (never called here: the worker tests deliver)
    return settings.model_copy(
        update={
            "writeback_target": "ehr",
            "ehr_servers": {"ehr": FhirServerConfig(base_url="https://ehr.iectox.test/fhir")},
        }
    )


def resources(pid: str = "p1") -> list[dict[str, Any]]:
    ref = f"Patient/{pid}"
    return [
        f.patient(pid),
        f.administration(f.local("cart-infusion"), at="2026-01-03T10:00:00+00:00", status="completed",
                         id=f"{pid}-cart", subject=ref),
        f.temperature(38.6, "2026-01-06T10:00:00+00:00", id=f"{pid}-t1", subject=ref),
        f.bp_panel(85, 60, "2026-01-06T10:00:00+00:00", id=f"{pid}-bp1", subject=ref),
        f.ice_score(8, "2026-01-06T10:00:00+00:00", id=f"{pid}-ice1", subject=ref),
    ]  # fmt: skip


def transaction(res: list[dict[str, Any]]) -> bytes:
    entries = [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in res]
    return orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries})


def rows(engine: Engine) -> list[OutboxRow]:
    with Session(engine) as s:
        return list(s.exec(select(OutboxRow).order_by(col(OutboxRow.id))).all())


def emitted_count(engine: Engine) -> int:
    with Session(engine) as s:
        return int(s.exec(select(func.count()).select_from(EmittedResource)).one())


async def store_and_evaluate(client: httpx.AsyncClient, pid: str = "p1", at: str = AT) -> dict[str, Any]:
    assert (await client.post("/fhir", content=transaction(resources(pid)))).status_code == 200
    r = await client.post(f"/fhir/Patient/{pid}/$evaluate", params={"at": at})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


# --- enqueue ------------------------------------------------------------------------------------


def bundle_entries(engine: Engine) -> list[dict[str, Any]]:
    return [e for r in rows(engine) for e in orjson.loads(r.body)["entry"]]


def local_assessments(evaluation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        e["resource"]["id"]: e["resource"]
        for e in evaluation["entry"]
        if e["resource"]["resourceType"] == "RiskAssessment"
    }


def app_client(settings: Settings, engine: Engine, **overrides: Any) -> httpx.AsyncClient:
    from service.api.app import create_app

    app = create_app(settings.model_copy(update=overrides), engine=engine)
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://iectox.test", headers=dict(client_headers())
    )


def assert_conditional_entry(e: dict[str, Any], local: dict[str, dict[str, Any]]) -> str:
    """A conditional update of one stored RiskAssessment; returns its local (deterministic) id."""
    res = e["resource"]
    rid = e["fullUrl"].removeprefix("urn:uuid:")
    system = writeback_id_system(BASE)
    assert "id" not in res and "meta" not in res  # the server keeps or assigns its own
    # as stored, without our meta and id, plus the write-back identifier (its deterministic id)
    expected = {k: v for k, v in local[rid].items() if k not in ("meta", "id")}
    expected["identifier"] = [*local[rid]["identifier"], {"system": system, "value": rid}]
    assert res == expected
    assert e["request"]["method"] == "PUT"
    path, query = e["request"]["url"].split("?", 1)
    assert path == "RiskAssessment" and query.startswith("identifier=")
    assert unquote(query.removeprefix("identifier=")) == f"{system}|{rid}"
    assert "/" not in query and ":" not in query and "|" not in query  # URL-encoded
    return rid


@pytest.mark.asyncio
async def test_stored_evaluation_enqueues_conditional_bundles_of_at_most_8(
    client: httpx.AsyncClient, clean_engine: Engine
) -> None:
    # The default: mode "conditional", at most 8 entries per Bundle (Medplum's limit for
    # transactions with conditional entries), each Bundle with a Provenance for its own entries.
    evaluation = await store_and_evaluate(client)
    local = local_assessments(evaluation)
    [local_prov] = [e["resource"] for e in evaluation["entry"] if e["resource"]["resourceType"] == "Provenance"]
    table = rows(clean_engine)
    assert len(table) == -(-len(local) // 7) > 1
    assert all(
        (r.patient_id, r.target, r.status, r.attempts, r.last_error) == ("p1", "ehr", "pending", 0, "") for r in table
    )
    assert all(r.claimed_until is None and r.delivered_at is None for r in table)
    bundles = [orjson.loads(r.body) for r in table]
    written: list[str] = []
    for n, bundle in enumerate(bundles):
        assert bundle["type"] == "transaction" and 2 <= len(bundle["entry"]) <= 8
        *ra_entries, prov_entry = bundle["entry"]
        ids = [assert_conditional_entry(e, local) for e in ra_entries]
        written += ids
        prov = prov_entry["resource"]
        assert prov["id"] == str(uuid.uuid5(uuid.NAMESPACE_URL, f"{local_prov['id']}/part/{n}"))
        assert prov_entry["fullUrl"] == f"urn:uuid:{prov['id']}"
        assert prov_entry["request"] == {"method": "PUT", "url": f"Provenance/{prov['id']}"}
        assert prov == {
            **{k: v for k, v in local_prov.items() if k != "meta"},
            "id": prov["id"],
            "target": prov["target"],
        }
        # exactly this Bundle's RiskAssessments, as fullUrls the server rewrites
        assert sorted(t["reference"] for t in prov["target"]) == sorted(e["fullUrl"] for e in ra_entries)
        Bundle.model_validate(bundle)
    assert all(len(b["entry"]) == 8 for b in bundles[:-1])
    assert written == list(local)  # every RiskAssessment once, in the evaluation's order
    assert_valid_fhir(bundles)


@pytest.mark.asyncio
async def test_conditional_mode_in_one_bundle_keeps_the_provenance_id(clean_engine: Engine, settings: Settings) -> None:
    async with app_client(settings, clean_engine, writeback_max_bundle_entries=100) as c:
        evaluation = await store_and_evaluate(c)
    [row] = rows(clean_engine)
    bundle = orjson.loads(row.body)
    local = local_assessments(evaluation)
    [local_prov] = [e["resource"] for e in evaluation["entry"] if e["resource"]["resourceType"] == "Provenance"]
    *ra_entries, prov_entry = bundle["entry"]
    assert [assert_conditional_entry(e, local) for e in ra_entries] == list(local)
    prov = prov_entry["resource"]
    assert prov["id"] == local_prov["id"]
    assert prov_entry["request"] == {"method": "PUT", "url": f"Provenance/{prov['id']}"}
    assert sorted(t["reference"] for t in prov["target"]) == sorted(e["fullUrl"] for e in ra_entries)
    Bundle.model_validate(bundle)


@pytest.mark.asyncio
async def test_id_mode_bundle(clean_engine: Engine, settings: Settings) -> None:
    async with app_client(settings, clean_engine, writeback_mode="id", writeback_max_bundle_entries=100) as c:
        evaluation = await store_and_evaluate(c)
    [row] = rows(clean_engine)
    bundle = orjson.loads(row.body)
    assert bundle["type"] == "transaction"
    local = local_assessments(evaluation)
    *ra_entries, prov_entry = bundle["entry"]
    assert len(ra_entries) == len(local)
    system = writeback_id_system(BASE)
    for e in ra_entries:
        res = e["resource"]
        # as stored, without our meta, plus the write-back identifier (its deterministic id)
        expected = {k: v for k, v in local[res["id"]].items() if k != "meta"}
        expected["identifier"] = [*expected["identifier"], {"system": system, "value": res["id"]}]
        assert res == expected
        assert e["request"] == {"method": "PUT", "url": f"RiskAssessment/{res['id']}"}
    prov = prov_entry["resource"]
    assert prov["resourceType"] == "Provenance" and "meta" not in prov
    assert prov_entry["request"] == {"method": "PUT", "url": f"Provenance/{prov['id']}"}
    assert sorted(t["reference"] for t in prov["target"]) == sorted(f"RiskAssessment/{i}" for i in local)
    Bundle.model_validate(bundle)
    assert_valid_fhir([bundle])


@pytest.mark.asyncio
async def test_id_mode_large_evaluations_are_split_in_order_provenance_last(
    clean_engine: Engine, settings: Settings
) -> None:
    async with app_client(settings, clean_engine, writeback_mode="id", writeback_max_bundle_entries=7) as c:
        evaluation = await store_and_evaluate(c)
    bundles = [orjson.loads(r.body) for r in rows(clean_engine)]
    n = len(evaluation["entry"])
    assert len(bundles) == -(-n // 7) > 1
    assert all(len(b["entry"]) == 7 for b in bundles[:-1])
    entries = [e for b in bundles for e in b["entry"]]
    assert [e["resource"]["id"] for e in entries] == [e["resource"]["id"] for e in evaluation["entry"]]
    assert entries[-1]["resource"]["resourceType"] == "Provenance"


@pytest.mark.asyncio
async def test_every_stored_evaluation_enqueues_and_reads_do_not(
    client: httpx.AsyncClient, clean_engine: Engine
) -> None:
    await store_and_evaluate(client)
    per_evaluation = len(rows(clean_engine))
    assert per_evaluation > 1  # several Bundles of at most 8 entries
    await client.post("/fhir/Patient/p1/$evaluate", params={"at": AT})  # re-evaluation: its rows again
    await client.get("/fhir/Patient/p1/$course", params={"at": AT})  # stores nothing
    await client.post("/fhir/$evaluate", content=f.body(*resources()))  # stateless
    await client.post("/fhir/Patient/nobody/$evaluate")  # 404
    table = rows(clean_engine)
    assert [r.patient_id for r in table] == ["p1"] * 2 * per_evaluation
    assert [r.body for r in table[per_evaluation:]] == [r.body for r in table[:per_evaluation]]  # same Bundles


@pytest.mark.asyncio
async def test_a_failed_request_leaves_neither_assessments_nor_outbox_row(
    app: Any, clean_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # the 500 response, not the exception
    client = httpx.AsyncClient(transport=transport, base_url="http://iectox.test", headers=dict(client_headers()))
    assert (await client.post("/fhir", content=transaction(resources()))).status_code == 200
    real = outbox.enqueue

    def enqueue_then_fail(*args: Any, **kwargs: Any) -> None:
        real(*args, **kwargs)
        raise RuntimeError("after the outbox row was added")

    monkeypatch.setattr(outbox, "enqueue", enqueue_then_fail)
    r = await client.post("/fhir/Patient/p1/$evaluate", params={"at": AT})
    assert r.status_code == 500
    assert rows(clean_engine) == [] and emitted_count(clean_engine) == 0
    monkeypatch.setattr(outbox, "enqueue", real)
    r = await client.post("/fhir/Patient/p1/$evaluate", params={"at": AT})
    assert r.status_code == 200
    expected = transaction_bundles([e["resource"] for e in r.json()["entry"]], BASE)
    assert [orjson.loads(row.body) for row in rows(clean_engine)] == expected and len(expected) > 1
    assert emitted_count(clean_engine) > 0
    await client.aclose()


@pytest.mark.asyncio
async def test_no_outbox_without_a_writeback_target(clean_engine: Engine, settings: Settings) -> None:
    from service.api.app import create_app

    app = create_app(settings.model_copy(update={"writeback_target": None}), engine=clean_engine)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://iectox.test", headers=dict(client_headers())
    ) as c:
        await store_and_evaluate(c)
    assert rows(clean_engine) == [] and emitted_count(clean_engine) > 0


def test_search_escaping_and_conditional_url() -> None:
    assert search_escape(r"a|b,c$d\e") == r"a\|b\,c\$d\\e"
    url = conditional_url("RiskAssessment", "https://x.org/id", "Patient/1|m|2026-01-01T00:00:00+00:00")
    assert url == (
        "RiskAssessment?identifier=https%3A%2F%2Fx.org%2Fid%7CPatient%2F1%5C%7Cm%5C%7C2026-01-01T00%3A00%3A00%2B00%3A00"
    )


def test_bundles_strip_local_meta_and_leave_the_evaluation_unchanged() -> None:
    ra = {
        "resourceType": "RiskAssessment",
        "id": "11111111-1111-5111-8111-111111111111",
        "meta": {"versionId": "3"},
        "identifier": [{"system": f"{BASE}/identifier/risk-assessment", "value": "Patient/p|m|c|t"}],
        "status": "final",
        "subject": {"reference": "Patient/p"},
    }
    prov = {
        "resourceType": "Provenance",
        "id": "22222222-2222-5222-8222-222222222222",
        "meta": {"versionId": "3"},
        "target": [{"reference": f"RiskAssessment/{ra['id']}"}],
        "recorded": "2026-01-01T00:00:00+00:00",
        "agent": [{"who": {"display": "iectox"}}],
    }
    before = orjson.dumps([ra, prov])
    [by_id] = transaction_bundles([ra, prov], BASE, mode="id")
    [cond] = transaction_bundles([ra, prov], BASE)  # the default: conditional
    assert orjson.dumps([ra, prov]) == before
    assert all("meta" not in e["resource"] for b in (by_id, cond) for e in b["entry"])
    assert by_id["entry"][1]["resource"]["target"] == [{"reference": f"RiskAssessment/{ra['id']}"}]
    assert cond["entry"][1]["resource"]["target"] == [{"reference": f"urn:uuid:{ra['id']}"}]
    assert cond["entry"][1]["resource"]["id"] == prov["id"]  # one Bundle: the Provenance keeps its id
    assert [len(b["entry"]) for b in transaction_bundles([ra, prov], BASE, mode="id", max_entries=1)] == [1, 1]


def test_conditional_bundles_chunk_assessments_with_a_provenance_each() -> None:
    system = f"{BASE}/identifier/risk-assessment"
    ras = [
        {
            "resourceType": "RiskAssessment",
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"ra-{i}")),
            "identifier": [{"system": system, "value": f"Patient/p|m|c{i}|t"}],
            "status": "final",
            "subject": {"reference": "Patient/p"},
        }
        for i in range(16)
    ]
    prov = {
        "resourceType": "Provenance",
        "id": "22222222-2222-5222-8222-222222222222",
        "target": [{"reference": f"RiskAssessment/{r['id']}"} for r in sorted(ras, key=lambda r: r["id"])],
        "recorded": "2026-01-01T00:00:00+00:00",
        "agent": [{"who": {"display": "iectox"}}],
        "entity": [{"role": "source", "what": {"reference": "Observation/o1"}}],
    }
    bundles = transaction_bundles([*ras, prov], BASE)
    assert bundles == transaction_bundles([*ras, prov], BASE)  # stable: re-deliveries and re-evaluations match
    assert [len(b["entry"]) for b in bundles] == [8, 8, 3]  # 7 + 7 + 2 RiskAssessments, a Provenance each
    seen: list[str] = []
    for n, b in enumerate(bundles):
        *ra_entries, p = b["entry"]
        assert all(e["request"]["url"].startswith("RiskAssessment?identifier=") for e in ra_entries)
        seen += [e["fullUrl"].removeprefix("urn:uuid:") for e in ra_entries]
        pid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{prov['id']}/part/{n}"))
        assert (p["fullUrl"], p["request"]) == (f"urn:uuid:{pid}", {"method": "PUT", "url": f"Provenance/{pid}"})
        assert p["resource"]["id"] == pid and p["resource"]["entity"] == prov["entity"]
        assert {t["reference"] for t in p["resource"]["target"]} == {e["fullUrl"] for e in ra_entries}
    assert seen == [r["id"] for r in ras]
    # a larger limit: the chunks follow it; id mode splits at the same size
    assert [len(b["entry"]) for b in transaction_bundles([*ras, prov], BASE, max_entries=9)] == [9, 9]
    assert [len(b["entry"]) for b in transaction_bundles([*ras, prov], BASE, mode="id")] == [8, 8, 1]


# --- claiming -----------------------------------------------------------------------------------


def add_rows(engine: Engine, patients: list[str], now: datetime = T0, target: str = "ehr") -> list[int]:
    with Session(engine) as s:
        for pid in patients:
            outbox.enqueue(s, pid, target, {"resourceType": "Bundle", "type": "transaction", "entry": []}, now)
        s.commit()
    return [r.id for r in rows(engine) if r.id is not None]


@pytest.fixture
def db(clean_engine: Engine) -> Iterator[Engine]:
    yield clean_engine


def test_claim_leases_and_expired_leases_come_back(db: Engine) -> None:
    ids = add_rows(db, ["a", "b", "c"])
    first = outbox.claim(db, T0, 60, 2, ["ehr"])
    assert [c.id for c in first] == ids[:2]
    assert all(c.lease == T0 + timedelta(seconds=60) and c.attempts == 0 for c in first)
    assert [c.id for c in outbox.claim(db, T0, 60, 10, ["ehr"])] == ids[2:]  # leased rows are skipped
    assert outbox.claim(db, T0 + timedelta(seconds=59), 60, 10, ["ehr"]) == []
    again = outbox.claim(db, T0 + timedelta(seconds=61), 60, 10, ["ehr"])  # the leases expired (worker died)
    assert [c.id for c in again] == ids
    # the first owner lost its lease: its marks change nothing, the new owner's do
    assert outbox.mark_delivered(db, first[0], T0) is False
    assert outbox.mark_failed(db, first[1], "HTTP 503", T0) is False
    assert outbox.mark_delivered(db, again[0], T0 + timedelta(seconds=62)) is True
    r = rows(db)[0]
    assert (r.status, r.claimed_until, r.attempts) == ("delivered", None, 0)
    assert r.delivered_at is not None and outbox.utc(r.delivered_at) == T0 + timedelta(seconds=62)


def test_claim_only_due_rows_of_known_targets(db: Engine) -> None:
    add_rows(db, ["a"], target="elsewhere")
    add_rows(db, ["b"], now=T0 + timedelta(minutes=5))
    assert outbox.claim(db, T0, 60, 10, ["ehr"]) == []
    assert outbox.claim(db, T0 + timedelta(minutes=10), 60, 10, []) == []
    [c] = outbox.claim(db, T0 + timedelta(minutes=10), 60, 10, ["ehr"])
    assert c.target == "ehr"


def test_a_patients_rows_go_one_at_a_time_in_order(db: Engine) -> None:
    ids = add_rows(db, ["a", "a", "b", "a"])
    claims = outbox.claim(db, T0, 60, 10, ["ehr"])
    assert [c.id for c in claims] == [ids[0], ids[2]]  # the oldest of each patient only
    # a backing-off row still holds the patient's later rows back (no overtaking)
    assert outbox.mark_failed(db, claims[0], "HTTP 503", T0 + timedelta(minutes=1))
    assert outbox.claim(db, T0 + timedelta(seconds=30), 60, 10, ["ehr"]) == []
    assert outbox.mark_delivered(db, claims[1], T0)
    [c] = outbox.claim(db, T0 + timedelta(minutes=2), 60, 10, ["ehr"])
    assert (c.id, c.attempts) == (ids[0], 1)
    # dead rows do not block
    assert outbox.mark_failed(db, c, "HTTP 422", None)
    assert [c.id for c in outbox.claim(db, T0 + timedelta(minutes=2), 60, 10, ["ehr"])] == [ids[1]]


def test_mark_failed_counts_backs_off_and_dead_letters(db: Engine) -> None:
    add_rows(db, ["a"])
    [c] = outbox.claim(db, T0, 60, 1, ["ehr"])
    assert outbox.mark_failed(db, c, "HTTP 503", T0 + timedelta(seconds=5))
    r = rows(db)[0]
    assert (r.status, r.attempts, r.last_error, r.claimed_until) == ("pending", 1, "HTTP 503", None)
    assert outbox.utc(r.next_attempt_at) == T0 + timedelta(seconds=5)
    [c] = outbox.claim(db, T0 + timedelta(seconds=5), 60, 1, ["ehr"])
    assert c.attempts == 1
    assert outbox.mark_failed(db, c, "HTTP 400", None)
    r = rows(db)[0]
    assert (r.status, r.attempts, r.last_error) == ("dead", 2, "HTTP 400")
    assert outbox.claim(db, T0 + timedelta(days=1), 60, 1, ["ehr"]) == []
    assert outbox.requeue_dead(db, T0 + timedelta(days=1)) == 1
    r = rows(db)[0]
    assert (r.status, r.attempts) == ("pending", 0)


def test_stats_purge_and_metrics_text(db: Engine) -> None:
    from service.api.metrics import render

    add_rows(db, ["a", "b", "c", "d"])
    add_rows(db, ["e"], now=T0 + timedelta(minutes=1))
    a, b, _, _ = outbox.claim(db, T0, 60, 4, ["ehr"])
    outbox.mark_delivered(db, a, T0)
    outbox.mark_failed(db, b, "HTTP 422", None)
    with Session(db) as s:
        st = outbox.stats(s, T0 + timedelta(seconds=30))
    # c and d are still leased (being delivered); e is pending, not leased
    assert (st.pending, st.delivered, st.dead, st.claimed) == (3, 1, 1, 2)
    assert st.oldest_pending_age_s == 30.0
    text = render(st)
    assert 'iectox_outbox_rows{status="pending"} 3\n' in text
    assert 'iectox_outbox_rows{status="dead"} 1\n' in text
    assert "iectox_outbox_oldest_pending_age_seconds 30.000\n" in text
    assert outbox.purge_delivered(db, T0) == 0
    assert outbox.purge_delivered(db, T0 + timedelta(seconds=1)) == 1
    with Session(db) as s:
        assert outbox.stats(s, T0).delivered == 0


@pytest.mark.asyncio
async def test_metrics_endpoint(client: httpx.AsyncClient, clean_engine: Engine) -> None:
    empty = await client.get("/metrics")
    assert empty.status_code == 200 and empty.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "iectox_outbox_oldest_pending_age_seconds 0.000" in empty.text
    await store_and_evaluate(client)
    body = (await client.get("/metrics")).text
    assert f'iectox_outbox_rows{{status="pending"}} {len(rows(clean_engine))}\n' in body
    assert "p1" not in body


# --- several workers at once --------------------------------------------------------------------


def test_postgres_skip_locked_claims_disjoint_rows(db: Engine) -> None:
    if db.dialect.name != "postgresql":
        pytest.skip("SKIP LOCKED is PostgreSQL's; SQLite is covered by the concurrent claim test")
    ids = add_rows(db, [f"p{i}" for i in range(6)])
    # Worker A is between its claim SELECT and its commit: it holds row locks on the first 3 rows.
    with Session(db) as a:
        locked = a.exec(
            select(OutboxRow.id).order_by(col(OutboxRow.id)).limit(3).with_for_update(skip_locked=True)
        ).all()
        assert list(locked) == ids[:3]
        # Worker B does not wait for A and does not get A's rows.
        got = [c.id for c in outbox.claim(db, T0, 60, 10, ["ehr"])]
        assert got == ids[3:]
        a.rollback()
    assert [c.id for c in outbox.claim(db, T0, 60, 10, ["ehr"])] == ids[:3]


def test_concurrent_claimers_never_share_a_row(db: Engine) -> None:
    ids = add_rows(db, [f"p{i}" for i in range(40)])
    got: dict[int, list[int]] = {n: [] for n in range(4)}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def claimer(n: int) -> None:
        try:
            start.wait()
            while batch := outbox.claim(db, T0, 600, 3, ["ehr"]):
                got[n] += [c.id for c in batch]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    claimed = [i for n in got for i in got[n]]
    assert sorted(claimed) == ids  # every row claimed exactly once
