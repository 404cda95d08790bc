"""`iectox worker`: deliver the outbox to the EHR FHIR server (docs/writeback.md).

Loop: claim due rows (lease committed first), POST each row's transaction Bundle to its
target outside any database transaction, then mark the row delivered, or count the failed
attempt and back off (exponential, with jitter), or dead-letter it. A worker killed
mid-delivery leaves its rows leased; when the lease expires any worker delivers them again,
which the conditional updates make harmless.

Retry layering: the FHIR client is built with no retries of its own for deliveries
(`max_retries=0`), so one attempt here is one POST and all retrying is the outbox's: durable,
counted in `attempts`, visible in `/metrics`, and it survives restarts.

Logs carry row ids, counts, status codes and error classes; never patient ids or content.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from ..config.clock import utc_now
from ..config.settings import Settings
from ..observe.logs import request_context
from ..observe.metrics import DELIVERIES
from ..storage import outbox
from .errors import FhirAuthError, FhirHttpError

if TYPE_CHECKING:
    from .client import FhirClient

log = logging.getLogger("iectox.worker")

# 4xx answers that can succeed later without changing the Bundle: auth (token expired or being
# fixed), no transaction endpoint at this URL (404, 405: configuration), timeout, conflicts of
# concurrent writers, locked, too early, throttled. Any other 4xx rejects the Bundle itself
# (400, 410, 413, 422, ...): it is dead-lettered at once.
RETRYABLE_4XX = frozenset({401, 403, 404, 405, 408, 409, 412, 423, 425, 429})
PURGE_EVERY_S = 300.0


class EntryFailed(Exception):
    """The server answered the transaction 2xx but an entry was not written (batch semantics)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"entry status {status}")
        self.status = status


class BadResponse(Exception):
    """The answer to a transaction is not a transaction-response Bundle."""


def _status_of(entry: Mapping[str, Any]) -> int:
    raw = str((entry.get("response") or {}).get("status") or "")
    head = raw.split(" ", 1)[0]
    return int(head) if head.isdigit() else 0


def check_response(request: Mapping[str, Any], response: Any) -> None:
    """Every entry of the transaction-response is 2xx (a server may answer 200 and fail entries)."""
    if not isinstance(response, dict) or response.get("resourceType") != "Bundle":
        raise BadResponse("not a Bundle")
    entries = response.get("entry") or []
    if len(entries) != len(request.get("entry") or []):
        raise BadResponse("entry count differs")
    for e in entries:
        status = _status_of(e if isinstance(e, dict) else {})
        if not 200 <= status < 300:
            raise EntryFailed(status)


def classify(exc: BaseException) -> tuple[str, bool]:
    """(last_error, retryable). Status codes and class names only: messages may carry clinical text.

    Only a rejection of the Bundle itself (a 4xx answer to the transaction, or to one of its
    entries, other than RETRYABLE_4XX) is not retryable. Authorization and configuration
    failures are retried: they hold for every row alike and are fixed outside the Bundle.
    """
    if isinstance(exc, EntryFailed):
        st = exc.status
        return f"entry HTTP {st}", not 400 <= st < 500 or st in RETRYABLE_4XX
    if isinstance(exc, FhirAuthError):
        return f"auth HTTP {exc.status}", True
    if isinstance(exc, FhirHttpError):
        st = exc.status
        return f"HTTP {st}", exc.retryable or not 400 <= st < 500 or st in RETRYABLE_4XX
    cause = exc.__cause__ or exc.__context__
    name = type(exc).__name__
    return (f"{name} ({type(cause).__name__})" if cause is not None else name), True


def backoff_s(attempts: int, settings: Settings, rng: Callable[[], float] = random.random) -> float:
    """Delay after the `attempts`-th failure: base * 2^(attempts-1), capped, minus up to `jitter` of it."""
    delay = min(settings.outbox_backoff_max_s, settings.outbox_backoff_base_s * 2 ** min(attempts - 1, 60))
    return float(delay * (1 - settings.outbox_backoff_jitter * rng()))


@dataclass
class Totals:
    delivered: int = 0
    retried: int = 0
    dead: int = 0
    lost_lease: int = 0
    claimed: int = 0
    cycles: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, other: Totals) -> None:
        self.delivered += other.delivered
        self.retried += other.retried
        self.dead += other.dead
        self.lost_lease += other.lost_lease
        self.claimed += other.claimed
        self.cycles += other.cycles
        self.errors += other.errors


def delivery_client(settings: Settings, target: str) -> FhirClient:
    """A FHIR client for `target` without client-side retries (the outbox retries)."""
    from . import server_config
    from .client import FhirClient

    server = server_config(settings, target)
    if "max_retries" in type(server).model_fields:
        server = server.model_copy(update={"max_retries": 0})
    return FhirClient(server)


class Worker:
    """Delivers outbox rows of the configured targets. Several may run at once (docs/writeback.md)."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        clients: Mapping[str, FhirClient] | None = None,
        clock: Callable[[], datetime] = utc_now,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.settings, self.engine, self.clock, self.rng = settings, engine, clock, rng
        self._own = clients is None
        self.clients: dict[str, FhirClient] = (
            {name: delivery_client(settings, name) for name in settings.ehr_servers}
            if clients is None
            else dict(clients)
        )
        self.targets = sorted(self.clients)
        self._last_purge = float("-inf")

    async def aclose(self) -> None:
        if self._own:
            for c in self.clients.values():
                await c.aclose()

    async def __aenter__(self) -> Worker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- one cycle ---------------------------------------------------------------------------

    async def cycle(self) -> Totals:
        """Claim up to a batch of due rows, deliver them concurrently, mark each."""
        s = self.settings
        claims = await asyncio.to_thread(
            outbox.claim, self.engine, self.clock(), s.outbox_lease_s, s.outbox_batch_size, self.targets
        )
        totals = Totals(claimed=len(claims), cycles=1)
        for result in await asyncio.gather(*(self._deliver(c) for c in claims)):
            kind, error = result
            setattr(totals, kind, getattr(totals, kind) + 1)
            DELIVERIES.labels(kind).inc()
            if error:
                totals.errors.append(error)
        if claims:
            self._log_cycle(totals)
        return totals

    async def _deliver(self, c: outbox.Claim) -> tuple[str, str]:
        with request_context(c.request_id or f"outbox-{c.id}"):
            return await self._deliver_row(c)

    async def _deliver_row(self, c: outbox.Claim) -> tuple[str, str]:
        try:
            bundle = orjson.loads(c.body)
            response = await self.clients[c.target].transaction(bundle)
            check_response(bundle, response)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return await self._failed(c, exc)
        ok = await asyncio.to_thread(outbox.mark_delivered, self.engine, c, self.clock())
        return ("delivered", "") if ok else ("lost_lease", "")

    async def _failed(self, c: outbox.Claim, exc: Exception) -> tuple[str, str]:
        error, retryable = classify(exc)
        attempts = c.attempts + 1
        dead = not retryable or attempts >= self.settings.outbox_max_attempts
        next_at = None if dead else self.clock() + timedelta(seconds=backoff_s(attempts, self.settings, self.rng))
        ok = await asyncio.to_thread(outbox.mark_failed, self.engine, c, error, next_at)
        if not ok:
            return "lost_lease", error
        if dead:
            log.warning("outbox row %d dead-lettered after %d attempt(s): %s", c.id, attempts, error)
            return "dead", error
        log.info(
            "outbox row %d attempt %d failed: %s; retry in %.1fs",
            c.id,
            attempts,
            error,
            (next_at - self.clock()).total_seconds() if next_at else 0.0,
        )
        return "retried", error

    def _log_cycle(self, t: Totals) -> None:
        with Session(self.engine) as session:
            st = outbox.stats(session, self.clock())
        log.info(
            "outbox cycle: claimed=%d delivered=%d retried=%d dead=%d lost_lease=%d | "
            "pending=%d dead_total=%d oldest_pending_s=%.0f",
            t.claimed,
            t.delivered,
            t.retried,
            t.dead,
            t.lost_lease,
            st.pending,
            st.dead,
            st.oldest_pending_age_s,
        )

    def purge(self, force: bool = False) -> int:
        """Delete delivered rows past the retention (at most every few minutes unless forced)."""
        now_mono = time.monotonic()
        if not force and now_mono - self._last_purge < PURGE_EVERY_S:
            return 0
        self._last_purge = now_mono
        before = self.clock() - timedelta(hours=self.settings.outbox_keep_delivered_hours)
        n = outbox.purge_delivered(self.engine, before)
        if n:
            log.info("outbox: purged %d delivered row(s)", n)
        return n

    # --- loops -------------------------------------------------------------------------------

    async def drain(self) -> Totals:
        """Cycle until no row is due (rows backing off are left for later), then return."""
        totals = Totals()
        while True:
            t = await self.cycle()
            totals.add(t)
            if t.claimed == 0:
                break
        await asyncio.to_thread(self.purge, True)
        return totals

    async def run(self, stop: asyncio.Event) -> Totals:
        """Cycle until `stop` is set; sleeps the poll interval when a cycle found less than a batch."""
        totals = Totals()
        while not stop.is_set():
            try:
                t = await self.cycle()
                await asyncio.to_thread(self.purge)
            except SQLAlchemyError as exc:  # database down: leased rows come back after the lease
                log.error(
                    "outbox: database error %s; retrying in %.1fs",
                    type(exc).__name__,
                    self.settings.outbox_poll_interval_s,
                )
                t = Totals(cycles=1)
            totals.add(t)
            if t.claimed >= self.settings.outbox_batch_size:
                continue  # more may be due: no sleep
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.settings.outbox_poll_interval_s)
        return totals


def _check_targets(settings: Settings, engine: Engine) -> list[str]:
    problems = []
    if settings.writeback_target is not None and settings.writeback_target not in settings.ehr_servers:
        problems.append(f"IECTOX_WRITEBACK_TARGET {settings.writeback_target!r} is not in IECTOX_EHR_SERVERS")
    for name, server in settings.ehr_servers.items():
        # A delivery still running (or orphaned by a killed worker) when its lease expires may
        # run next to a re-delivery of the same row: keep the lease above one request's time.
        if settings.outbox_lease_s <= server.timeout_s + server.connect_timeout_s:
            log.warning(
                "outbox_lease_s (%.1fs) is not above the request timeout of target %r (%.1fs + %.1fs connect)",
                settings.outbox_lease_s,
                name,
                server.timeout_s,
                server.connect_timeout_s,
            )
    unknown = sorted(set(outbox.pending_targets(engine)) - set(settings.ehr_servers))
    for name in unknown:
        log.warning("outbox: pending rows for target %r, which IECTOX_EHR_SERVERS does not configure", name)
    return problems


async def main(settings: Settings, engine: Engine, *, once: bool = False) -> int:
    """The `iectox worker` process: SIGTERM/SIGINT finish the current cycle, then exit 0."""
    problems = _check_targets(settings, engine)
    if problems:
        for p in problems:
            log.error("worker: %s", p)
        return 2
    if not settings.ehr_servers:
        log.error("worker: no EHR server configured (IECTOX_EHR_SERVERS)")
        return 2
    async with Worker(settings, engine) as worker:
        if once:
            t = await worker.drain()
        else:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            with Session(engine) as session:
                st = outbox.stats(session, utc_now())
            log.info(
                "worker: started for target(s) %s | pending=%d dead_total=%d",
                ", ".join(worker.targets),
                st.pending,
                st.dead,
            )
            t = await worker.run(stop)
            log.info("worker: stopping")
    with Session(engine) as session:
        st = outbox.stats(session, utc_now())
    log.info(
        "worker: done: delivered=%d retried=%d dead=%d | pending=%d dead_total=%d",
        t.delivered,
        t.retried,
        t.dead,
        st.pending,
        st.dead,
    )
    return 0
