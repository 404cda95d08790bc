"""Async client for an EHR's FHIR R4 server: read, search with paging, patient data, transactions.

* Auth: SMART Backend Services (``service.ehr.smart``) when the server config has a client_id
  and a key; a CDS Hooks ``fhirAuthorization`` access token passed as ``token=`` is used as is;
  otherwise no Authorization header (open servers).
* Retries: connect errors, timeouts, dropped connections, 429 and 5xx (except 501/505) are
  retried up to ``max_retries`` times. The delay is the server's ``Retry-After`` (seconds or an
  HTTP date) when it sends one (more than ``retry_after_max_s`` -> give up at once), else
  exponential backoff with full jitter: ``uniform(0, min(backoff_max_s, backoff_base_s * 2**n))``.
  Any other 4xx is raised at once (``FhirHttpError(retryable=False)`` with the OperationOutcome).
  A retried POST can run twice on the server when the first attempt timed out after the
  server had processed it: write transactions should be idempotent (conditional update, or
  ``ifNoneExist``), as the write-back Bundles are.
* Logs: method, resource type, status and attempt counts only; never ids, URLs or bodies.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlencode, urljoin, urlsplit

import httpx
import orjson

from ..config.ehr import DEFAULT_SCOPE, FhirServerConfig
from ..fhir.ingest import FHIR_ID
from ..observe.traces import span
from .errors import EhrError, FhirAuthError, FhirConfigError, FhirHttpError, FhirUnavailable
from .smart import SmartBackendAuth, TokenCache

__all__ = [
    "DEFAULT_SCOPE",
    "EhrError",
    "FhirAuthError",
    "FhirClient",
    "FhirConfigError",
    "FhirHttpError",
    "FhirServerConfig",
    "FhirUnavailable",
    "TokenCache",
    "parse_retry_after",
]

log = logging.getLogger("iectox.ehr")

_TYPE_RE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_INSTANT_RE = re.compile(r"^\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$")
_RETRYABLE_EXC = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or HTTP-date), None if absent/bad."""
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


MEDICATION_IDS_PER_SEARCH = 50  # ids per `Medication?_id=a,b,...` search (keeps the URL short)


def _check_type(rtype: str) -> None:
    if not _TYPE_RE.match(rtype):
        raise ValueError("invalid resource type")


def _check_id(rid: str) -> None:
    if not FHIR_ID.fullmatch(rid):
        raise ValueError("invalid resource id")


def _fhir_instant(value: datetime) -> str:
    if value.tzinfo is None:
        raise ValueError("datetimes sent to the FHIR server must be timezone-aware")
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _json_or_none(resp: httpx.Response) -> Any:
    try:
        return orjson.loads(resp.content) if resp.content else None
    except orjson.JSONDecodeError:
        return None


def _outcome(body: Any) -> dict[str, Any] | None:
    return body if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome" else None


def _query_items(params: Mapping[str, str | list[str]]) -> list[tuple[str, str]]:
    items: list[tuple[str, str]] = []
    for key, value in params.items():
        for v in [value] if isinstance(value, str) else value:
            items.append((key, v))
    return items


def _ehr_attributes(method: str, rtype: str, attempt: int) -> dict[str, str | int]:
    """An EHR call's span attributes: the method and resource type, never its URL (ids)."""
    return {"http.method": method, "fhir.type": rtype, "attempt": attempt}


class FhirClient:
    """An async FHIR R4 client for one server config.

    ``http``: a shared ``httpx.AsyncClient`` (not closed by ``aclose``); by default the client
    owns one. ``token``: a CDS Hooks ``fhirAuthorization.access_token``, sent as is instead of
    SMART. ``tokens``: a TokenCache shared between clients (default: a private one).
    ``sleep`` / ``rand`` / ``clock`` are injectable for tests (backoff sleeps, jitter source in
    [0, 1), epoch seconds).
    """

    def __init__(
        self,
        server: FhirServerConfig,
        *,
        http: httpx.AsyncClient | None = None,
        token: str | None = None,
        tokens: TokenCache | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.server = server
        self._own_http = http is None
        self._http = http if http is not None else httpx.AsyncClient(follow_redirects=False)
        self._static_token = token
        self._sleep = sleep
        self._rand = rand
        self._clock = clock
        self._auth: SmartBackendAuth | None = None
        if token is None and server.smart:
            cache = tokens if tokens is not None else TokenCache(clock=clock)
            self._auth = SmartBackendAuth(server, cache, clock=clock)
        self._origin = _origin(server.base_url)
        self._timeout = httpx.Timeout(server.timeout_s, connect=server.connect_timeout_s)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    # ---- public API -----------------------------------------------------------------------

    async def read(self, rtype: str, rid: str) -> dict[str, Any] | None:
        """``GET {base}/{rtype}/{rid}``; None on 404 or 410."""
        _check_type(rtype)
        _check_id(rid)
        try:
            resp = await self._send("GET", f"{self.server.base_url}/{rtype}/{rid}", rtype=rtype)
        except FhirHttpError as exc:
            if exc.status in (404, 410):
                return None
            raise
        resource = self._parse(resp, "GET", rtype)
        if not isinstance(resource, dict) or resource.get("resourceType") != rtype:
            raise EhrError(f"GET {rtype}: the response is not a {rtype}")
        return resource

    async def search(self, rtype: str, params: Mapping[str, str | list[str]]) -> list[dict[str, Any]]:
        """Search ``rtype`` and follow ``Bundle.link[next]`` to the end.

        A list value repeats the parameter (AND); OR is a comma inside one value. Returns the
        resources of all entries whose ``search.mode`` is not ``outcome``.
        """
        _check_type(rtype)
        items = _query_items(params)
        if self.server.page_size and not any(k == "_count" for k, _ in items):
            items.append(("_count", str(self.server.page_size)))
        url = f"{self.server.base_url}/{rtype}"
        if len(urlencode(items)) > self.server.max_get_query_chars:
            form: dict[str, list[str]] = {}
            for k, v in items:
                form.setdefault(k, []).append(v)
            resp = await self._send("POST", f"{url}/_search", rtype=rtype, form=lambda: form)
        else:
            resp = await self._send("GET", url, rtype=rtype, params=items)

        results: list[dict[str, Any]] = []
        seen: set[str] = set()
        pages = 0
        while True:
            pages += 1
            bundle = self._parse(resp, "GET", rtype)
            if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
                raise EhrError(f"search {rtype}: the response is not a Bundle")
            outcomes = 0
            for entry in bundle.get("entry") or []:
                if not isinstance(entry, dict):
                    continue
                resource = entry.get("resource")
                mode = (entry.get("search") or {}).get("mode") if isinstance(entry.get("search"), dict) else None
                if mode == "outcome":
                    outcomes += 1
                elif isinstance(resource, dict):
                    results.append(resource)
            if outcomes:
                log.info("fhir search %s: %d outcome entries ignored", rtype, outcomes)
            nxt = next(
                (
                    link.get("url")
                    for link in bundle.get("link") or []
                    if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str)
                ),
                None,
            )
            if not nxt:
                break
            next_url = urljoin(self.server.base_url + "/", nxt)
            if _origin(next_url) != self._origin:
                # Never send the bearer token to another origin.
                raise EhrError(f"search {rtype}: the next-page link points to another server")
            if next_url in seen:
                raise EhrError(f"search {rtype}: the next-page links loop")
            if pages >= self.server.max_pages:
                raise EhrError(f"search {rtype}: more than {self.server.max_pages} pages")
            seen.add(next_url)
            resp = await self._send("GET", next_url, rtype=rtype)
        log.debug("fhir search %s: %d resources in %d pages", rtype, len(results), pages)
        return results

    async def patient_data(
        self,
        patient_id: str,
        *,
        observation_codes: list[str],
        since: datetime | None = None,
        last_updated_gt: str | None = None,
    ) -> list[dict[str, Any]]:
        """The Patient, their Observations with one of ``observation_codes`` ("system|code"
        tokens; an empty list = every Observation) dated ``since`` or later, and all their
        MedicationAdministrations, Conditions and Procedures.

        ``since`` filters Observations only (``date=ge``): a CAR T infusion or a drug started
        before it still matters for grading. ``last_updated_gt`` (a FHIR instant) adds
        ``_lastUpdated=gt...`` to every search, for incremental reads; the Patient is always
        read. A missing Patient is simply absent from the result.
        """
        _check_id(patient_id)
        if last_updated_gt is not None and not _INSTANT_RE.match(last_updated_gt):
            raise ValueError("last_updated_gt must be a FHIR instant")
        common: dict[str, str | list[str]] = {"patient": f"Patient/{patient_id}"}
        if last_updated_gt is not None:
            common["_lastUpdated"] = f"gt{last_updated_gt}"
        observations = dict(common)
        if observation_codes:
            observations["code"] = ",".join(c.replace(",", "\\,") for c in observation_codes)
        if since is not None:
            observations["date"] = f"ge{_fhir_instant(since)}"

        calls: list[Coroutine[Any, Any, Any]] = [
            self.read("Patient", patient_id),
            self.search("Observation", observations),
            self.search("MedicationAdministration", dict(common)),
            self.search("Condition", dict(common)),
            self.search("Procedure", dict(common)),
        ]
        tasks = [asyncio.ensure_future(c) for c in calls]
        try:
            patient, *found = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        out: list[dict[str, Any]] = [patient] if patient is not None else []
        for resources in found:
            out.extend(resources)
        out.extend(await self.referenced_medications(found[1]))
        return out

    async def referenced_medications(self, administrations: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The Medications the administrations reference on this server (relative
        ``Medication/<id>`` or absolute on this base) and do not contain, in one search by
        ``_id``. A reference elsewhere is not followed: grading names it as not resolved."""
        ids: set[str] = set()
        base = self.server.base_url.rstrip("/")
        for ma in administrations:
            ref = (ma.get("medicationReference") or {}).get("reference") if isinstance(ma, dict) else None
            if not isinstance(ref, str):
                continue
            if ref.startswith(base + "/"):
                ref = ref[len(base) + 1 :]
            rtype, _, rid = ref.partition("/")
            if rtype == "Medication" and FHIR_ID.fullmatch(rid):
                ids.add(rid)
        ordered = sorted(ids)
        out: list[dict[str, Any]] = []
        try:
            for i in range(0, len(ordered), MEDICATION_IDS_PER_SEARCH):
                out += await self.search("Medication", {"_id": ",".join(ordered[i : i + MEDICATION_IDS_PER_SEARCH])})
        except FhirHttpError as exc:
            if exc.status not in (401, 403):
                raise
            # Not granted system/Medication.rs: the administrations stay unresolved and grading
            # names each one as left out (never silent); the rest of the patient is still read.
            log.warning("fhir search Medication: HTTP %d (scope system/Medication.rs not granted?)", exc.status)
            return []
        return out

    async def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """POST a transaction (or batch) Bundle to the base; returns the response Bundle."""
        kind = bundle.get("type")
        if bundle.get("resourceType") != "Bundle" or kind not in ("transaction", "batch"):
            raise ValueError("transaction() needs a Bundle of type transaction or batch")
        body = orjson.dumps(bundle)
        resp = await self._send("POST", self.server.base_url, rtype=str(kind), content=body)
        out = self._parse(resp, "POST", str(kind))
        if not isinstance(out, dict) or out.get("resourceType") != "Bundle" or out.get("type") != f"{kind}-response":
            raise EhrError(f"POST {kind}: the response is not a {kind}-response Bundle")
        return out

    # ---- internals ------------------------------------------------------------------------

    def _parse(self, resp: httpx.Response, method: str, rtype: str) -> Any:
        try:
            return orjson.loads(resp.content)
        except orjson.JSONDecodeError as exc:
            raise EhrError(f"{method} {rtype}: the response is not JSON") from exc

    def _backoff(self, attempt: int) -> float:
        cap = min(self.server.backoff_max_s, self.server.backoff_base_s * (2**attempt))
        return self._rand() * cap

    async def _bearer(self) -> str | None:
        if self._static_token is not None:
            return self._static_token
        if self._auth is not None:
            return await self._auth.token(functools.partial(self._send, auth=False))
        return None

    async def _send(
        self,
        method: str,
        url: str,
        *,
        rtype: str,
        params: list[tuple[str, Any]] | None = None,
        content: bytes | None = None,
        form: Callable[[], Mapping[str, str | list[str]]] | None = None,
        auth: bool = True,
    ) -> httpx.Response:
        """One logical request with retries; returns a 2xx response or raises."""
        cfg = self.server
        attempt = 0
        reauthorised = False
        while True:
            headers = {"Accept": "application/fhir+json" if auth else "application/json"}
            token = await self._bearer() if auth else None
            if token:
                headers["Authorization"] = f"Bearer {token}"
            if content is not None:
                headers["Content-Type"] = "application/fhir+json"
            try:
                with span(f"EHR {method} {rtype}", **_ehr_attributes(method, rtype, attempt)):
                    resp = await self._http.request(
                        method,
                        url,
                        params=params,
                        content=content,
                        data=form() if form is not None else None,
                        headers=headers,
                        timeout=self._timeout,
                    )
            except _RETRYABLE_EXC as exc:
                if attempt >= cfg.max_retries:
                    log.warning(
                        "fhir %s %s: %s, giving up after %d attempts", method, rtype, type(exc).__name__, attempt + 1
                    )
                    raise FhirUnavailable(
                        f"{method} {rtype}: {type(exc).__name__} after {attempt + 1} attempts", attempts=attempt + 1
                    ) from exc
                delay = self._backoff(attempt)
                log.warning(
                    "fhir %s %s: %s, retry %d/%d in %.2fs",
                    method,
                    rtype,
                    type(exc).__name__,
                    attempt + 1,
                    cfg.max_retries,
                    delay,
                )
                await self._sleep(delay)
                attempt += 1
                continue

            status = resp.status_code
            if status == 401 and auth and token and self._auth is not None and not reauthorised:
                log.info("fhir %s %s: 401, requesting a new access token", method, rtype)
                await self._auth.invalidate(functools.partial(self._send, auth=False), token)
                reauthorised = True
                continue
            if status == 429 or (500 <= status <= 599 and status not in (501, 505)):
                body = _json_or_none(resp)
                wait = parse_retry_after(resp.headers.get("Retry-After"), self._clock())
                if attempt >= cfg.max_retries or (wait is not None and wait > cfg.retry_after_max_s):
                    log.warning("fhir %s %s: %d, giving up after %d attempts", method, rtype, status, attempt + 1)
                    raise FhirHttpError(
                        status,
                        retryable=True,
                        method=method,
                        resource_type=rtype,
                        outcome=_outcome(body),
                        body=body,
                        attempts=attempt + 1,
                    )
                delay = wait if wait is not None else self._backoff(attempt)
                log.warning(
                    "fhir %s %s: %d, retry %d/%d in %.2fs", method, rtype, status, attempt + 1, cfg.max_retries, delay
                )
                await self._sleep(delay)
                attempt += 1
                continue
            if status >= 300:
                body = _json_or_none(resp)
                log.info("fhir %s %s: %d", method, rtype, status)
                if status == 401 and auth and token:
                    raise FhirAuthError(
                        401,
                        error="invalid_token",
                        error_description="the FHIR server refused the access token",
                        method=method,
                        resource_type=rtype,
                        body=body,
                    )
                raise FhirHttpError(
                    status,
                    retryable=False,
                    method=method,
                    resource_type=rtype,
                    outcome=_outcome(body),
                    body=body,
                    attempts=attempt + 1,
                )
            log.debug("fhir %s %s: %d (attempt %d)", method, rtype, status, attempt + 1)
            return resp
