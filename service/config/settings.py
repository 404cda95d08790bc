"""Runtime configuration (pydantic-settings, env prefix IECTOX_).

Nothing here is mutable at run time: a Settings instance is built once per process (or per
test) and passed down explicitly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..core.config import HighDoseRule
from .ehr import FhirServerConfig

QuietRule = Literal["grade-0", "unchanged"]


def _default_quiet() -> dict[str, list[QuietRule]]:
    return {"patient-view": ["grade-0", "unchanged"]}


def _base_key(url: str | None) -> str:
    """A FHIR base compared as a server compares it: scheme and host in any case, no trailing slash."""
    if not url:
        return ""
    parts = urlsplit(url.strip())
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IECTOX_", frozen=True)

    database_url: str = "sqlite:///./iectox.db"
    # Run Alembic migrations at start-up (set false where a release job migrates).
    auto_migrate: bool = True
    # Canonical base for the project's CodeSystems (method, outcome, assessment, observation).
    canonical_base: str = "https://iectox.org/fhir"
    # Optional site codebook overlay (JSON, same shape as `iectox codebook --json`).
    codebook_path: Path | None = None

    # Grading (ASTCT 2019). The look-back window for the "current grade".
    window_hours: float = Field(default=24.0, gt=0, le=24 * 14)
    # ICANS: age <= this uses CAPD, older uses ICE (ASTCT says "12 and under"; sources differ).
    capd_max_age_years: int = Field(default=12, ge=0, le=18)
    # Hypotension not requiring vasopressors has no numeric threshold in ASTCT 2019;
    # this is the explicit, configurable adult rule (printed in every rationale that uses it).
    adult_sbp_below_mmhg: float = 90.0
    adult_map_below_mmhg: float = 65.0
    # Age from which the adult rule applies; below it the PALS systolic limits apply.
    adult_from_age_years: int = 18

    # A vasopressor drip charted as events (start, rate changes, stop) with no end: an event runs
    # until the next event of the same drug, at most this many hours (docs/clinical-choices.md,
    # "Infusions charted as events"). A choice, not a published rule.
    infusion_event_max_hours: float = Field(default=4.0, gt=0, le=48)

    # Older CRS scales (docs/scale-sources.md). "High-dose vasopressors" (Lee 2014 Table 2) could
    # not be verified: no default; until a site sets it, a scale that needs it is indeterminate.
    # JSON, e.g. IECTOX_HIGH_DOSE_VASOPRESSORS='{"norepinephrine_ug_min": 20, ...}' (all fields).
    high_dose_vasopressors: HighDoseRule | None = None
    # FiO2 estimated from flow, [[L/min, FiO2 %], ...]; unset = the revised Atlanta table (Banks
    # 2013), [] = never estimate (a charted FiO2 is then needed).
    fio2_estimate_points: list[tuple[float, float]] | None = None
    # CTCAE version for "grade N organ toxicity" (creatinine, AST, ALT increased).
    ctcae_organ_version: Literal["5.0", "4.03"] = "5.0"
    # Upper limits of normal when a lab carries no referenceRange (lab-specific: no default).
    uln_creatinine_mg_dl: float | None = Field(default=None, gt=0)
    uln_ast_u_l: float | None = Field(default=None, gt=0)
    uln_alt_u_l: float | None = Field(default=None, gt=0)

    # Course of a patient: the current grade is sampled every this many minutes from day 0;
    # resolution is a return to grade 0 held for this many hours.
    course_step_minutes: int = Field(default=60, ge=5, le=24 * 60)
    resolution_hours: float = Field(default=24.0, gt=0, le=24 * 14)

    # Risk scores: a time point takes the value nearest to it within +/- this (never after `at`);
    # "before lymphodepletion" takes the latest value in this many hours before its start.
    score_tolerance_hours: float = Field(default=24.0, gt=0, le=24 * 7)
    pre_lymphodepletion_lookback_hours: float = Field(default=72.0, gt=0, le=24 * 30)

    # Inputs the rules cannot use (bad date, unknown unit, implausible value): "lenient" (default)
    # leaves each out, named with its FHIRPath in the rationale and in a warning OperationOutcome,
    # and a grade it could change is indeterminate; "strict" answers 422. A request overrides it
    # with `Prefer: handling=strict|lenient` (FHIR). Storing (POST /fhir, PUT) always validates.
    input_handling: Literal["lenient", "strict"] = "lenient"
    # IANA timezone (e.g. "Europe/Berlin") that places a dateTime sent with a time but without a
    # timezone (the rationale says so). None (default): such a dateTime is left out, named.
    site_timezone: str | None = None
    # Many sites chart oxygen only when it is given. On: SpO2 charted in the window with no oxygen
    # device, flow or FiO2 charted reads as room air ("room air assumed (site setting)"). Off by default.
    room_air_when_spo2_only: bool = False

    @field_validator("site_timezone")
    @classmethod
    def _known_timezone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown IANA timezone {value!r}") from None
        return value

    def site_tz(self) -> ZoneInfo | None:
        return ZoneInfo(self.site_timezone) if self.site_timezone else None

    def home(self) -> str:
        """The home server's name: `home_server`, else the only configured server, else "default"."""
        if self.home_server is not None:
            return self.home_server
        return next(iter(self.ehr_servers)) if len(self.ehr_servers) == 1 else "default"

    def namespace(self, server: str | None) -> str:
        """Where a configured EHR server's data are kept (the `server` key of stored rows): its
        name, except the home server's, kept as "" with the data of API clients that are not
        mapped to a server and everything stored before several EHRs were keyed."""
        return "" if not server or server == self.home() else server

    def server_named(self, base: str | None) -> str | None:
        """The name of the configured EHR server whose FHIR base is `base` (scheme and host in
        any case, a trailing slash or not); None when none is."""
        wanted = _base_key(base)
        return next((n for n, s in self.ehr_servers.items() if wanted and _base_key(s.base_url) == wanted), None)

    def server_at(self, base: str | None) -> str:
        """The namespace of the data of the EHR whose FHIR base is `base` ("" when it is not configured)."""
        return self.namespace(self.server_named(base))

    # Request limits (413 beyond them).
    max_body_bytes: int = 50 * 1024 * 1024
    max_bundle_entries: int = 50_000
    # The most resources a CDS hook's prefetch may hold (a hook answers within the EHR's budget).
    cds_max_prefetch_resources: int = Field(default=20_000, ge=1)
    # The course (hourly grades) covers at most this many days before `at`: 100 days is the
    # registries' follow-up (CIBMTR day-100 form) and bounds the work of one evaluation.
    course_max_days: int = Field(default=100, ge=1, le=3650)
    # `$evaluate` bodies larger than this are split unparsed and parsed one entry at a time
    # (ingest.stream_entries): the peak memory stays near the body's size, not 7 times it.
    stream_parse_above_bytes: int = Field(default=16 * 2**20, ge=0)

    # CDS Hooks attention (cdshooks/attention.py), per hook: when its cards stay quiet.
    # "grade-0": ASTCT CRS and ICANS both graded 0 (an indeterminate grade is never quiet);
    # "unchanged": nothing changed since the last answer to the hook for the patient and user,
    # who saw the card less than `cds_quiet_repeat_hours` ago (never for a critical card).
    cds_quiet: dict[str, list[QuietRule]] = Field(default_factory=_default_quiet)
    # "unchanged" keeps a card quiet for a user at most this long after it was last shown to them
    # (a shift: the same clinician is reminded once per shift of what has not changed).
    cds_quiet_repeat_hours: float = Field(default=8.0, gt=0, le=24 * 7)

    @field_validator("cds_quiet")
    @classmethod
    def _known_hooks(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        unknown = sorted(set(value) - {"patient-view", "order-select", "order-sign"})
        if unknown:
            raise ValueError(f"unknown hooks {unknown}: patient-view, order-select or order-sign")
        return value

    # `iectox worker` and `iectox poll` serve their Prometheus metrics on this port (None: not
    # served; the API serves its own at /metrics).
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # Forward every audit event, as a FHIR AuditEvent, to this audit repository (a name in
    # IECTOX_EHR_SERVERS) through the outbox (at least once); None: kept in the service only.
    audit_forward_target: str | None = None
    # A Bulk Data export not finished after this long reports an error (the process that ran it
    # has gone); the client starts a new one.
    export_max_minutes: float = Field(default=60.0, gt=0)

    host: str = "127.0.0.1"
    port: int = 8000

    # --- Inbound security (bearer JWT, SMART scopes, dev mode, audit) ---
    # Validated at start-up by service/security/config.py; see docs/security.md.
    # "jwt" (default): every /fhir call except GET /fhir/metadata needs a bearer JWT from
    # `auth_issuer`. "dev": no token, the actor is "dev"; refused unless bound to loopback.
    auth_mode: str = Field(default="jwt", pattern="^(jwt|dev)$")
    auth_issuer: str | None = None  # exact `iss` of accepted access tokens
    auth_audience: str | None = None  # required `aud` (usually this service's FHIR base URL)
    # The issuer's public keys: a JWKS as inline JSON, a file, and/or a URL (fetched, cached).
    auth_jwks: str | None = None
    auth_jwks_path: Path | None = None
    auth_jwks_url: str | None = None
    auth_jwks_cache_seconds: int = Field(default=300, ge=0, le=24 * 3600)
    # Accepted signature algorithms (a subset of RS384 ES384 RS256 ES256; never none or HMAC).
    auth_algorithms: tuple[str, ...] = ("RS384", "ES384")
    # Clock skew allowed on exp / iat / nbf.
    auth_leeway_seconds: int = Field(default=60, ge=0, le=300)
    # Public base URL (scheme://host[:port]) behind a proxy, for the CDS Hooks JWT `aud`.
    auth_public_base_url: str | None = None
    # --- The clinician app (/app/, SMART App Launch; docs/app.md) ---
    # The app is a public SMART client of the EHR (PKCE): it is launched from the EHR whose FHIR
    # base is `app_fhir_base` (the launch's `iss`), and sends the EHR's access token to iectox,
    # which accepts it when signed by `app_issuer` (keys at `app_jwks_url`) with `aud` =
    # `app_fhir_base` and user/ read scopes. All four, or none (dev mode needs none).
    app_client_id: str | None = None
    app_fhir_base: str | None = None
    app_issuer: str | None = None
    app_jwks_url: str | None = None
    # EHR authorization servers commonly sign user tokens RS256 or ES256 (never none or HMAC).
    app_algorithms: tuple[str, ...] = ("RS256", "RS384", "ES256", "ES384")
    app_scope: str = (
        "openid fhirUser user/Patient.rs user/Observation.rs user/MedicationAdministration.rs user/Condition.rs "
        "user/Procedure.rs user/Medication.rs user/RiskAssessment.rs"
    )
    # Several EHRs: the API clients that send (and read) an EHR server's data, by their token's
    # "<iss> <sub>" -> a name of IECTOX_EHR_SERVERS. Others use the namespace "" (docs/ehr-integration.md).
    auth_client_servers: dict[str, str] = Field(default_factory=dict)
    # CDS Hooks clients: iss -> {"jwks": {...}, "jwks_path": "...", "jwks_url": "...",
    # "jku_prefixes": ["https://ehr.example.org/jwks/"]} (validated at start-up).
    auth_cds_clients: dict[str, dict[str, object]] = Field(default_factory=dict)
    # A CDS client JWT may live at most this long (exp - iat); its jti is kept until exp.
    auth_cds_max_lifetime_seconds: int = Field(default=3600, ge=60, le=24 * 3600)

    # --- EHR FHIR client (SMART Backend Services, retries) ---
    # EHR FHIR servers by name (env IECTOX_EHR_SERVERS, JSON: {"default": {"base_url": ...,
    # "client_id": ..., "private_key_path": ..., "key_id": ..., "alg": "RS384"}}); "default" is
    # the default target. Fields, retries and scopes: docs/ehr-integration.md.
    ehr_servers: dict[str, FhirServerConfig] = Field(default_factory=dict)
    # Several EHRs at once (docs/ehr-integration.md): the server whose data share the namespace ""
    # with API clients not mapped to a server (a single-EHR site's server; rows stored before
    # migration 0008). Every other server's data are kept apart, under its name. None: the only
    # configured server, else "default".
    home_server: str | None = None

    @field_validator("ehr_servers")
    @classmethod
    def _storable_names(cls, value: dict[str, FhirServerConfig]) -> dict[str, FhirServerConfig]:
        bad = sorted(name for name in value if not 0 < len(name) <= 64)
        if bad:
            raise ValueError(f"server names must have 1 to 64 characters: {bad}")
        return value

    # --- Outbox and worker (write-back) ---
    # Name of the `ehr_servers` entry that stored evaluations are written back to. None (the
    # default): no outbox rows are written and `iectox worker` has nothing to do.
    writeback_target: str | None = None
    # With several EHRs: the results of another server than the home server's go back to that
    # server (without it, only when it is `writeback_target`: never to another EHR).
    writeback_to_source: bool = False
    # How each RiskAssessment and the Provenance are written (docs/writeback.md): "conditional"
    # (default), PUT RiskAssessment?identifier=<write-back identifier>, each Bundle with a
    # Provenance for its own RiskAssessments; "id", PUT Type/<deterministic id> (update as
    # create). Bundles hold at most `writeback_max_bundle_entries` entries (Medplum runs a
    # transaction with conditional entries only up to 8).
    writeback_mode: str = Field(default="conditional", pattern="^(id|conditional)$")
    writeback_max_bundle_entries: int = Field(default=8, ge=2, le=10_000)
    # Worker loop: rows claimed per poll, seconds between polls when idle, claim lease (a row
    # claimed by a worker that died is claimable again after it; keep it above the client timeout).
    outbox_batch_size: int = Field(default=10, ge=1, le=500)
    outbox_poll_interval_s: float = Field(default=2.0, gt=0, le=3600)
    outbox_lease_s: float = Field(default=120.0, gt=0, le=24 * 3600)
    # Retries: delay = min(max, base * 2^(attempts-1)), minus up to `jitter` of it at random;
    # dead-lettered after `outbox_max_attempts` failed deliveries (non-retryable 4xx at once).
    outbox_backoff_base_s: float = Field(default=5.0, gt=0)
    outbox_backoff_max_s: float = Field(default=3600.0, gt=0)
    outbox_backoff_jitter: float = Field(default=0.2, ge=0, le=1)
    outbox_max_attempts: int = Field(default=12, ge=1, le=1000)
    # Delivered rows (they hold clinical content) are deleted by the worker after this many hours.
    outbox_keep_delivered_hours: float = Field(default=168.0, ge=0)

    # --- CDS Hooks and subscriptions ---
    # The `ehr_servers` entry that subscription notifications refer to (and the poll reads).
    subscription_target: str = "default"
    # Reconciliation poll (`iectox poll`): seconds between passes over the watched patients.
    poll_interval_s: float = Field(default=300.0, gt=0, le=24 * 3600)
