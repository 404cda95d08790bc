"""CDS Hooks services: the registry, discovery, prefetch (or fetch from the EHR), evaluate, cards.

What lives here: everything a hook call does between the parsed request and the cards. What
never does: HTTP (service/api/cds.py parses and responds) or card wording (cards.py).
A hook's data come from the prefetch when it has every key; what is missing is read from
fhirServer, which must be a configured EHR server (no SSRF); 412 when neither has them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Engine
from sqlmodel import Session

from ..app.cache import EvaluationCache
from ..app.evaluate import Evaluation
from ..codebook import Codebook
from ..config.ehr import FhirServerConfig
from ..config.settings import Settings
from ..core.concepts import C
from ..ehr.client import FhirClient
from ..ehr.errors import EhrError
from ..ehr.sync import (
    observation_codes,
    patient_matcher,
    raw_received_digest,
    same_call_again,
    store_and_evaluate,
)
from ..fhir.errors import FhirError
from ..fhir.ingest import FHIR_ID, read_json
from ..observe.metrics import CDS_CARDS, CDS_QUIET
from ..storage import repository
from ..storage.models import AuditEvent, CdsCard
from .attention import Last, override_reasons, quiet_reason, shown_grades
from .cards import (
    ORDER_CONCEPTS,
    ORDER_SELECT,
    ORDER_SIGN,
    PATIENT_VIEW,
    CardContext,
    Order,
    order_select_cards,
    patient_view_cards,
)
from .schemas import CdsResponse, HookRequest, RawPrefetch

# Prefetch keys and what each holds; every key is fetched from fhirServer when missing.
PREFETCH_KEYS = ("patient", "observations", "medications", "conditions", "procedures")


def prefetch_templates(observation_codes: list[str]) -> dict[str, str]:
    return {
        "patient": "Patient/{{context.patientId}}",
        "observations": "Observation?patient={{context.patientId}}&code=" + ",".join(observation_codes),
        "medications": "MedicationAdministration?patient={{context.patientId}}",
        "conditions": "Condition?patient={{context.patientId}}",
        "procedures": "Procedure?patient={{context.patientId}}",
    }


def resources_of(value: Any) -> list[dict[str, Any]]:
    """The resources of one prefetch value: a resource, a Bundle (searchset), or null."""
    if not isinstance(value, dict):
        return []
    if value.get("resourceType") == "Bundle":
        entries = value.get("entry")
        return [
            e["resource"]
            for e in (entries if isinstance(entries, list) else ())
            if isinstance(e, dict) and isinstance(e.get("resource"), dict)
        ]
    return [value] if isinstance(value.get("resourceType"), str) else []


def ordered_concepts(context: dict[str, Any], codebook: Codebook) -> list[Order]:
    """(concept, product, order reference) of the selected draft orders that matter here."""
    raw = context.get("selections")
    if raw is not None and not (isinstance(raw, list) and all(isinstance(s, str) for s in raw)):
        raise FhirError.one(400, "structure", "selections must be an array of strings", "context.selections")
    selections = set(raw or ())
    found = []
    for res in resources_of(context.get("draftOrders")):
        ref = f"{res.get('resourceType')}/{res.get('id')}"
        if selections and ref not in selections:
            continue
        cc = res.get("medicationCodeableConcept") or res.get("code")
        if not isinstance(cc, dict) or not isinstance(cc.get("coding", []), list):
            continue
        codings = [
            (c["system"], c["code"])
            for c in cc.get("coding") or ()
            if isinstance(c, dict) and isinstance(c.get("system"), str) and isinstance(c.get("code"), str)
        ]
        text = cc.get("text") if isinstance(cc.get("text"), str) else None
        concept = codebook.concept_for(codings, text)
        if concept in ORDER_CONCEPTS:
            product = codebook.value_for(concept, codings, text) if concept == C.CART_INFUSION else None
            found.append(Order(concept, product, ref))
    return found


CardBuilder = Callable[[Evaluation, CardContext, list[Order]], list[dict[str, Any]]]


@dataclass(frozen=True)
class HookService:
    """One CDS service: discovery, the 404 and the dispatch all read this registry."""

    id: str
    hook: str
    title: str
    description: str
    cards: CardBuilder
    card_type: str  # what `iectox report feedback` counts by: grades | order-risk
    needs_orders: bool = False  # order-select / order-sign: no card unless an order matters here
    usage: str | None = None


SERVICES: dict[str, HookService] = {
    s.id: s
    for s in (
        HookService(
            PATIENT_VIEW,
            "patient-view",
            "CRS and ICANS grades (ASTCT 2019)",
            "Current CRS and ICANS grades after immune effector cell therapy, the deciding values, "
            "and the pre-infusion risk scores.",
            lambda ev, ctx, _orders: patient_view_cards(ev, ctx),
            card_type="grades",
            usage="Read access to Patient, Observation, MedicationAdministration, Condition and "
            "Procedure (prefetch, or fhirAuthorization with system/ or user/ read scopes).",
        ),
        HookService(
            ORDER_SELECT,
            "order-select",
            "CAR T / tocilizumab / corticosteroid order: baseline risk and current grades",
            "When a CAR T-cell product, tocilizumab or a corticosteroid is selected: the product's "
            "published baseline CRS and neurotoxicity rates and the current grades.",
            order_select_cards,
            card_type="order-risk",
            needs_orders=True,
        ),
        # Several EHRs fire only order-sign for medication orders: the same cards, when the
        # order is signed (no `selections`: every draft order counts).
        HookService(
            ORDER_SIGN,
            "order-sign",
            "CAR T / tocilizumab / corticosteroid order signed: baseline risk and current grades",
            "When an order for a CAR T-cell product, tocilizumab or a corticosteroid is signed: the product's "
            "published baseline CRS and neurotoxicity rates and the current grades.",
            order_select_cards,
            card_type="order-risk",
            needs_orders=True,
        ),
    )
}


def discovery(observation_codes: list[str]) -> dict[str, Any]:
    prefetch = prefetch_templates(observation_codes)
    services = []
    for s in SERVICES.values():
        entry: dict[str, Any] = {
            "hook": s.hook,
            "id": s.id,
            "title": s.title,
            "description": s.description,
            "prefetch": prefetch,
        }
        if s.usage:
            entry["usageRequirements"] = s.usage
        services.append(entry)
    return {"services": services}


def service_for(service_id: str) -> HookService:
    service = SERVICES.get(service_id)
    if service is None:
        raise FhirError.one(404, "not-found", f"no CDS service {service_id!r}", "service_id")
    return service


def _failed(value: Any) -> bool:
    return isinstance(value, dict) and value.get("resourceType") == "OperationOutcome"


def _server_for(url: str | None, settings: Settings) -> tuple[str, FhirServerConfig]:
    """The configured EHR server whose base URL is `fhirServer` (never an arbitrary URL: no SSRF,
    no token sent to a server the site did not configure)."""
    name = settings.server_named(url)
    if name is not None:
        return name, settings.ehr_servers[name]
    raise FhirError.one(
        412, "not-found", "the data are not in the prefetch and fhirServer is not a configured EHR server", "fhirServer"
    )


async def _fetch_missing(
    req: HookRequest, patient_id: str, missing: list[str], settings: Settings, codebook: Codebook
) -> tuple[str, list[dict[str, Any]]]:
    target, server = _server_for(req.fhirServer, settings)
    token = req.fhirAuthorization.access_token if req.fhirAuthorization else None
    searches = {
        "observations": ("Observation", {"patient": patient_id, "code": ",".join(observation_codes(codebook))}),
        "medications": ("MedicationAdministration", {"patient": patient_id}),
        "conditions": ("Condition", {"patient": patient_id}),
        "procedures": ("Procedure", {"patient": patient_id}),
    }
    out: list[dict[str, Any]] = []
    try:
        async with FhirClient(server, token=token) as client:
            for key in missing:
                if key == "patient":
                    patient = await client.read("Patient", patient_id)
                    out += [patient] if patient else []
                else:
                    rtype, params = searches[key]
                    found = await client.search(rtype, dict(params))
                    out += found
                    if key == "medications":  # the Medications they reference, as the sync path reads them
                        out += await client.referenced_medications(found)
    except EhrError as exc:
        raise FhirError.one(
            412,
            "transient",
            f"the missing data could not be fetched from fhirServer ({type(exc).__name__})",
            "fhirServer",
        ) from None
    return target, out


# The types that name their patient in `subject` (a Medication has none: it is shared).
PATIENT_DATA_TYPES = frozenset({"Patient", "Observation", "MedicationAdministration", "Condition", "Procedure"})


def _belongs(res: dict[str, Any], theirs: Callable[[dict[str, Any]], bool]) -> bool:
    """A patient's data must be the hook patient's (`theirs`: ehr.sync.patient_matcher); anything
    else (Medication) is shared or not read."""
    return str(res.get("resourceType")) not in PATIENT_DATA_TYPES or theirs(res)


def check_prefetch(
    prefetch: dict[str, Any], patient_id: str, base: str | None, max_resources: int
) -> list[dict[str, Any]]:
    """The resources of the prefetch: 413 over `max_resources`; 400 naming the first one that is
    not the hook's patient's (a hook stores only its own patient's data)."""
    out: list[dict[str, Any]] = []
    theirs = patient_matcher(patient_id, base)
    for key in PREFETCH_KEYS:
        if key not in prefetch or _failed(prefetch[key]):
            continue
        found = resources_of(prefetch[key])
        if len(out) + len(found) > max_resources:
            raise FhirError.one(
                413, "too-long", f"the prefetch holds more than {max_resources} resources", f"prefetch.{key}"
            )
        for i, res in enumerate(found):
            if not _belongs(res, theirs):
                where = f"prefetch.{key}" if found == [prefetch[key]] else f"prefetch.{key}.entry[{i}].resource"
                raise FhirError.one(400, "value", "a prefetch resource is not the hook patient's", where)
        out += found
    return out


def _parsed(raw: RawPrefetch) -> dict[str, Any]:
    """The prefetch set aside unparsed, parsed by the whole body's parser (api/orjson_route.py);
    a 400 naming it when it is not JSON that storage can keep."""
    try:
        doc = read_json(raw.text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bytes not UTF-8, nested too deep
        raise FhirError.one(
            400, "structure", f"prefetch is not JSON this service can keep: {exc}", "prefetch"
        ) from None
    assert isinstance(doc, dict)  # set aside only when its text is an object
    return doc


def hook_server(settings: Settings, issuer: str, fhir_server: str | None) -> str:
    """The namespace of a hook's patient: that of the EHR server its CDS client is mapped to
    (IECTOX_AUTH_CLIENT_SERVERS, by the JWT's `iss`: the issuer is what is trusted, any `sub` it
    signs is its own), else that of the configured server whose base is `fhirServer`, else the
    home namespace "". One EHR never writes into another's patients: a mapped client naming
    another configured server, or (once clients are mapped) an unmapped one naming a server other
    than the home server, is refused."""
    named = settings.server_named(fhir_server)
    mapped = settings.auth_client_servers.get(issuer)
    if mapped is not None:
        if named is not None and settings.namespace(named) != settings.namespace(mapped):
            raise FhirError.one(403, "forbidden", "fhirServer is another EHR's than this CDS client's", "fhirServer")
        return settings.namespace(mapped)
    if settings.auth_client_servers and settings.namespace(named):
        raise FhirError.one(
            403, "forbidden", "this CDS client is not mapped to the EHR server named by fhirServer", "fhirServer"
        )
    return settings.namespace(named)


@dataclass(frozen=True)
class HookCall:
    """What the route hands over: the parsed request, who called, and where the course lives."""

    service: HookService
    request: HookRequest
    actor: str
    issuer: str  # the CDS client JWT's `iss`: what the site trusts and maps to an EHR server
    public_base: str
    raw_prefetch: RawPrefetch | None = None  # the prefetch as sent, when set aside unparsed


async def call_hook(
    call: HookCall,
    settings: Settings,
    codebook: Codebook,
    engine: Engine,
    now: datetime,
    cache: EvaluationCache | None = None,
) -> CdsResponse:
    """Prefetch or fetch -> store -> evaluate -> enqueue -> cards, for one hook call."""
    service, req = call.service, call.request
    if req.hook != service.hook:
        raise FhirError.one(400, "value", f"this service answers the {service.hook} hook", "hook")
    patient_id = req.context.get("patientId")
    if not isinstance(patient_id, str) or not FHIR_ID.fullmatch(patient_id):
        raise FhirError.one(400, "required", "context.patientId (a FHIR id) is required", "context.patientId")
    orders = ordered_concepts(req.context, codebook) if service.needs_orders else []
    if service.needs_orders and not orders:
        return CdsResponse(cards=[])
    server = hook_server(settings, call.issuer, req.fhirServer)
    # The audit trail middleware covers /fhir; a hook reads and writes a patient too.
    audit = AuditEvent(
        recorded=now,
        actor=call.actor,
        action="hook",
        route=f"/cds-services/{service.id}",
        patient_id=patient_id,
        status=200,
        server=server,
    )
    base = call.public_base.rstrip("/")
    ctx = CardContext(
        patient_id,
        f"{base}/fhir/Patient/{patient_id}/$course",
        f"{base}/app/launch",
        tuple(override_reasons(settings.canonical_base)),
    )
    user = req.context.get("userId")
    answer = _Answer(
        service,
        ctx,
        orders,
        tuple(settings.cds_quiet.get(service.hook, ())),
        user[:256] if isinstance(user, str) else "",
        timedelta(hours=settings.cds_quiet_repeat_hours),
        now,
        server,
    )
    received = None
    if call.raw_prefetch is not None and cache is not None:
        # The EHR sent these very bytes for this patient last time, and the stored inputs did not
        # change since: that call's evaluation answers, and the 2 MB are never parsed.
        received = raw_received_digest(call.raw_prefetch.text, req.fhirServer)
        again = await run_in_threadpool(
            same_call_again, engine, patient_id, cache, received, audit, answer, settings, server
        )
        if again is not None:
            return CdsResponse(cards=answer.cards)
    prefetch = _parsed(call.raw_prefetch) if call.raw_prefetch is not None else (req.prefetch or {})
    # A key the EHR did not fill is absent (or carries an OperationOutcome): fetch it. null = no data.
    missing = [key for key in PREFETCH_KEYS if key not in prefetch or _failed(prefetch[key])]
    resources = check_prefetch(prefetch, patient_id, req.fhirServer, settings.cds_max_prefetch_resources)
    target: str | None = None
    if missing:
        target, fetched = await _fetch_missing(req, patient_id, missing, settings, codebook)
        theirs = patient_matcher(patient_id, req.fhirServer)
        stranger = next((r for r in fetched if not _belongs(r, theirs)), None)
        if stranger is not None:
            raise FhirError.one(
                400, "value", f"fhirServer returned a {stranger.get('resourceType')} of another patient", "fhirServer"
            )
        resources += fetched
    if not any(r.get("resourceType") == "Patient" and r.get("id") == patient_id for r in resources):
        raise FhirError.one(
            412, "not-found", "the Patient is neither in the prefetch nor on fhirServer", "context.patientId"
        )
    evaluation, _ = await run_in_threadpool(
        partial(
            store_and_evaluate,
            target=target,
            server=server,
            base=req.fhirServer,
            audit=audit,
            cache=cache,
            respond=answer,
            received=received if target is None else None,
        ),
        engine,
        patient_id,
        resources,
        codebook,
        settings,
        now,
    )
    assert evaluation is not None  # the Patient is among the resources (checked above)
    return CdsResponse(cards=answer.cards)


@dataclass
class _Answer:
    """The cards of one hook call, decided in the transaction that stores the evaluation: the
    quiet rule reads and moves the last answer to this patient and user, and the cards returned
    are recorded."""

    service: HookService
    ctx: CardContext
    orders: list[Order]
    quiet: tuple[str, ...]
    user: str  # context.userId: the quiet rule is per user
    repeat: timedelta  # an unchanged card is shown again to a user after this long
    now: datetime
    server: str  # the patient's EHR server
    cards: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, session: Session, evaluation: Evaluation) -> None:
        hook, patient_id = self.service.hook, self.ctx.patient_id
        state = shown_grades(evaluation, self.orders)
        if self.quiet:
            found = repository.last_answer(session, patient_id, hook, self.user, server=self.server)
            last = Last(*found) if found is not None else None
            quiet = quiet_reason(self.quiet, evaluation, state, last, self.now, self.repeat)
            repository.set_last_answer(
                session, patient_id, hook, self.user, state, self.now, shown=quiet is None, server=self.server
            )
            if quiet is not None:
                CDS_QUIET.labels(hook, quiet).inc()
                self.cards = []
                return
        self.cards = self.service.cards(evaluation, self.ctx, self.orders)
        for card in self.cards:
            CDS_CARDS.labels(self.service.card_type, card["indicator"]).inc()
            session.add(
                CdsCard(
                    uuid=card["uuid"],
                    service_id=self.service.id,
                    hook=hook,
                    server=self.server,
                    card_type=self.service.card_type,
                    indicator=card["indicator"],
                    patient_id=patient_id,
                    issued=self.now,
                    grades=state[:512],
                )
            )
