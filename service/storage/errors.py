"""Storage exceptions the faces map to responses."""

from __future__ import annotations


class StorageBusy(Exception):
    """Other writers held the rows or the database too long (SQLite busy_timeout or PostgreSQL
    lock_timeout ran out), or PostgreSQL broke a deadlock or a serialisation conflict. Nothing of
    the transaction is stored; retrying it is safe (503 with Retry-After)."""

    retry_after_s = 1

    def __init__(self, reason: str) -> None:
        super().__init__(reason)  # a short cause (lock timeout, deadlock): never statement parameters
        self.reason = reason
