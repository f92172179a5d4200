"""Outbox rows the relay adds outside the normal accept path (recovery after a crash).

Kept apart from ``store/outbox.py`` (the delivery worker's queue functions) so that the
accept path and the delivery path can change independently.
"""

from __future__ import annotations

import sqlite_utils

from store import outbox as store_outbox
from store.sql import transaction


def _existing(db: sqlite_utils.Database, table: str, ids: set[int]) -> set[int]:
    if not ids:
        return set()
    marks = ",".join("?" for _ in ids)
    found = db.execute(f"SELECT id FROM {table} WHERE id IN ({marks})", list(ids)).fetchall()
    return {r[0] for r in found}


def add_recovered(db: sqlite_utils.Database, entries: list[dict]) -> list[int]:
    """Queue rows for spool files found without a row, in one commit.

    An email or user the file names may be gone (deleted since, or its commit lost with
    the power): the mail is still delivered, just without that link.
    """
    with transaction(db):
        emails = _existing(db, "emails", {e["email_id"] for e in entries if e.get("email_id")})
        users = _existing(db, "users", {e["user_id"] for e in entries if e.get("user_id")})
        fixed = [
            {
                **e,
                "email_id": e.get("email_id") if e.get("email_id") in emails else None,
                "user_id": e.get("user_id") if e.get("user_id") in users else None,
            }
            for e in entries
        ]
        return store_outbox.add(db, fixed)
