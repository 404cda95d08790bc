"""Outbox queries: enqueue (in the caller's transaction), claim with a lease, mark, count.

Claiming is safe with several workers at once, on both databases:
- PostgreSQL: `SELECT ... FOR UPDATE SKIP LOCKED` picks rows no other worker is claiming, and
  the lease (`claimed_until`) is committed before any delivery starts;
- SQLite (one writer at a time): the same code; the claim `UPDATE` re-checks that the row is
  still unclaimed, so of two workers that read the same row only one gets it.
A row is claimable when it is pending, due (`next_attempt_at <= now`), not under a live lease,
and no older pending row of the same patient and target exists: a patient's evaluations are
delivered one at a time, in order, so an older Bundle never overwrites a newer one.
Marking is fenced by the lease: a worker whose lease expired (another worker took the row
over) changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Engine, and_, delete, func, or_, update
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from .models import OutboxRow, utc

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"
CLAIM_ROUNDS = 3  # SQLite: reads again after losing rows to another worker
STATUSES = (PENDING, DELIVERED, DEAD)


@dataclass(frozen=True)
class Claim:
    id: int
    target: str
    body: bytes
    attempts: int  # failed deliveries before this one
    lease: datetime  # claimed_until as written: the fencing token for marking
    request_id: str = ""  # the request (or poll pass) whose evaluation this row delivers


@dataclass(frozen=True)
class OutboxStats:
    pending: int
    delivered: int
    dead: int
    claimed: int  # pending rows under a live lease (being delivered)
    oldest_pending_age_s: float  # 0 when nothing is pending


def enqueue(
    session: Session, patient_id: str, target: str, bundle: dict[str, Any], now: datetime, request_id: str = ""
) -> None:
    """Add a pending row in the caller's transaction (no commit: the request commits)."""
    now = utc(now)
    session.add(
        OutboxRow(
            request_id=request_id[:128],
            patient_id=patient_id,
            target=target,
            body=orjson.dumps(bundle),
            status=PENDING,
            attempts=0,
            next_attempt_at=now,
            claimed_until=None,
            last_error="",
            created_at=now,
        )
    )


def _unleased(now: datetime) -> Any:
    return or_(col(OutboxRow.claimed_until).is_(None), col(OutboxRow.claimed_until) <= now)


def claim(engine: Engine, now: datetime, lease_s: float, limit: int, targets: list[str]) -> list[Claim]:
    """Claim up to `limit` due rows for `targets` and commit their lease before returning."""
    if not targets or limit < 1:
        return []
    now = utc(now)
    until = now + timedelta(seconds=lease_s)
    older = aliased(OutboxRow)
    blocked = (
        select(older.id)
        .where(
            older.target == OutboxRow.target,
            older.patient_id == OutboxRow.patient_id,
            older.status == PENDING,
            col(older.id) < col(OutboxRow.id),
        )
        .exists()
    )
    claimed: list[Claim] = []
    for _ in range(CLAIM_ROUNDS):
        query = (
            select(OutboxRow.id)
            .where(
                col(OutboxRow.status) == PENDING,
                col(OutboxRow.target).in_(targets),
                col(OutboxRow.next_attempt_at) <= now,
                _unleased(now),
                ~blocked,
            )
            .order_by(col(OutboxRow.id))
            .limit(limit - len(claimed))
            .with_for_update(skip_locked=True)
        )
        lost = 0
        with Session(engine) as session:
            ids = [i for i in session.exec(query).all() if i is not None]
            for rid in ids:
                result = session.exec(
                    update(OutboxRow)
                    .where(col(OutboxRow.id) == rid, col(OutboxRow.status) == PENDING, _unleased(now))
                    .values(claimed_until=until)
                )
                if result.rowcount != 1:
                    lost += 1  # SQLite: another worker claimed it between our read and our write
                    continue
                row = session.get(OutboxRow, rid)
                assert row is not None
                claimed.append(Claim(rid, row.target, row.body, row.attempts, until, row.request_id))
            session.commit()
        if not lost or len(claimed) >= limit:
            break  # else read again: rows another worker took may have hidden others that are due
    return claimed


def _fenced(session: Session, c: Claim, **values: Any) -> bool:
    result = session.exec(
        update(OutboxRow)
        .where(col(OutboxRow.id) == c.id, col(OutboxRow.status) == PENDING, col(OutboxRow.claimed_until) == c.lease)
        .values(**values)
    )
    return bool(result.rowcount == 1)


def mark_delivered(engine: Engine, c: Claim, now: datetime) -> bool:
    """False when the lease was lost (another worker owns the row now; it delivers it again)."""
    with Session(engine) as session:
        ok = _fenced(session, c, status=DELIVERED, delivered_at=utc(now), claimed_until=None, last_error="")
        session.commit()
    return ok


def mark_failed(engine: Engine, c: Claim, error: str, next_attempt_at: datetime | None) -> bool:
    """One more failed attempt: back off until `next_attempt_at`, or dead-letter when it is None."""
    values: dict[str, Any] = {"attempts": c.attempts + 1, "claimed_until": None, "last_error": error[:200]}
    if next_attempt_at is None:
        values["status"] = DEAD
    else:
        values["next_attempt_at"] = utc(next_attempt_at)
    with Session(engine) as session:
        ok = _fenced(session, c, **values)
        session.commit()
    return ok


def stats(session: Session, now: datetime) -> OutboxStats:
    now = utc(now)
    by_status = dict.fromkeys(STATUSES, 0)
    for status, n in session.exec(select(OutboxRow.status, func.count()).group_by(col(OutboxRow.status))).all():
        by_status[status] = int(n)
    claimed = session.exec(
        select(func.count())
        .select_from(OutboxRow)
        .where(
            col(OutboxRow.status) == PENDING,
            col(OutboxRow.claimed_until).is_not(None),
            col(OutboxRow.claimed_until) > now,
        )
    ).one()
    oldest = session.exec(select(func.min(OutboxRow.created_at)).where(col(OutboxRow.status) == PENDING)).one()
    age = max(0.0, (now - utc(oldest)).total_seconds()) if oldest is not None else 0.0
    return OutboxStats(by_status[PENDING], by_status[DELIVERED], by_status[DEAD], int(claimed), age)


def purge_delivered(engine: Engine, before: datetime) -> int:
    """Delete delivered rows delivered before `before` (they hold clinical content)."""
    with Session(engine) as session:
        result = session.exec(
            delete(OutboxRow).where(and_(col(OutboxRow.status) == DELIVERED, col(OutboxRow.delivered_at) < utc(before)))
        )
        session.commit()
    return int(result.rowcount or 0)


def requeue_dead(engine: Engine, now: datetime) -> int:
    """Dead rows back to pending, due now, attempts reset (after the cause was fixed)."""
    with Session(engine) as session:
        result = session.exec(
            update(OutboxRow)
            .where(col(OutboxRow.status) == DEAD)
            .values(status=PENDING, attempts=0, next_attempt_at=utc(now), claimed_until=None)
        )
        session.commit()
    return int(result.rowcount or 0)


def pending_targets(engine: Engine) -> list[str]:
    """Targets that have pending rows (to warn about rows no configured server will take)."""
    with Session(engine) as session:
        return list(session.exec(select(OutboxRow.target).where(col(OutboxRow.status) == PENDING).distinct()).all())
