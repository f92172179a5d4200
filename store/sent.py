"""Rows the relay writes for a sent email: the email, one delivery per copy, its links.

The tracker reads these: a token carries a delivery id (and a link position), the
delivery says which email and recipient/contact it was, ``links`` maps positions to the
original URLs (the same position in every copy of one email).
"""

from __future__ import annotations

import json

import sqlite_utils

from store.addresses import normalize
from store.db import now_iso
from store.emails import find_email
from store.sql import row, rows, transaction


def record_email(
    db: sqlite_utils.Database,
    *,
    message_key: str,
    message_id: str | None,
    user_id: int | None,
    from_addr: str,
    to_addrs: list[str],
    cc_addrs: list[str],
    subject: str,
    track_opens: bool,
    track_clicks: bool,
    untracked_reason: str | None,
    rewrite_error: str | None = None,
) -> tuple[int, bool]:
    """The ``emails`` row for a message sent through the relay: (id, created now).

    A message sent again with the same Message-ID (a client retrying after a lost 250)
    reuses its row, as the dedup key is shared with the ingest. A row the ingest made first
    (the mail was BCC'd or forwarded before it went through the relay) becomes the relay's:
    the authenticated sender and the tracking decision are what its copies carry now.
    """
    with transaction(db):
        found = find_email(db, message_key)
        if found:
            if found["source"] != "relay":
                db.execute(
                    """UPDATE emails SET source = 'relay', user_id = ?,
                           attribution = 'relay: authenticated user', track_opens = ?,
                           track_clicks = ?, untracked_reason = ?, rewrite_error = ?
                       WHERE id = ?""",
                    [
                        user_id,
                        int(track_opens),
                        int(track_clicks),
                        untracked_reason,
                        rewrite_error,
                        found["id"],
                    ],
                )
            return found["id"], False
        now = now_iso()
        cur = db.execute(
            """INSERT INTO emails (message_id, message_key, source, user_id, attribution,
                   from_addr, to_addrs, cc_addrs, subject, sent_at, track_opens, track_clicks,
                   untracked_reason, rewrite_error, created_at)
               VALUES (?, ?, 'relay', ?, 'relay: authenticated user', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            [
                message_id,
                message_key,
                user_id,
                from_addr,
                json.dumps(to_addrs),
                json.dumps(cc_addrs),
                subject,
                now,
                int(track_opens),
                int(track_clicks),
                untracked_reason,
                rewrite_error,
                now,
            ],
        )
        return cur.lastrowid, True


def set_rewrite_error(db: sqlite_utils.Database, email_id: int, error: str) -> None:
    """Rewriting failed (the original went out untouched, so nothing is tracked): keep why."""
    with transaction(db):
        db.execute(
            """UPDATE emails SET rewrite_error = ?, track_opens = 0, track_clicks = 0,
                   untracked_reason = ? WHERE id = ?""",
            [error[:2000], "rewrite-failed: " + error.split("\n", 1)[0][:300], email_id],
        )


def add_delivery(
    db: sqlite_utils.Database, email_id: int, recipient: str | None, shared: bool = False
) -> int:
    """One recipient copy (or the shared copy: recipient None, shared 1); links the contact."""
    contact_id = None
    if recipient is not None:
        recipient = normalize(recipient)
        found = row(db, "SELECT id FROM contacts WHERE email = ?", [recipient])
        contact_id = found["id"] if found else None
    with transaction(db):
        cur = db.execute(
            """INSERT INTO deliveries (email_id, recipient, contact_id, shared, created_at)
               VALUES (?, ?, ?, ?, ?)""",
            [email_id, None if shared else recipient, contact_id, int(shared), now_iso()],
        )
        return cur.lastrowid


def add_links(db: sqlite_utils.Database, email_id: int, links: list[tuple[int, str]]) -> None:
    """The tracked links (position, original URL); positions already stored are kept."""
    # One executemany: the statement is prepared once for the ~40 rows of a message, not
    # once per row through sqlite-utils' execute (the relay's committer records them).
    with transaction(db):
        db.conn.executemany(
            "INSERT OR IGNORE INTO links (email_id, position, url) VALUES (?, ?, ?)",
            [(email_id, position, url) for position, url in links],
        )


def mark_delivered(db: sqlite_utils.Database, delivery_ids: list[int]) -> None:
    """The upstream accepted these copies."""
    if not delivery_ids:
        return
    marks = ",".join("?" for _ in delivery_ids)
    with transaction(db):
        db.execute(
            f"UPDATE deliveries SET delivered_at = ? WHERE id IN ({marks}) AND delivered_at IS NULL",
            [now_iso(), *delivery_ids],
        )


def deliveries_of(db: sqlite_utils.Database, email_id: int) -> list[dict]:
    return rows(db, "SELECT * FROM deliveries WHERE email_id = ? ORDER BY id", [email_id])


def links_of(db: sqlite_utils.Database, email_id: int) -> list[dict]:
    return rows(db, "SELECT * FROM links WHERE email_id = ? ORDER BY position", [email_id])


def email_by_id(db: sqlite_utils.Database, email_id: int) -> dict | None:
    return row(db, "SELECT * FROM emails WHERE id = ?", [email_id])


def discard(db: sqlite_utils.Database, email_id: int | None, delivery_ids: list[int]) -> None:
    """Remove rows made for a message that could not be queued (its sender will retry).

    ``email_id`` is given only when the email row was made for this attempt; it goes (with
    its links) unless another submission of the same message uses it by now.
    """
    with transaction(db):
        if delivery_ids:
            marks = ",".join("?" for _ in delivery_ids)
            db.execute(f"DELETE FROM deliveries WHERE id IN ({marks})", delivery_ids)
        if email_id is not None:
            db.execute(
                """DELETE FROM emails WHERE id = :id
                   AND NOT EXISTS (SELECT 1 FROM deliveries WHERE email_id = :id)
                   AND NOT EXISTS (SELECT 1 FROM outbox WHERE email_id = :id)""",
                {"id": email_id},
            )
