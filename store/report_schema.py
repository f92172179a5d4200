"""Summary tables that keep ``report emails`` fast, maintained by triggers.

Aggregating a million events for every report costs seconds. ``report_people`` holds,
per email and per person (``target``: the recipient's address, or '' for "Someone" — a
shared copy, an anonymous privacy-mode hit, or nobody known), whether that person is a
recipient and the aggregate of their hits; ``report_reasons`` counts the machine and
self hits per reason. Triggers on events, deliveries, email_contacts and contacts keep
both exact, so every writer (tracker, ingest replies, re-labelling, erasure) stays
correct without knowing about them. A new event is one upsert; anything rarer (a delete,
a re-labelled verdict, an erased contact) recomputes the rows concerned from the events.
"""

from __future__ import annotations

import sqlite_utils

# Whom an event's hits belong to; {e} is an events row alias (NEW, OLD or ev).
_TARGET = """(CASE WHEN {e}.anonymous THEN ''
     WHEN {e}.delivery_id IS NOT NULL THEN coalesce(
         (SELECT d.recipient FROM deliveries d WHERE d.id = {e}.delivery_id AND d.shared = 0), '')
     ELSE coalesce((SELECT c.email FROM contacts c WHERE c.id = {e}.contact_id), '') END)"""
# The email of an event (the copy's email when the event names only the copy).
_EMAIL = (
    "coalesce({e}.email_id, (SELECT d.email_id FROM deliveries d WHERE d.id = {e}.delivery_id))"
)
# The events of email {x} (also those that name only one of its copies).
_EVENTS_OF = """(ev.email_id = {x} OR (ev.email_id IS NULL
     AND ev.delivery_id IN (SELECT d.id FROM deliveries d WHERE d.email_id = {x})))"""
# Whether {t} is a recipient of email {x}: a copy of a sent email, a contact of a logged one.
_IS_RECIPIENT = """(CASE WHEN (SELECT e.source FROM emails e WHERE e.id = {x}) = 'relay'
     THEN EXISTS (SELECT 1 FROM deliveries d WHERE d.email_id = {x} AND d.recipient = {t}
                  AND d.shared = 0)
     ELSE EXISTS (SELECT 1 FROM email_contacts ec JOIN contacts c ON c.id = ec.contact_id
                  WHERE ec.email_id = {x} AND c.email = {t}) END)"""

_STATS = """count(*),
    coalesce(sum({e}.kind = 'open' AND {e}.verdict = 'human'), 0),
    coalesce(sum({e}.kind = 'click' AND {e}.verdict = 'human'), 0),
    min(CASE WHEN {e}.kind = 'open' AND {e}.verdict = 'human' THEN {e}.at END),
    max(CASE WHEN {e}.kind = 'open' AND {e}.verdict = 'human' THEN {e}.at END),
    coalesce(sum({e}.kind = 'open' AND {e}.verdict = 'human' AND {e}.inferred), 0),
    coalesce(sum({e}.kind = 'reply' AND {e}.verdict = 'human'), 0),
    coalesce(sum({e}.kind = 'open' AND {e}.verdict = 'machine'), 0),
    coalesce(sum({e}.kind = 'click' AND {e}.verdict = 'machine'), 0),
    coalesce(sum({e}.kind = 'open' AND {e}.verdict = 'self'), 0),
    coalesce(sum({e}.kind = 'click' AND {e}.verdict = 'self'), 0)"""
_STAT_COLUMNS = """hits, opens, clicks, first_open_at, last_open_at, inferred_opens, replies,
    machine_opens, machine_clicks, self_opens, self_clicks"""
_OTHER = "{e}.verdict != 'human' AND {e}.kind IN ('open', 'click')"

# While a row is here (only ever inside one writer's transaction), the per-event insert
# triggers stand aside and that writer folds its events (id >= from_id) into the summaries
# in one grouped statement: see :func:`begin_batch`.
BATCH_TABLE = """CREATE TABLE IF NOT EXISTS report_batch (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        from_id INTEGER NOT NULL
    )"""
_NOT_BATCHED = "NOT EXISTS (SELECT 1 FROM report_batch)"

TABLES = [
    """CREATE TABLE report_people (
        email_id INTEGER NOT NULL REFERENCES emails(id) ON DELETE CASCADE,
        target TEXT NOT NULL,
        recipient INTEGER NOT NULL DEFAULT 0,
        hits INTEGER NOT NULL DEFAULT 0,
        opens INTEGER NOT NULL DEFAULT 0,
        clicks INTEGER NOT NULL DEFAULT 0,
        first_open_at TEXT,
        last_open_at TEXT,
        inferred_opens INTEGER NOT NULL DEFAULT 0,
        replies INTEGER NOT NULL DEFAULT 0,
        machine_opens INTEGER NOT NULL DEFAULT 0,
        machine_clicks INTEGER NOT NULL DEFAULT 0,
        self_opens INTEGER NOT NULL DEFAULT 0,
        self_clicks INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (email_id, target)
    ) WITHOUT ROWID""",
    """CREATE TABLE report_reasons (
        email_id INTEGER NOT NULL REFERENCES emails(id) ON DELETE CASCADE,
        target TEXT NOT NULL,
        verdict TEXT NOT NULL,
        reason TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (email_id, target, verdict, reason)
    ) WITHOUT ROWID""",
    "CREATE INDEX idx_report_people_target ON report_people(target)",
    """CREATE TABLE report_emails (
        email_id INTEGER PRIMARY KEY REFERENCES emails(id) ON DELETE CASCADE,
        tail TEXT NOT NULL
    )""",
    BATCH_TABLE,
]


def bool_sql(expr: str) -> str:
    return f"json(CASE WHEN {expr} THEN 'true' ELSE 'false' END)"


def _others(x: str, opens: str, clicks: str, where: str) -> str:
    """``, 'machine', {...}, 'self', {...}`` (--all-hits); {v} in the arguments is the verdict."""
    parts = []
    for v in ("machine", "self"):
        parts.append(
            f"""'{v}', json_object('opens', {opens.format(v=v)}, 'clicks', {clicks.format(v=v)},
                'reasons', json(coalesce((SELECT json_group_object(reason, n) FROM (
                    SELECT rr.reason, sum(rr.n) AS n FROM report_reasons rr
                    WHERE rr.email_id = {x} AND rr.verdict = '{v}' {where}
                    GROUP BY rr.reason ORDER BY rr.reason)), '{{}}')))"""
        )
    return ", " + ", ".join(parts)


def tail_sql(x: str, all_hits: bool = False) -> str:
    """A query for the hit part of email ``x``'s report entry, as a JSON object text:
    ``{"opens", "clicks", "someone", "recipients"}`` (recipients by address), plus
    ``"machine"`` and ``"self"`` with their reasons when ``all_hits``."""
    email_extra = someone_extra = recipient_extra = ""
    if all_hits:
        email_extra = _others(
            x, "coalesce(sum(h.{v}_opens), 0)", "coalesce(sum(h.{v}_clicks), 0)", ""
        )
        someone_extra = _others(
            x,
            "coalesce(sum(h.{v}_opens) FILTER (WHERE h.target = ''), 0)",
            "coalesce(sum(h.{v}_clicks) FILTER (WHERE h.target = ''), 0)",
            "AND rr.target = ''",
        )
        recipient_extra = _others(x, "h.{v}_opens", "h.{v}_clicks", "AND rr.target = h.target")
    return f"""SELECT json_object(
        'opens', coalesce(sum(h.opens), 0),
        'clicks', coalesce(sum(h.clicks), 0),
        'someone', json_object(
            'opens', coalesce(sum(h.opens) FILTER (WHERE h.target = ''), 0),
            'clicks', coalesce(sum(h.clicks) FILTER (WHERE h.target = ''), 0) {someone_extra}),
        'recipients', json_group_array(json_object(
            'address', h.target,
            'opens', h.opens,
            'clicks', h.clicks,
            'first_open_at', h.first_open_at,
            'last_open_at', h.last_open_at,
            'inferred_open', {bool_sql("h.inferred_opens > 0")},
            'replied', {bool_sql("h.replies > 0")} {recipient_extra})) FILTER (WHERE h.target > '')
        {email_extra})
    FROM report_people h WHERE h.email_id = {x}"""


def _refresh_email(x: str) -> list[str]:
    """Re-render the cached human-hits part of email ``x``'s report entry."""
    return [
        f"""INSERT INTO report_emails (email_id, tail)
            SELECT {x}, ({tail_sql(x)}) WHERE EXISTS (SELECT 1 FROM emails e WHERE e.id = {x})
            ON CONFLICT (email_id) DO UPDATE SET tail = excluded.tail"""
    ]


def _recompute(rows: str) -> list[str]:
    """Statements that rebuild the report_people/report_reasons rows matching ``rows`` (a
    condition on ``{p}.email_id``/``{p}.target``) from the current events and recipients.

    Trigger bodies cannot alias tables, hence the full table names.
    """
    people, reasons = rows.format(p="report_people"), rows.format(p="report_reasons")
    x, t = "report_people.email_id", "report_people.target"
    return [
        f"""UPDATE report_people SET recipient = {_IS_RECIPIENT.format(x=x, t=t)},
                ({_STAT_COLUMNS}) = (SELECT {_STATS.format(e="ev")} FROM events ev
                    WHERE {_EVENTS_OF.format(x=x)} AND {_TARGET.format(e="ev")} = {t})
            WHERE {people}""",
        f"DELETE FROM report_reasons WHERE {reasons}",
        f"""INSERT INTO report_reasons (email_id, target, verdict, reason, n)
            SELECT {x}, {t}, ev.verdict, ev.reason, count(*)
            FROM report_people JOIN events ev ON {_EVENTS_OF.format(x=x)}
            WHERE {people} AND {_OTHER.format(e="ev")} AND {_TARGET.format(e="ev")} = {t}
            GROUP BY {x}, {t}, ev.verdict, ev.reason""",
        f"DELETE FROM report_people WHERE {people} AND recipient = 0 AND hits = 0",
    ]


def _recompute_event(e: str) -> list[str]:
    """Rebuild the row of the person the ``{e}`` event belongs to (created if missing)."""
    x, t = _EMAIL.format(e=e), _TARGET.format(e=e)
    return [
        f"""INSERT OR IGNORE INTO report_people (email_id, target) SELECT {x}, {t}
            WHERE EXISTS (SELECT 1 FROM emails e WHERE e.id = {x})""",
        *_recompute(f"{{p}}.email_id = {x} AND {{p}}.target = {t}"),
    ]


def _recompute_person(x: str, t: str) -> list[str]:
    return [
        f"""INSERT OR IGNORE INTO report_people (email_id, target)
            SELECT {x}, {t} WHERE {t} IS NOT NULL AND EXISTS (SELECT 1 FROM emails e WHERE e.id = {x})""",
        *_recompute(f"{{p}}.email_id = {x} AND {{p}}.target = {t}"),
    ]


# One event's contribution to its person's row, as plain expressions (no aggregate: this
# runs for every hit the tracker records).
_ONE = """1,
    NEW.kind = 'open' AND NEW.verdict = 'human',
    NEW.kind = 'click' AND NEW.verdict = 'human',
    CASE WHEN NEW.kind = 'open' AND NEW.verdict = 'human' THEN NEW.at END,
    CASE WHEN NEW.kind = 'open' AND NEW.verdict = 'human' THEN NEW.at END,
    NEW.kind = 'open' AND NEW.verdict = 'human' AND NEW.inferred,
    NEW.kind = 'reply' AND NEW.verdict = 'human',
    NEW.kind = 'open' AND NEW.verdict = 'machine',
    NEW.kind = 'click' AND NEW.verdict = 'machine',
    NEW.kind = 'open' AND NEW.verdict = 'self',
    NEW.kind = 'click' AND NEW.verdict = 'self'"""


# How a row of new counts is added to an existing summary row (the per-event trigger and
# the tracker's per-batch fold both upsert with it; only ``hits`` differs between them).
_ADD_COUNTS = """opens = opens + excluded.opens,
    clicks = clicks + excluded.clicks,
    first_open_at = CASE WHEN first_open_at IS NULL OR excluded.first_open_at < first_open_at
                         THEN coalesce(excluded.first_open_at, first_open_at)
                         ELSE first_open_at END,
    last_open_at = CASE WHEN last_open_at IS NULL OR excluded.last_open_at > last_open_at
                        THEN coalesce(excluded.last_open_at, last_open_at)
                        ELSE last_open_at END,
    inferred_opens = inferred_opens + excluded.inferred_opens,
    replies = replies + excluded.replies,
    machine_opens = machine_opens + excluded.machine_opens,
    machine_clicks = machine_clicks + excluded.machine_clicks,
    self_opens = self_opens + excluded.self_opens,
    self_clicks = self_clicks + excluded.self_clicks"""


def _insert_event() -> list[str]:
    """The incremental path for a new event (the tracker's hot path): one upsert."""
    x, t = _EMAIL.format(e="NEW"), _TARGET.format(e="NEW")
    return [
        f"""INSERT INTO report_people (email_id, target, {_STAT_COLUMNS})
            SELECT {x}, {t}, {_ONE} WHERE {x} IS NOT NULL
            ON CONFLICT (email_id, target) DO UPDATE SET
                hits = hits + 1,
                {_ADD_COUNTS}"""
    ]


def _insert_other_event() -> list[str]:
    """A machine or self hit also counts under its reason (trigger WHEN filters the rest)."""
    x, t = _EMAIL.format(e="NEW"), _TARGET.format(e="NEW")
    return [
        f"""INSERT INTO report_reasons (email_id, target, verdict, reason, n)
            SELECT {x}, {t}, NEW.verdict, NEW.reason, 1 WHERE {x} IS NOT NULL
            ON CONFLICT (email_id, target, verdict, reason) DO UPDATE SET n = n + 1"""
    ]


# An update that changes only an event's verdict or reason (a re-labelling: a burst seen
# later) leaves it with the same person; every other update may move it to another.
_SAME_PERSON = """OLD.kind IS NEW.kind AND OLD.inferred IS NEW.inferred AND OLD.at IS NEW.at
    AND OLD.email_id IS NEW.email_id AND OLD.delivery_id IS NEW.delivery_id
    AND OLD.contact_id IS NEW.contact_id AND OLD.anonymous IS NEW.anonymous"""


def _relabel_event() -> list[str]:
    """A re-labelled event: its person's row moves by the difference (one row, whatever the
    size of the email). Recomputing the row read every event of the email, ~0.2 s per
    re-labelling for a 20,000-recipient newsletter. Only when a human open that was the
    person's first or last stops being human are the first and last open read again."""
    x, t = _EMAIL.format(e="NEW"), _TARGET.format(e="NEW")
    row = f"email_id = {x} AND target = {t}"
    was, now = (
        "(OLD.kind = 'open' AND OLD.verdict = 'human')",
        "(NEW.kind = 'open' AND NEW.verdict = 'human')",
    )

    def diff(kind: str, verdict: str, extra: str = "") -> str:
        old = f"(OLD.kind = '{kind}' AND OLD.verdict = '{verdict}'{extra.format(e='OLD')})"
        new = f"(NEW.kind = '{kind}' AND NEW.verdict = '{verdict}'{extra.format(e='NEW')})"
        return f"{new} - {old}"

    counts = {
        "opens": diff("open", "human"),
        "clicks": diff("click", "human"),
        "inferred_opens": diff("open", "human", " AND {e}.inferred"),
        "replies": diff("reply", "human"),
        "machine_opens": diff("open", "machine"),
        "machine_clicks": diff("click", "machine"),
        "self_opens": diff("open", "self"),
        "self_clicks": diff("click", "self"),
    }
    sets = ",\n    ".join(f"{c} = {c} + {d}" for c, d in counts.items())
    reason = "verdict = {e}.verdict AND reason = {e}.reason"
    changed = "(OLD.verdict IS NOT NEW.verdict OR OLD.reason IS NOT NEW.reason)"
    return [
        f"""UPDATE report_people SET {sets},
    first_open_at = CASE WHEN {now} AND NOT {was}
        AND (first_open_at IS NULL OR NEW.at < first_open_at) THEN NEW.at ELSE first_open_at END,
    last_open_at = CASE WHEN {now} AND NOT {was}
        AND (last_open_at IS NULL OR NEW.at > last_open_at) THEN NEW.at ELSE last_open_at END
    WHERE {row}""",
        f"""UPDATE report_people SET (first_open_at, last_open_at) = (
        SELECT min(ev.at), max(ev.at) FROM events ev
        WHERE {_EVENTS_OF.format(x=x)} AND ev.kind = 'open' AND ev.verdict = 'human'
            AND {_TARGET.format(e="ev")} = {t})
    WHERE {row} AND {was} AND NOT {now} AND (first_open_at = OLD.at OR last_open_at = OLD.at)""",
        f"""UPDATE report_reasons SET n = n - 1
    WHERE {row} AND {reason.format(e="OLD")} AND {_OTHER.format(e="OLD")} AND {changed}""",
        f"DELETE FROM report_reasons WHERE {row} AND n <= 0",
        f"""INSERT INTO report_reasons (email_id, target, verdict, reason, n)
    SELECT {x}, {t}, NEW.verdict, NEW.reason, 1
    WHERE {x} IS NOT NULL AND {_OTHER.format(e="NEW")} AND {changed}
    ON CONFLICT (email_id, target, verdict, reason) DO UPDATE SET n = n + 1""",
    ]


def _trigger(name: str, when: str, table: str, statements: list[str], cond: str = "") -> str:
    body = ";\n".join(statements)
    where = f" WHEN {cond}" if cond else ""
    return f"CREATE TRIGGER {name} {when} ON {table}{where} BEGIN\n{body};\nEND"


def _source(x: str) -> str:
    return f"(SELECT e.source FROM emails e WHERE e.id = {x})"


# The events columns a summary row depends on (an update of any of them fires a trigger).
_EVENT_SUMMARY_COLUMNS = (
    "kind, inferred, at, email_id, delivery_id, contact_id, anonymous, verdict, reason"
)

TRIGGERS = [
    _trigger("reports_events_insert", "AFTER INSERT", "events", _insert_event(), _NOT_BATCHED),
    _trigger(
        "reports_events_insert_other",
        "AFTER INSERT",
        "events",
        _insert_other_event(),
        f"{_OTHER.format(e='NEW')} AND {_NOT_BATCHED}",
    ),
    _trigger("reports_events_delete", "AFTER DELETE", "events", _recompute_event("OLD")),
    _trigger(
        "reports_events_update",
        f"AFTER UPDATE OF {_EVENT_SUMMARY_COLUMNS}",
        "events",
        [*_recompute_event("OLD"), *_recompute_event("NEW")],
        f"NOT ({_SAME_PERSON})",
    ),
    _trigger(
        "reports_events_relabel",
        f"AFTER UPDATE OF {_EVENT_SUMMARY_COLUMNS}",
        "events",
        _relabel_event(),
        _SAME_PERSON,
    ),
    _trigger(
        "reports_deliveries_insert",
        "AFTER INSERT",
        "deliveries",
        [
            """INSERT INTO report_people (email_id, target, recipient)
               VALUES (NEW.email_id, NEW.recipient, 1)
               ON CONFLICT (email_id, target) DO UPDATE SET recipient = 1"""
        ],
        f"NEW.shared = 0 AND NEW.recipient IS NOT NULL AND {_source('NEW.email_id')} = 'relay'",
    ),
    _trigger(
        "reports_deliveries_delete",
        "AFTER DELETE",
        "deliveries",
        _recompute_person("OLD.email_id", "OLD.recipient"),
        "OLD.recipient IS NOT NULL",
    ),
    _trigger(
        "reports_email_contacts_insert",
        "AFTER INSERT",
        "email_contacts",
        [
            """INSERT INTO report_people (email_id, target, recipient)
               SELECT NEW.email_id, c.email, 1 FROM contacts c WHERE c.id = NEW.contact_id
               ON CONFLICT (email_id, target) DO UPDATE SET recipient = 1"""
        ],
        f"{_source('NEW.email_id')} != 'relay'",
    ),
    _trigger(
        "reports_email_contacts_delete",
        "AFTER DELETE",
        "email_contacts",
        _recompute_person(
            "OLD.email_id", "(SELECT c.email FROM contacts c WHERE c.id = OLD.contact_id)"
        ),
    ),
    # An erased contact: every row naming it is rebuilt (and goes when nothing is left).
    # Inside a batch, whoever changes report_people re-renders each email once at the end
    # (refresh_emails), not once per row changed.
    _trigger(
        "reports_people_insert",
        "AFTER INSERT",
        "report_people",
        _refresh_email("NEW.email_id"),
        _NOT_BATCHED,
    ),
    _trigger(
        "reports_people_update",
        "AFTER UPDATE",
        "report_people",
        _refresh_email("NEW.email_id"),
        _NOT_BATCHED,
    ),
    _trigger(
        "reports_people_delete",
        "AFTER DELETE",
        "report_people",
        _refresh_email("OLD.email_id"),
        _NOT_BATCHED,
    ),
    _trigger(
        "reports_contacts_delete", "AFTER DELETE", "contacts", _recompute("{p}.target = OLD.email")
    ),
]

BACKFILL = [
    """INSERT INTO report_people (email_id, target, recipient)
        SELECT DISTINCT d.email_id, d.recipient, 1 FROM deliveries d JOIN emails e ON e.id = d.email_id
        WHERE e.source = 'relay' AND d.shared = 0 AND d.recipient IS NOT NULL""",
    """INSERT OR IGNORE INTO report_people (email_id, target, recipient)
        SELECT ec.email_id, c.email, 1 FROM email_contacts ec
        JOIN contacts c ON c.id = ec.contact_id JOIN emails e ON e.id = ec.email_id
        WHERE e.source != 'relay'""",
    f"""INSERT INTO report_people (email_id, target, {_STAT_COLUMNS})
        SELECT {_EMAIL.format(e="ev")} AS x, {_TARGET.format(e="ev")} AS t, {_STATS.format(e="ev")}
        FROM events ev WHERE x IS NOT NULL GROUP BY x, t
        ON CONFLICT (email_id, target) DO UPDATE SET
            hits = excluded.hits, opens = excluded.opens, clicks = excluded.clicks,
            first_open_at = excluded.first_open_at, last_open_at = excluded.last_open_at,
            inferred_opens = excluded.inferred_opens, replies = excluded.replies,
            machine_opens = excluded.machine_opens, machine_clicks = excluded.machine_clicks,
            self_opens = excluded.self_opens, self_clicks = excluded.self_clicks""",
    f"""INSERT INTO report_reasons (email_id, target, verdict, reason, n)
        SELECT {_EMAIL.format(e="ev")} AS x, {_TARGET.format(e="ev")} AS t, ev.verdict, ev.reason,
               count(*)
        FROM events ev WHERE x IS NOT NULL AND {_OTHER.format(e="ev")}
        GROUP BY x, t, ev.verdict, ev.reason""",
    f"""INSERT INTO report_emails (email_id, tail)
        SELECT e.id, ({tail_sql("e.id")}) FROM emails e
        WHERE e.id IN (SELECT email_id FROM report_people)""",
]


def migrate_people(db: sqlite_utils.Database) -> None:
    """Migration ``reports_0001_people``: create, backfill from what exists, keep up to date.

    (``report_emails.tail`` caches each email's human-hits JSON: rendering 100,000 of them
    per report is most of its cost, a re-render per change is a few microseconds.)"""
    for statement in [*TABLES, *BACKFILL, *TRIGGERS]:
        db.conn.execute(statement)


def recreate_triggers(db: sqlite_utils.Database) -> None:
    """Migration ``reports_0002_triggers``: the current trigger definitions, whatever an
    earlier build installed (the hot insert path became cheaper; the tables are unchanged)."""
    conn = db.conn
    names = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'reports\\_%' ESCAPE '\\'"
    ).fetchall()
    for (name,) in names:
        conn.execute(f'DROP TRIGGER "{name}"')
    for statement in TRIGGERS:
        conn.execute(statement)


# Migration ``reports_0003_emails_cover``: `report emails` reads its email fields from this
# index alone, in report order; the rows themselves (with their bodies, often many KB spread
# over overflow pages) are never touched. Measured on 100,000 emails: 0.53 s → 0.29 s.
EMAILS_COVER = """CREATE INDEX idx_reports_emails_cover ON emails(
    sent_at, id, user_id, source, track_opens, track_clicks, untracked_reason, message_id, subject)"""

# Migration ``reports_0004_events_link``: `report links` finds each link's clicks (and
# deleting a link no longer scans the events for its ON DELETE SET NULL). Partial: only
# clicks carry a link, so opens cost the tracker nothing. 100,000 emails: 3.3 s → 1.3 s.
EVENTS_LINK = """CREATE INDEX idx_reports_events_link ON events(link_id, kind, verdict)
    WHERE link_id IS NOT NULL"""


# --- batched inserts (the tracker's writer) --------------------------------------------------

_FOLD_PEOPLE = f"""INSERT INTO report_people (email_id, target, {_STAT_COLUMNS})
    SELECT {_EMAIL.format(e="ev")} AS x, {_TARGET.format(e="ev")} AS t, {_STATS.format(e="ev")}
    FROM events ev WHERE ev.id >= :from AND x IS NOT NULL GROUP BY x, t
    ON CONFLICT (email_id, target) DO UPDATE SET
        hits = hits + excluded.hits,
        {_ADD_COUNTS}"""
_FOLD_REASONS = f"""INSERT INTO report_reasons (email_id, target, verdict, reason, n)
    SELECT {_EMAIL.format(e="ev")} AS x, {_TARGET.format(e="ev")} AS t, ev.verdict, ev.reason,
           count(*)
    FROM events ev WHERE ev.id >= :from AND x IS NOT NULL AND {_OTHER.format(e="ev")}
    GROUP BY x, t, ev.verdict, ev.reason
    ON CONFLICT (email_id, target, verdict, reason) DO UPDATE SET n = n + excluded.n"""


def begin_batch(db: sqlite_utils.Database) -> None:
    """Inside the caller's write transaction: stop the per-event insert triggers for it.

    Each event the tracker records used to cost a trigger run (an upsert plus a re-render
    of its email's cached report entry), the largest single cost of a hit. In a batch the
    events are summarised together by :func:`fold_batch`, one row per person touched.
    Other connections never see the gate row: it lives and dies inside this transaction,
    which holds the write lock throughout.
    """
    db.execute(
        "INSERT INTO report_batch (id, from_id) SELECT 1, coalesce(max(id), 0) + 1 FROM events"
    )


def fold_batch(db: sqlite_utils.Database) -> None:
    """Add the events inserted since :func:`begin_batch` (or the last fold) to the summaries.

    Call before changing or deleting earlier events in the same transaction (their
    triggers recompute from the events, so the summaries must be complete by then).
    """
    found = db.execute("SELECT from_id FROM report_batch").fetchone()
    if not found:
        return
    last = db.execute("SELECT max(id) FROM events").fetchone()[0] or 0
    if last >= found[0]:
        db.execute(_FOLD_PEOPLE, {"from": found[0]})
        db.execute(_FOLD_REASONS, {"from": found[0]})
        emails = db.execute(
            f"SELECT DISTINCT {_EMAIL.format(e='ev')} FROM events ev WHERE ev.id >= ?", [found[0]]
        ).fetchall()
        refresh_emails(db, [x for (x,) in emails if x is not None])
    db.execute("UPDATE report_batch SET from_id = ?", [last + 1])


def end_batch(db: sqlite_utils.Database) -> None:
    """Fold what is left and let the per-event triggers work again (before the commit)."""
    fold_batch(db)
    db.execute("DELETE FROM report_batch")


def install_batch_gate(db: sqlite_utils.Database) -> None:
    """Migration for databases made before the batch gate: the table and the triggers."""
    db.conn.execute(BATCH_TABLE)
    recreate_triggers(db)


_FOLD_PEOPLE_ROWS = f"""INSERT INTO report_people (email_id, target, {_STAT_COLUMNS})
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (email_id, target) DO UPDATE SET
        hits = hits + excluded.hits,
        {_ADD_COUNTS}"""
_FOLD_REASON_ROWS = """INSERT INTO report_reasons (email_id, target, verdict, reason, n)
    VALUES (?, ?, ?, ?, ?)
    ON CONFLICT (email_id, target, verdict, reason) DO UPDATE SET n = n + excluded.n"""


_REFRESH_EMAIL = _refresh_email(":x")[0]


def refresh_emails(db: sqlite_utils.Database, email_ids) -> None:
    """Re-render the cached report entries of ``email_ids`` (inside a batch the
    ``report_people`` triggers leave that to whoever changed the rows)."""
    db.conn.executemany(_REFRESH_EMAIL, [{"x": x} for x in email_ids])


def install_batched_refresh(db: sqlite_utils.Database) -> None:
    """Migration ``tracker_0004_batched_email_refresh``: the ``report_people`` triggers stand
    aside inside a batch too (a batch of 1,400 hits re-rendered some 1,200 report entries,
    one per person row it touched, for some 750 emails; a third of the writer's time)."""
    recreate_triggers(db)


def fold_counted(
    db: sqlite_utils.Database,
    people: dict[tuple[int, str], list],
    reasons: dict[tuple[int, str, str, str], int],
    next_id: int,
) -> None:
    """:func:`fold_batch` for a writer that counted its events itself before writing them:
    ``people`` maps (email id, target) to the values of ``_STAT_COLUMNS`` for its new
    events, ``reasons`` (email id, target, verdict, reason) to a count, and every event
    below ``next_id`` is in them. The events are not read back and grouped again.

    Only for events that name their email (``email_id`` set), as the tracker's do. The
    emails' cached report entries are left to the caller's :func:`refresh_emails` (once
    per batch, not per fold).
    """
    if people:
        db.conn.executemany(_FOLD_PEOPLE_ROWS, [(*k, *v) for k, v in people.items()])
    if reasons:
        db.conn.executemany(_FOLD_REASON_ROWS, [(*k, n) for k, n in reasons.items()])
    db.execute("UPDATE report_batch SET from_id = ?", [next_id])
