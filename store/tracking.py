"""What the tracker reads about a tracked copy, and a helper that creates sent copies.

The tracker classifies each hit against its copy (delivery): when it was delivered, how
many links it has, who it went to and whether that contact has a lawful basis, and the
copy's recent hits. All of it is read here, in one place, by the tracker's writer.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Iterator

import sqlite_utils

from store.db import now_iso
from store.sql import rows, transaction

_CONTEXT = """SELECT d.id AS delivery_id, d.email_id, d.recipient, d.contact_id, d.shared,
                  d.delivered_at, d.created_at, e.user_id, e.subject, u.email AS user_email,
                  c.lawful_basis, c.email AS contact_email,
                  (SELECT COUNT(*) FROM links l WHERE l.email_id = d.email_id) AS link_count
           FROM deliveries d JOIN emails e ON e.id = d.email_id
           LEFT JOIN users u ON u.id = e.user_id
           LEFT JOIN contacts c ON c.id = d.contact_id
           WHERE d.id IN ({marks})"""
_RECENT = """SELECT ev.id, ev.delivery_id, ev.kind, ev.at, ev.ip, ev.verdict, ev.reason,
                  l.position
           FROM events ev LEFT JOIN links l ON l.id = ev.link_id
           WHERE ev.delivery_id IN ({marks}) AND ev.at >= ? AND ev.inferred = 0
             AND ev.kind IN ('open', 'click')
           ORDER BY ev.at, ev.id"""
# SQLite allows 32,766 parameters per statement; a batch's ids are read in chunks.
_CHUNK = 500


def _chunks(ids: Iterable[int]) -> Iterator[list[int]]:
    ordered = sorted(set(ids))
    for i in range(0, len(ordered), _CHUNK):
        yield ordered[i : i + _CHUNK]


def copy_context(db: sqlite_utils.Database, delivery_id: int) -> dict | None:
    """The copy, its email, its sender and its contact's lawful basis; None if erased."""
    return copy_contexts(db, [delivery_id]).get(delivery_id)


def copy_contexts(db: sqlite_utils.Database, delivery_ids: Iterable[int]) -> dict[int, dict]:
    """:func:`copy_context` of many copies at once (the writer reads a batch's in one go);
    erased or unknown copies are missing from the result."""
    out: dict[int, dict] = {}
    for chunk in _chunks(delivery_ids):
        for r in rows(db, _CONTEXT.format(marks=",".join("?" * len(chunk))), chunk):
            out[r["delivery_id"]] = r
    return out


def link_ids(db: sqlite_utils.Database, email_ids: Iterable[int]) -> dict[tuple[int, int], int]:
    """The link ids of many emails, by (email id, position)."""
    out: dict[tuple[int, int], int] = {}
    for chunk in _chunks(email_ids):
        marks = ",".join("?" * len(chunk))
        for r in db.execute(
            f"SELECT email_id, position, id FROM links WHERE email_id IN ({marks})", chunk
        ).fetchall():
            out[(r[0], r[1])] = r[2]
    return out


def recent_hits_of(
    db: sqlite_utils.Database, delivery_ids: Iterable[int], since: str
) -> dict[int, list[dict]]:
    """Each copy's non-inferred open/click events at or after ``since``, by copy (each list
    oldest first; copies without any are missing)."""
    out: dict[int, list[dict]] = {}
    for chunk in _chunks(delivery_ids):
        sql = _RECENT.format(marks=",".join("?" * len(chunk)))
        for r in rows(db, sql, [*chunk, since]):
            out.setdefault(r["delivery_id"], []).append(r)
    return out


def human_open_counts(db: sqlite_utils.Database, delivery_ids: Iterable[int]) -> dict[int, int]:
    """How many human opens (inferred included) each copy has, for "2nd open" (copies
    without one are missing)."""
    out: dict[int, int] = {}
    for chunk in _chunks(delivery_ids):
        marks = ",".join("?" * len(chunk))
        for r in db.execute(
            f"""SELECT delivery_id, COUNT(*) FROM events WHERE delivery_id IN ({marks})
                AND kind = 'open' AND verdict = 'human' GROUP BY delivery_id""",
            chunk,
        ).fetchall():
            out[r[0]] = r[1]
    return out


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
