"""Runtime configuration (pydantic-settings, env prefix IECTOX_).

Nothing here is mutable at run time: a Settings instance is built once per process (or per
test) and passed down explicitly.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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

    # Course of a patient: the current grade is sampled every this many minutes from day 0;
    # resolution is a return to grade 0 held for this many hours.
    course_step_minutes: int = Field(default=60, ge=5, le=24 * 60)
    resolution_hours: float = Field(default=24.0, gt=0, le=24 * 14)

    # Risk scores: a time point takes the value nearest to it within +/- this (never after `at`);
    # "before lymphodepletion" takes the latest value in this many hours before its start.
    score_tolerance_hours: float = Field(default=24.0, gt=0, le=24 * 7)
    pre_lymphodepletion_lookback_hours: float = Field(default=72.0, gt=0, le=24 * 30)

    # Request limits (413 beyond them).
    max_body_bytes: int = 50 * 1024 * 1024
    max_bundle_entries: int = 50_000

    host: str = "127.0.0.1"
    port: int = 8000

    # --- Inbound security (bearer JWT, SMART scopes, dev mode, audit) ---

    # --- EHR FHIR client (SMART Backend Services, retries) ---

    # --- Outbox and worker (write-back) ---

    # --- CDS Hooks and subscriptions ---
