"""The reconciliation poll: the safety net for lost notifications.

`reconcile_once` asks, for every watched patient, whether anything changed since its checkpoint
(`_lastUpdated=gt<checkpoint>`) and syncs those that did (`sync_patients`, service/ehr/sync.py:
read, store, evaluate, enqueue the write-back).
The checkpoints live in the `watched_patient` table, so a restart resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from datetime import datetime

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Engine
from sqlmodel import Session, select

from ..codebook import Codebook
from ..config.settings import Settings
from ..observe.logs import request_context
from ..observe.metrics import POLL_CHANGED, POLL_LAST_PASS
from ..storage.models import WatchedPatient
from . import server_config
from .client import EhrError, FhirClient
from .sync import high_water, instant_key, observation_codes, sync_patients

log = logging.getLogger("iectox.poll")


def watched(engine: Engine, target: str) -> list[WatchedPatient]:
    with Session(engine) as session:
        return list(session.exec(select(WatchedPatient).where(WatchedPatient.target == target)))


async def reconcile_once(
    client: FhirClient,
    engine: Engine,
    target: str,
    codebook: Codebook,
    settings: Settings,
    clock: Callable[[], datetime],
) -> int:
    """One pass over the watched patients of `target`. Returns how many had changes."""
    codes = observation_codes(codebook)
    changed: list[str] = []
    for row in await run_in_threadpool(watched, engine, target):
        since = row.checkpoint or None
        delta = await client.patient_data(row.patient_id, observation_codes=codes, last_updated_gt=since)
        # The Patient is always read; anything else returned is newer than the checkpoint.
        newer = [r for r in delta if r.get("resourceType") != "Patient"]
        mark = high_water(r for r in delta if r.get("resourceType") == "Patient")
        if newer or not since or (mark is not None and instant_key(mark) > instant_key(since)):
            changed.append(row.patient_id)
    if changed:
        await sync_patients(client, engine, target, changed, codebook, settings, clock)
    log.info("reconcile %s: %d watched patients changed", target, len(changed))
    POLL_CHANGED.inc(len(changed))
    POLL_LAST_PASS.set(clock().timestamp())
    return len(changed)


async def run_poll(
    settings: Settings, engine: Engine, codebook: Codebook, clock: Callable[[], datetime], *, once: bool
) -> int:
    """`iectox poll`: reconcile the watched patients every `poll_interval_s` (or once)."""
    target = settings.subscription_target
    try:
        server = server_config(settings, target)
    except KeyError:
        log.error("poll: no EHR server %r configured (IECTOX_EHR_SERVERS)", target)
        return 2
    async with FhirClient(server) as client:
        while True:
            try:
                with request_context(f"poll-{uuid.uuid4().hex}"):  # its evaluations' outbox rows carry it
                    await reconcile_once(client, engine, target, codebook, settings, clock)
            except EhrError as exc:  # the EHR is down: try again next pass
                log.warning("poll: EHR read failed (%s)", type(exc).__name__)
                if once:
                    return 1
            if once:
                return 0
            await asyncio.sleep(settings.poll_interval_s)
