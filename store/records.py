"""Plain record writers for emails, copies, links and events.

The relay, tracker and ingest write these rows through their own store modules; these
functions exist so that report tests and the benchmark generator can build exactly the
rows they need without writing SQL outside ``store/``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import sqlite_utils

from store.db import now_iso
from store.events import HIT_COLUMNS
from store.sql import transaction

KINDS = ("open", "click", "reply")
VERDICTS = ("human", "machine", "self")


def add_email(
    db: sqlite_utils.Database,
    *,
    message_id: str,
    source: str = "relay",
    user_id: int | None = None,
    subject: str = "",
    sent_at: str | None = None,
    from_addr: str = "",
    to: Sequence[str] = (),
    cc: Sequence[str] = (),
    track_opens: bool = False,
    track_clicks: bool = False,
    untracked_reason: str | None = None,
    text_body: str | None = None,
    html_body: str | None = None,
) -> int:
    """Insert one email (sent or logged) and return its id."""
    with transaction(db):
        cur = db.execute(
            """INSERT INTO emails (message_id, message_key, source, user_id, from_addr, to_addrs,
                   cc_addrs, subject, sent_at, text_body, html_body, track_opens, track_clicks,
                   untracked_reason, created_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            [
                message_id,
                "mid:" + message_id,
                source,
                user_id,
                from_addr,
                json.dumps(list(to)),
                json.dumps(list(cc)),
                subject,
                sent_at or now_iso(),
                text_body,
                html_body,
                int(track_opens),
                int(track_clicks),
                untracked_reason,
                now_iso(),
            ],
        )
    return cur.lastrowid


def add_delivery(
    db: sqlite_utils.Database,
    email_id: int,
    recipient: str | None,
    contact_id: int | None = None,
    *,
    shared: bool = False,
    created_at: str | None = None,
) -> int:
    """One copy of a sent email: per recipient, or shared (``recipient`` None)."""
    at = created_at or now_iso()
    with transaction(db):
        cur = db.execute(
            """INSERT INTO deliveries (email_id, recipient, contact_id, shared, created_at,
                   delivered_at) VALUES (?, ?, ?, ?, ?, ?)""",
            [email_id, recipient, contact_id, int(shared), at, at],
        )
    return cur.lastrowid


def add_link(db: sqlite_utils.Database, email_id: int, position: int, url: str) -> int:
    with transaction(db):
        cur = db.execute(
            "INSERT INTO links (email_id, position, url) VALUES (?, ?, ?)",
            [email_id, position, url],
        )
    return cur.lastrowid


def link_contact(
    db: sqlite_utils.Database, email_id: int, contact_id: int, role: str = "to"
) -> None:
    """File an email on a contact (what BCC/forward logging does)."""
    with transaction(db):
        db.execute(
            "INSERT OR IGNORE INTO email_contacts (email_id, contact_id, role) VALUES (?, ?, ?)",
            [email_id, contact_id, role],
        )


def add_event(
    db: sqlite_utils.Database,
    *,
    kind: str,
    at: str,
    email_id: int,
    delivery_id: int | None = None,
    link_id: int | None = None,
    contact_id: int | None = None,
    verdict: str = "human",
    reason: str = "",
    inferred: bool = False,
    anonymous: bool = False,
    ip: str | None = None,
    user_agent: str | None = None,
    method: str | None = "GET",
) -> int:
    """Record one open, click or reply exactly as given (no classification here)."""
    if kind not in KINDS or verdict not in VERDICTS:
        raise ValueError(f"bad event kind/verdict: {kind}/{verdict}")
    with transaction(db):
        cur = db.execute(
            """INSERT INTO events (kind, inferred, at, email_id, delivery_id, link_id, contact_id,
                   anonymous, ip, user_agent, method, verdict, reason)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            [
                kind,
                int(inferred),
                at,
                email_id,
                delivery_id,
                link_id,
                contact_id,
                int(anonymous),
                None if anonymous else ip,
                None if anonymous else user_agent,
                method,
                verdict,
                reason or verdict,
            ],
        )
    return cur.lastrowid


def bulk_insert(
    db: sqlite_utils.Database, table: str, columns: Sequence[str], values: Iterable[Sequence]
) -> None:
    """Insert many rows in one transaction (the benchmark generator's fast path)."""
    if table not in (
        "users",
        "companies",
        "contacts",
        "emails",
        "deliveries",
        "links",
        "events",
        "email_contacts",
        "deals",
        "deal_contacts",
    ):
        raise ValueError(f"not a record table: {table}")
    names = ", ".join(columns)
    marks = ", ".join("?" * len(columns))
    with transaction(db):
        db.conn.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})", values)


def analyze(db: sqlite_utils.Database) -> None:
    """Refresh the query planner's statistics after a bulk load."""
    db.execute("ANALYZE")


def table_counts(db: sqlite_utils.Database) -> dict[str, int]:
    """Rows per table the reports read (benchmark sizes)."""
    names = ("emails", "deliveries", "links", "events", "email_contacts", "contacts", "users")
    return {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in names}


def insert_events_measured(
    db: sqlite_utils.Database, values: Sequence[Sequence], *, with_triggers: bool = True
) -> None:
    """Insert events 1000 per batch as the tracker's writer does, then roll everything back.

    For the benchmark of what the report triggers cost on the write path: without them,
    the insert trigger is dropped inside the same transaction and comes back on rollback.
    """
    columns = HIT_COLUMNS
    sql = f"INSERT INTO events ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
    conn = db.conn
    conn.execute("BEGIN IMMEDIATE")
    try:
        if not with_triggers:
            conn.execute("DROP TRIGGER reports_events_insert")
        for i in range(0, len(values), 1000):
            conn.execute("SAVEPOINT batch")
            conn.executemany(sql, values[i : i + 1000])
            conn.execute("RELEASE batch")
    finally:
        conn.execute("ROLLBACK")
