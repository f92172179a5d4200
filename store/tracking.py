"""What the tracker reads about a tracked copy, and a helper that creates sent copies.

The tracker classifies each hit against its copy (delivery): when it was delivered, how
many links it has, who it went to and whether that contact has a lawful basis, and the
copy's recent hits. All of it is read here, in one place, by the tracker's writer.
"""

from __future__ import annotations

import json
import secrets

import sqlite_utils

from store.db import now_iso
from store.sql import row, rows, transaction


def copy_context(db: sqlite_utils.Database, delivery_id: int) -> dict | None:
    """The copy, its email, its sender and its contact's lawful basis; None if erased."""
    return row(
        db,
        """SELECT d.id AS delivery_id, d.email_id, d.recipient, d.contact_id, d.shared,
                  d.delivered_at, d.created_at, e.user_id, e.subject, e.track_opens,
                  e.track_clicks, u.email AS user_email, c.lawful_basis, c.email AS contact_email,
                  (SELECT COUNT(*) FROM links l WHERE l.email_id = d.email_id) AS link_count
           FROM deliveries d JOIN emails e ON e.id = d.email_id
           LEFT JOIN users u ON u.id = e.user_id
           LEFT JOIN contacts c ON c.id = d.contact_id
           WHERE d.id = ?""",
        [delivery_id],
    )


def link_id(db: sqlite_utils.Database, email_id: int, position: int) -> dict | None:
    """The stored link at ``position`` of an email (id and url), or None."""
    return row(
        db, "SELECT id, url FROM links WHERE email_id = ? AND position = ?", [email_id, position]
    )


def recent_hits(db: sqlite_utils.Database, delivery_id: int, since: str) -> list[dict]:
    """The copy's non-inferred open/click events at or after ``since``, oldest first."""
    return rows(
        db,
        """SELECT ev.id, ev.kind, ev.at, ev.ip, ev.verdict, ev.reason, ev.link_id,
                  l.position, ev.method
           FROM events ev LEFT JOIN links l ON l.id = ev.link_id
           WHERE ev.delivery_id = ? AND ev.at >= ? AND ev.inferred = 0
             AND ev.kind IN ('open', 'click')
           ORDER BY ev.at, ev.id""",
        [delivery_id, since],
    )


def human_open_count(db: sqlite_utils.Database, delivery_id: int) -> int:
    """How many human opens (inferred included) the copy has: for "2nd open"."""
    return db.execute(
        "SELECT COUNT(*) FROM events WHERE delivery_id = ? AND kind = 'open' AND verdict = 'human'",
        [delivery_id],
    ).fetchone()[0]


def add_sent_email(
    db: sqlite_utils.Database,
    *,
    user_id: int | None,
    subject: str = "",
    recipients: list[tuple[str, int | None]] = (),  # type: ignore[assignment]
    links: list[str] = (),  # type: ignore[assignment]
    shared: bool = False,
    delivered_at: str | None = None,
    from_addr: str = "",
    message_id: str | None = None,
) -> dict:
    """A relay-sent email with its copies and links (what the relay stores when sending).

    ``recipients`` are (address, contact_id) pairs, one copy each; ``shared`` makes one
    copy for all of them with no recipient. Returns the email id, delivery ids (in
    recipient order) and link ids (by position, starting at 0).
    """
    now = now_iso()
    message_id = message_id or f"{secrets.token_hex(8)}@mailtally.test"
    with transaction(db):
        email_id = db.execute(
            """INSERT INTO emails (message_id, message_key, source, user_id, attribution,
                   from_addr, to_addrs, subject, sent_at, track_opens, track_clicks, created_at)
               VALUES (?, ?, 'relay', ?, 'relay', ?, ?, ?, ?, 1, 1, ?)""",
            [
                message_id,
                "mid:" + message_id,
                user_id,
                from_addr,
                json.dumps([r for r, _ in recipients]),
                subject,
                now,
                now,
            ],
        ).lastrowid
        copies = [(None, None)] if shared else list(recipients)
        delivery_ids = [
            db.execute(
                """INSERT INTO deliveries (email_id, recipient, contact_id, shared, created_at,
                       delivered_at) VALUES (?, ?, ?, ?, ?, ?)""",
                [email_id, addr, contact_id, int(shared), now, delivered_at or now],
            ).lastrowid
            for addr, contact_id in copies
        ]
        link_ids = [
            db.execute(
                "INSERT INTO links (email_id, position, url) VALUES (?, ?, ?)",
                [email_id, position, url],
            ).lastrowid
            for position, url in enumerate(links)
        ]
    return {"email_id": email_id, "deliveries": delivery_ids, "links": link_ids}


def delete_email(db: sqlite_utils.Database, email_id: int) -> None:
    """Erase an email with its copies, links and events."""
    with transaction(db):
        db.execute("DELETE FROM emails WHERE id = ?", [email_id])
