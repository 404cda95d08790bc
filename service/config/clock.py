"""The wall clock, in one place: everything else takes `now` (or a clock) as a parameter."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> datetime:
    return datetime.now(UTC)
