"""Deals and their contacts (the CRM side that logged mail is filed on)."""

from __future__ import annotations

import sqlite_utils

from store.contacts import get_contact
from store.db import StoreError, now_iso
from store.sql import row, rows, transaction


def get_deal(db: sqlite_utils.Database, deal: int | str) -> dict:
    """A deal by id or exact name (names need not be unique; then use the id)."""
    if isinstance(deal, int) or str(deal).isdigit():
        found = row(db, "SELECT * FROM deals WHERE id = ?", [int(deal)])
    else:
        matches = rows(db, "SELECT * FROM deals WHERE name = ?", [deal])
        if len(matches) > 1:
            raise StoreError(f"several deals are named {deal!r}: use the deal id")
        found = matches[0] if matches else None
    if found is None:
        raise StoreError(f"unknown deal: {deal}")
    return found


def add_deal(db: sqlite_utils.Database, name: str, contacts: list[str]) -> dict:
    """Create an open deal linked to existing contacts."""
    if not name.strip():
        raise StoreError("a deal needs a name")
    ids = [get_contact(db, c)["id"] for c in contacts]
    with transaction(db):
        cur = db.execute(
            "INSERT INTO deals (name, stage, created_at) VALUES (?, 'open', ?)",
            [name.strip(), now_iso()],
        )
        for cid in ids:
            db.execute(
                "INSERT OR IGNORE INTO deal_contacts (deal_id, contact_id) VALUES (?, ?)",
                [cur.lastrowid, cid],
            )
    return get_deal(db, cur.lastrowid)


def link(db: sqlite_utils.Database, deal: int | str, contact: str) -> None:
    d = get_deal(db, deal)
    c = get_contact(db, contact)
    with transaction(db):
        db.execute(
            "INSERT OR IGNORE INTO deal_contacts (deal_id, contact_id) VALUES (?, ?)",
            [d["id"], c["id"]],
        )


def close(db: sqlite_utils.Database, deal: int | str, won: bool) -> dict:
    d = get_deal(db, deal)
    if d["stage"] != "open":
        raise StoreError(f"deal {d['id']} is already {d['stage']}")
    with transaction(db):
        db.execute(
            "UPDATE deals SET stage = ?, closed_at = ? WHERE id = ?",
            ["won" if won else "lost", now_iso(), d["id"]],
        )
    return get_deal(db, d["id"])


def list_deals(db: sqlite_utils.Database) -> list[dict]:
    return rows(
        db,
        """SELECT d.id, d.name, d.stage, d.created_at, d.closed_at,
                  (SELECT group_concat(c.email, ', ') FROM deal_contacts dc
                   JOIN contacts c ON c.id = dc.contact_id WHERE dc.deal_id = d.id) AS contacts
           FROM deals d ORDER BY d.created_at DESC, d.id DESC""",
    )


def recent_open_deals(db: sqlite_utils.Database, contact_id: int, limit: int = 5) -> list[int]:
    """Ids of the contact's most recently created open deals (logged mail is filed on them)."""
    return [
        r["id"]
        for r in rows(
            db,
            """SELECT d.id FROM deals d JOIN deal_contacts dc ON dc.deal_id = d.id
               WHERE dc.contact_id = ? AND d.stage = 'open'
               ORDER BY d.created_at DESC, d.id DESC LIMIT ?""",
            [contact_id, limit],
        )
    ]
