"""What the ingest reads and writes: logged emails, their contacts/deals/attachments, and
the inbound log that explains every received message.

The ingest decides with the read-only functions (so ``mailtally explain`` can run the same
rules without storing anything) and then files the result with :func:`file_email`, one
transaction per received message, which also writes the inbound-log entry. Because the
spool entry id is unique in the inbound log, a message re-processed after a crash is
recognised (:func:`processed_entry`) and never logged twice.
"""

from __future__ import annotations

import json

import sqlite_utils

from store.db import now_iso
from store.sql import row, rows, transaction

# --- reads used by the decision -------------------------------------------------------------


def processed_entry(db: sqlite_utils.Database, spool_id: str) -> dict | None:
    """The inbound-log entry of a spool entry already processed, or None."""
    return row(db, "SELECT * FROM inbound_log WHERE spool_path = ?", [spool_id])


def email_by_key(db: sqlite_utils.Database, key: str) -> dict | None:
    return row(
        db,
        "SELECT id, source, user_id, message_key, text_body, html_body FROM emails"
        " WHERE message_key = ?",
        [key],
    )


def contact_by_email(db: sqlite_utils.Database, address: str) -> dict | None:
    return row(db, "SELECT * FROM contacts WHERE email = ?", [address])


def tracked_email_for_reply(
    db: sqlite_utils.Database,
    contact_address: str,
    subject: str,
    in_reply_to: str | None = None,
) -> dict | None:
    """The relay-sent email a forwarded reply answers: by Message-ID when known, else the
    newest sent email with the same subject (``Re: X`` answers ``X``) that had a copy to
    ``contact_address``. Returns ``{email_id, delivery_id}`` or None."""
    if in_reply_to:
        found = row(
            db,
            """SELECT e.id AS email_id,
                      (SELECT d.id FROM deliveries d WHERE d.email_id = e.id
                       AND lower(d.recipient) = :c ORDER BY d.id LIMIT 1) AS delivery_id
               FROM emails e WHERE e.source = 'relay' AND e.message_key = :k""",
            {"c": contact_address, "k": in_reply_to},
        )
        if found:
            return found
    if not subject:
        return None
    return row(
        db,
        """SELECT e.id AS email_id, d.id AS delivery_id FROM emails e
           JOIN deliveries d ON d.email_id = e.id
           WHERE e.source = 'relay' AND lower(trim(e.subject)) = lower(trim(:s))
             AND lower(d.recipient) = :c
           ORDER BY e.sent_at DESC, e.id DESC LIMIT 1""",
        {"s": subject, "c": contact_address},
    )


# --- writes ---------------------------------------------------------------------------------


def ensure_email(db: sqlite_utils.Database, email: dict) -> tuple[int, bool]:
    """Insert the email unless its ``message_key`` exists; return (id, created).

    The UNIQUE constraint on ``message_key`` is what makes concurrent deliveries of the
    same message (several connections, several processes) end as one row.
    """
    with transaction(db):
        cur = db.execute(
            """INSERT INTO emails (message_id, message_key, source, user_id, attribution,
                   from_addr, to_addrs, cc_addrs, subject, sent_at, text_body, html_body,
                   created_at)
               VALUES (:message_id, :message_key, :source, :user_id, :attribution,
                   :from_addr, :to_addrs, :cc_addrs, :subject, :sent_at, :text_body,
                   :html_body, :created_at)
               ON CONFLICT(message_key) DO NOTHING""",
            {
                **email,
                "to_addrs": json.dumps(email.get("to_addrs", [])),
                "cc_addrs": json.dumps(email.get("cc_addrs", [])),
                "created_at": now_iso(),
            },
        )
        created = cur.rowcount == 1
        found = row(db, "SELECT id FROM emails WHERE message_key = ?", [email["message_key"]])
        if not created:
            # A row created elsewhere (the relay) gets the bodies it lacks.
            db.execute(
                """UPDATE emails SET text_body = COALESCE(text_body, :t),
                       html_body = COALESCE(html_body, :h) WHERE id = :id""",
                {"t": email.get("text_body"), "h": email.get("html_body"), "id": found["id"]},
            )
    return found["id"], created


def link_contact(
    db: sqlite_utils.Database, email_id: int, contact_id: int, role: str, deal_ids: list[int]
) -> None:
    """Put the email on the contact's timeline and on the given deals."""
    with transaction(db):
        db.execute(
            "INSERT OR IGNORE INTO email_contacts (email_id, contact_id, role) VALUES (?, ?, ?)",
            [email_id, contact_id, role],
        )
        for deal_id in deal_ids:
            db.execute(
                "INSERT OR IGNORE INTO email_deals (email_id, deal_id) VALUES (?, ?)",
                [email_id, deal_id],
            )


def link_deliveries(
    db: sqlite_utils.Database, email_id: int, contact_id: int, address: str
) -> None:
    """Relay-sent mail: the copies addressed to this contact now know their contact."""
    with transaction(db):
        db.execute(
            """UPDATE deliveries SET contact_id = ? WHERE email_id = ? AND lower(recipient) = ?
               AND contact_id IS NULL""",
            [contact_id, email_id, address.lower()],
        )


def add_attachment(
    db: sqlite_utils.Database,
    email_id: int,
    filename: str,
    content_type: str,
    size: int,
    sha256: str,
) -> None:
    """One attachment row (the same content twice on one email is kept once)."""
    with transaction(db):
        if row(
            db,
            "SELECT 1 AS x FROM attachments WHERE email_id = ? AND sha256 = ? AND filename = ?",
            [email_id, sha256, filename],
        ):
            return
        db.execute(
            """INSERT INTO attachments (email_id, filename, content_type, size, sha256)
               VALUES (?, ?, ?, ?, ?)""",
            [email_id, filename, content_type, size, sha256],
        )


def log_inbound(db: sqlite_utils.Database, entry: dict) -> int:
    """Write the inbound-log entry of one received message; return its id."""
    with transaction(db):
        cur = db.execute(
            """INSERT INTO inbound_log (received_at, spool_path, mail_from, rcpts, message_id,
                   kind, decision, reasons, email_id, processed_at, details, user_id)
               VALUES (:received_at, :spool_path, :mail_from, :rcpts, :message_id, :kind,
                   :decision, :reasons, :email_id, :processed_at, :details, :user_id)""",
            {
                "received_at": entry.get("received_at") or now_iso(),
                "spool_path": entry.get("spool_path"),
                "mail_from": entry.get("mail_from", ""),
                "rcpts": json.dumps(entry.get("rcpts", [])),
                "message_id": entry.get("message_id"),
                "kind": entry.get("kind"),
                "decision": entry["decision"],
                "reasons": json.dumps(entry.get("reasons", []), ensure_ascii=False),
                "email_id": entry.get("email_id"),
                "processed_at": now_iso(),
                "details": json.dumps(entry.get("details", {}), ensure_ascii=False, default=str),
                "user_id": entry.get("user_id"),
            },
        )
        return cur.lastrowid


def recent_inbound(db: sqlite_utils.Database, limit: int = 50) -> list[dict]:
    """The latest inbound-log entries, newest first, with the user's email."""
    found = rows(
        db,
        """SELECT l.id, l.received_at, l.kind, l.decision, l.mail_from, l.message_id,
                  l.email_id, u.email AS user, l.reasons, l.details
           FROM inbound_log l LEFT JOIN users u ON u.id = l.user_id
           ORDER BY l.received_at DESC, l.id DESC LIMIT ?""",
        [limit],
    )
    for r in found:
        r["reasons"] = json.loads(r["reasons"] or "[]")
        r["details"] = json.loads(r["details"] or "{}")
    return found


def inbound_entry(db: sqlite_utils.Database, entry_id: int) -> dict | None:
    found = row(db, "SELECT * FROM inbound_log WHERE id = ?", [entry_id])
    if found:
        found["reasons"] = json.loads(found["reasons"] or "[]")
        found["details"] = json.loads(found["details"] or "{}")
        found["rcpts"] = json.loads(found["rcpts"] or "[]")
    return found


def inbound_by_message_id(db: sqlite_utils.Database, message_id: str) -> list[dict]:
    """Entries for a Message-ID as received (tests and support look-ups)."""
    ids = [
        r["id"]
        for r in rows(
            db, "SELECT id FROM inbound_log WHERE message_id = ? ORDER BY id", [message_id]
        )
    ]
    return [inbound_entry(db, i) for i in ids]


def attachments_of(db: sqlite_utils.Database, email_id: int) -> list[dict]:
    return rows(db, "SELECT * FROM attachments WHERE email_id = ? ORDER BY id", [email_id])


def email_contacts_of(db: sqlite_utils.Database, email_id: int) -> list[dict]:
    return rows(
        db,
        """SELECT c.email, c.name, c.company_id, ec.role FROM email_contacts ec
           JOIN contacts c ON c.id = ec.contact_id WHERE ec.email_id = ? ORDER BY c.email""",
        [email_id],
    )


def email_deals_of(db: sqlite_utils.Database, email_id: int) -> list[int]:
    return [
        r["deal_id"]
        for r in rows(
            db, "SELECT deal_id FROM email_deals WHERE email_id = ? ORDER BY deal_id", [email_id]
        )
    ]


def email_row(db: sqlite_utils.Database, email_id: int) -> dict | None:
    return row(db, "SELECT * FROM emails WHERE id = ?", [email_id])


def count_emails(db: sqlite_utils.Database) -> int:
    return db.execute("SELECT COUNT(*) FROM emails").fetchone()[0]
