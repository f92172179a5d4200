"""Open, click and reply events: inserting them, inferred opens, contact properties.

Every hit becomes an event with a verdict and a reason; nothing is dropped. The two
side effects of a human event live here, in one place, so the tracker's clicks and the
ingest's replies behave the same: an inferred open for a copy that has no human open
yet (HubSpot's retroactive open), and the contact's ``last_*_at`` properties.
"""

from __future__ import annotations

import functools

import sqlite_utils

from store import report_schema
from store.sql import row, rows, transaction

# The columns every recorded hit has; ``caused_by`` links an inferred open to its cause.
HIT_COLUMNS = (
    "kind",
    "inferred",
    "at",
    "email_id",
    "delivery_id",
    "link_id",
    "contact_id",
    "anonymous",
    "ip",
    "user_agent",
    "method",
    "verdict",
    "reason",
)
COLUMNS = (*HIT_COLUMNS, "caused_by")
_INSERT = f"INSERT INTO events ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
_PROPERTY = {"open": "last_open_at", "click": "last_click_at", "reply": "last_reply_at"}


def insert_event(db: sqlite_utils.Database, event: dict) -> list[int]:
    """Insert one event (inside the caller's transaction, or its own); return the new ids.

    A human click or reply on a copy without a human open also gets an inferred open,
    at the same time; a human, non-anonymous event updates its contact's properties.
    The first id is the event itself, a second one (if any) the inferred open.
    """
    values = {c: event.get(c) for c in COLUMNS}
    values["inferred"] = int(values["inferred"] or 0)
    values["anonymous"] = int(values["anonymous"] or 0)
    with transaction(db):
        cur = db.execute(_INSERT, [values[c] for c in COLUMNS])
        ids = [cur.lastrowid]
        if values["verdict"] == "human":
            if values["kind"] in ("click", "reply") and not values["inferred"]:
                inferred = infer_open(db, values, caused_by=cur.lastrowid)
                if inferred is not None:
                    ids.append(inferred)
            touch_contact(db, values)
    return ids


# A batch goes in as multi-row INSERTs of up to CHUNK rows (one statement run per chunk):
# in the writer's own process the GIL no longer matters, and plain bound values cost less
# than a JSON array that SQLite takes apart again with a json_extract per column.
_NUMBERED = ("id", *COLUMNS)
CHUNK = 64  # rows per statement: 960 parameters, well under SQLite's 32,766
_ROW_MARKS = "(" + ", ".join("?" * len(_NUMBERED)) + ")"


@functools.lru_cache(maxsize=CHUNK)
def _insert_rows(n: int) -> str:
    """The INSERT of ``n`` numbered rows."""
    return f"INSERT INTO events ({', '.join(_NUMBERED)}) VALUES " + ", ".join([_ROW_MARKS] * n)


# Flags stored as 0/1 whatever the caller's event dict holds (missing, None, bool).
_INFERRED, _ANONYMOUS = _NUMBERED.index("inferred"), _NUMBERED.index("anonymous")


def next_event_id(db: sqlite_utils.Database) -> int:
    """The id the next event will get (stable while the caller holds the write lock)."""
    return db.execute("SELECT coalesce(max(id), 0) + 1 FROM events").fetchone()[0]


def insert_numbered(db: sqlite_utils.Database, events: list[dict]) -> None:
    """Insert events that carry their own ``id`` (numbered from :func:`next_event_id` in the
    same write transaction), in one statement.

    Unlike :func:`insert_event` this adds no inferred opens and touches no contact: a
    caller that batches (the tracker's writer) decides those itself, for the whole batch,
    with :func:`touch_contacts`.
    """
    if not events:
        return
    values: list = []
    for e in events:
        row_values = [e.get(c) for c in _NUMBERED]
        row_values[_INFERRED] = int(row_values[_INFERRED] or 0)
        row_values[_ANONYMOUS] = int(row_values[_ANONYMOUS] or 0)
        values += row_values
    width = len(_NUMBERED)
    execute = db.conn.execute
    for start in range(0, len(events), CHUNK):
        n = min(CHUNK, len(events) - start)
        execute(_insert_rows(n), values[start * width : (start + n) * width])


# Moves a contact's properties forward; the WHERE leaves alone (does not rewrite) a row
# that no value would change, e.g. a contact opened again within the same microsecond.
_LATER = "CASE WHEN {v} IS NOT NULL AND ({c} IS NULL OR {c} < {v}) THEN {v} ELSE {c} END"
_MOVES = "({v} IS NOT NULL AND ({c} IS NULL OR {c} < {v}))"
_TOUCH = f"""UPDATE contacts SET last_open_at = {_LATER.format(c="last_open_at", v=":at")},
        last_engagement_at = {_LATER.format(c="last_engagement_at", v=":at")},
        last_click_at = {_LATER.format(c="last_click_at", v=":click")}
    WHERE id = :id AND ({_MOVES.format(c="last_open_at", v=":at")}
        OR {_MOVES.format(c="last_engagement_at", v=":at")}
        OR {_MOVES.format(c="last_click_at", v=":click")})"""


def touch_contacts(db: sqlite_utils.Database, latest: dict[int, tuple[str, str | None]]) -> None:
    """:func:`touch_contact` for many contacts at once: contact id -> (latest human open or
    click time, latest human click time or None)."""
    if not latest:
        return
    db.conn.executemany(
        _TOUCH, [{"id": cid, "at": at, "click": click} for cid, (at, click) in latest.items()]
    )


def infer_open(db: sqlite_utils.Database, event: dict, *, caused_by: int) -> int | None:
    """Add an inferred open at ``event``'s time unless its copy already has a human open.

    The copy is the delivery; without one (a reply matched only to email and contact)
    it is that email's events for that contact.
    """
    if event.get("delivery_id") is not None:
        where, params = "delivery_id = ?", [event["delivery_id"]]
    elif event.get("email_id") is not None:
        where, params = "email_id = ? AND contact_id IS ?", [event["email_id"], event["contact_id"]]
    else:
        return None
    found = row(
        db,
        f"SELECT 1 AS x FROM events WHERE {where} AND kind = 'open' AND verdict = 'human'",
        params,
    )
    if found:
        return None
    opened = dict(event, kind="open", inferred=1, link_id=None, caused_by=caused_by)
    opened["reason"] = f"inferred_from_{event['kind']}"
    cur = db.execute(_INSERT, [opened.get(c) for c in COLUMNS])
    return cur.lastrowid


def touch_contact(db: sqlite_utils.Database, event: dict) -> None:
    """Move the contact's ``last_*_at`` forward for a human, non-anonymous event.

    A click or a reply implies the mail was opened then, so it moves ``last_open_at`` too.
    """
    if event.get("verdict") != "human" or event.get("anonymous") or not event.get("contact_id"):
        return
    columns = {_PROPERTY[event["kind"]], "last_open_at", "last_engagement_at"}
    sets = ", ".join(
        f"{c} = CASE WHEN {c} IS NULL OR {c} < :at THEN :at ELSE {c} END" for c in sorted(columns)
    )
    db.execute(
        f"UPDATE contacts SET {sets} WHERE id = :id", {"at": event["at"], "id": event["contact_id"]}
    )


def recompute_contact(db: sqlite_utils.Database, contact_id: int) -> None:
    """Derive a contact's ``last_*_at`` again from its human events (after re-labelling)."""
    db.execute(
        """UPDATE contacts SET
             last_open_at = (SELECT MAX(at) FROM events WHERE contact_id = :id
                             AND verdict = 'human' AND anonymous = 0 AND kind IN ('open', 'click', 'reply')),
             last_click_at = (SELECT MAX(at) FROM events WHERE contact_id = :id
                              AND verdict = 'human' AND anonymous = 0 AND kind = 'click'),
             last_reply_at = (SELECT MAX(at) FROM events WHERE contact_id = :id
                              AND verdict = 'human' AND anonymous = 0 AND kind = 'reply'),
             last_engagement_at = (SELECT MAX(at) FROM events WHERE contact_id = :id
                                   AND verdict = 'human' AND anonymous = 0)
           WHERE id = :id""",
        {"id": contact_id},
    )


def relabel(
    db: sqlite_utils.Database, ids: list[int], verdict: str, reason: str, *, refresh: bool = True
) -> list[dict]:
    """Change the verdict of earlier events (a burst seen later); return the changed rows.

    Inferred opens caused by a re-labelled event follow it, and the contacts concerned
    get their properties recomputed so that a machine never counts as engagement.
    ``refresh=False``: inside a batch, the caller re-renders the emails' cached report
    entries itself (the changed rows' ``email_id``), once per batch instead of per call.
    """
    if not ids:
        return []
    with transaction(db):
        report_schema.fold_batch(db)  # the update triggers recompute from complete summaries
        marks = ",".join("?" * len(ids))
        caused = [
            r["id"] for r in rows(db, f"SELECT id FROM events WHERE caused_by IN ({marks})", ids)
        ]
        every = list(dict.fromkeys([*ids, *caused]))
        marks = ",".join("?" * len(every))
        changed = rows(
            db,
            f"SELECT * FROM events WHERE id IN ({marks}) AND (verdict != ? OR reason != ?)",
            [*every, verdict, reason],
        )
        if not changed:
            return []
        db.execute(
            f"UPDATE events SET verdict = ?, reason = ? WHERE id IN ({marks})",
            [verdict, reason, *every],
        )
        for contact_id in {c["contact_id"] for c in changed if c["contact_id"]}:
            recompute_contact(db, contact_id)
        # Inside a batch the summary triggers leave the cached report entries to us.
        if refresh:
            report_schema.refresh_emails(db, {c["email_id"] for c in changed if c["email_id"]})
    for c in changed:
        c["previous_verdict"], c["verdict"], c["reason"] = c["verdict"], verdict, reason
    return changed


def record_reply(
    db: sqlite_utils.Database,
    *,
    email_id: int,
    delivery_id: int | None,
    contact_id: int | None,
    at: str,
) -> None:
    """A logged reply to a tracked email: a human reply event, plus an inferred open
    when that copy has no human open yet, and the contact's last_reply/engagement times.

    Called by the ingest when a forwarded reply answers a tracked email. Recording the
    same reply twice (same email, contact and time) is a no-op.
    """
    with transaction(db):
        if row(
            db,
            """SELECT 1 AS x FROM events WHERE kind = 'reply' AND email_id = ?
               AND contact_id IS ? AND at = ?""",
            [email_id, contact_id, at],
        ):
            return
        insert_event(
            db,
            {
                "kind": "reply",
                "at": at,
                "email_id": email_id,
                "delivery_id": delivery_id,
                "contact_id": contact_id,
                "verdict": "human",
                "reason": "reply",
            },
        )


def events_of_delivery(db: sqlite_utils.Database, delivery_id: int) -> list[dict]:
    """Every event of one copy, oldest first."""
    return rows(db, "SELECT * FROM events WHERE delivery_id = ? ORDER BY at, id", [delivery_id])


def events_of_email(db: sqlite_utils.Database, email_id: int) -> list[dict]:
    """Every event of one email, oldest first."""
    return rows(db, "SELECT * FROM events WHERE email_id = ? ORDER BY at, id", [email_id])


def count_events(db: sqlite_utils.Database) -> int:
    return db.execute("SELECT COUNT(*) FROM events").fetchone()[0]


def count_hits(db: sqlite_utils.Database) -> int:
    """Recorded hits: every event except inferred opens (which no request made)."""
    return db.execute("SELECT COUNT(*) FROM events WHERE inferred = 0").fetchone()[0]
