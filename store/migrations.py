"""Numbered schema migrations; an existing database is upgraded in place.

Each migration runs once, in list order, inside one transaction, and is recorded by
name in ``_migrations``. Add new ones at the end; never edit one that has shipped.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import sqlite_utils

from store import report_schema
from store.sql import transaction

Migration = tuple[str, Callable[[sqlite_utils.Database], None] | str]

CORE_SCHEMA = """
CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL DEFAULT '',
    password_hash TEXT,
    track_opens INTEGER NOT NULL DEFAULT 1,
    track_clicks INTEGER NOT NULL DEFAULT 1,
    log_sent INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
);
CREATE TABLE user_addresses (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    address TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('personal', 'alias', 'team')),
    created_at TEXT NOT NULL,
    UNIQUE (user_id, address)
);
CREATE INDEX idx_user_addresses_address ON user_addresses(address);
CREATE TABLE companies (
    id INTEGER PRIMARY KEY,
    domain TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL
);
CREATE TABLE contacts (
    id INTEGER PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL DEFAULT '',
    company_id INTEGER REFERENCES companies(id) ON DELETE SET NULL,
    lawful_basis TEXT NOT NULL DEFAULT 'unknown' CHECK (lawful_basis IN ('yes', 'no', 'unknown')),
    source TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    last_open_at TEXT,
    last_click_at TEXT,
    last_reply_at TEXT,
    last_engagement_at TEXT
);
CREATE TABLE deals (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    stage TEXT NOT NULL DEFAULT 'open' CHECK (stage IN ('open', 'won', 'lost')),
    created_at TEXT NOT NULL,
    closed_at TEXT
);
CREATE TABLE deal_contacts (
    deal_id INTEGER NOT NULL REFERENCES deals(id) ON DELETE CASCADE,
    contact_id INTEGER NOT NULL REFERENCES contacts(id) ON DELETE CASCADE,
    PRIMARY KEY (deal_id, contact_id)
);
CREATE TABLE never_log (
    entry TEXT PRIMARY KEY,
    created_at TEXT NOT NULL
);
CREATE TABLE forgotten (
    hash TEXT PRIMARY KEY,
    forgotten_at TEXT NOT NULL
);
CREATE TABLE emails (
    id INTEGER PRIMARY KEY,
    message_id TEXT,
    message_key TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL CHECK (source IN ('relay', 'bcc', 'forward')),
    user_id INTEGER REFERENCES users(id) ON DELETE SET NULL,
    attribution TEXT NOT NULL DEFAULT '',
    from_addr TEXT NOT NULL DEFAULT '',
    to_addrs TEXT NOT NULL DEFAULT '[]',
    cc_addrs TEXT NOT NULL DEFAULT '[]',
    subject TEXT NOT NULL DEFAULT '',
    sent_at TEXT NOT NULL,
    text_body TEXT,
    html_body TEXT,
    track_opens INTEGER NOT NULL DEFAULT 0,
    track_clicks INTEGER NOT NULL DEFAULT 0,
    untracked_reason TEXT,
    rewrite_error TEXT,
    created_at TEXT NOT NULL
);
CREATE TABLE email_contacts (
    email_id INTEGER NOT NULL REFERENCES emails(id) ON DELETE CASCADE,
    contact_id INTEGER NOT NULL REFERENCES contacts(id) ON DELETE CASCADE,
    role TEXT NOT NULL DEFAULT 'to',
    PRIMARY KEY (email_id, contact_id)
);
CREATE TABLE email_deals (
    email_id INTEGER NOT NULL REFERENCES emails(id) ON DELETE CASCADE,
    deal_id INTEGER NOT NULL REFERENCES deals(id) ON DELETE CASCADE,
    PRIMARY KEY (email_id, deal_id)
);
CREATE TABLE attachments (
    id INTEGER PRIMARY KEY,
    email_id INTEGER NOT NULL REFERENCES emails(id) ON DELETE CASCADE,
    filename TEXT NOT NULL DEFAULT '',
    content_type TEXT NOT NULL DEFAULT 'application/octet-stream',
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL
);
CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY,
    email_id INTEGER NOT NULL REFERENCES emails(id) ON DELETE CASCADE,
    recipient TEXT,
    contact_id INTEGER REFERENCES contacts(id) ON DELETE SET NULL,
    shared INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    delivered_at TEXT
);
CREATE TABLE links (
    id INTEGER PRIMARY KEY,
    email_id INTEGER NOT NULL REFERENCES emails(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    url TEXT NOT NULL,
    UNIQUE (email_id, position)
);
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('open', 'click', 'reply')),
    inferred INTEGER NOT NULL DEFAULT 0,
    at TEXT NOT NULL,
    email_id INTEGER REFERENCES emails(id) ON DELETE CASCADE,
    delivery_id INTEGER REFERENCES deliveries(id) ON DELETE CASCADE,
    link_id INTEGER REFERENCES links(id) ON DELETE SET NULL,
    contact_id INTEGER REFERENCES contacts(id) ON DELETE CASCADE,
    anonymous INTEGER NOT NULL DEFAULT 0,
    ip TEXT,
    user_agent TEXT,
    method TEXT,
    verdict TEXT NOT NULL CHECK (verdict IN ('human', 'machine', 'self')),
    reason TEXT NOT NULL
);
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY,
    created_at TEXT NOT NULL,
    user_id INTEGER REFERENCES users(id) ON DELETE SET NULL,
    email_id INTEGER REFERENCES emails(id) ON DELETE SET NULL,
    mail_from TEXT NOT NULL,
    rcpts TEXT NOT NULL,
    spool_path TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    last_error TEXT,
    done_at TEXT
);
CREATE TABLE inbound_log (
    id INTEGER PRIMARY KEY,
    received_at TEXT NOT NULL,
    spool_path TEXT,
    mail_from TEXT NOT NULL DEFAULT '',
    rcpts TEXT NOT NULL DEFAULT '[]',
    message_id TEXT,
    kind TEXT,
    decision TEXT NOT NULL DEFAULT 'pending',
    reasons TEXT NOT NULL DEFAULT '[]',
    email_id INTEGER REFERENCES emails(id) ON DELETE SET NULL,
    processed_at TEXT
);
"""

REPORT_INDEXES = """
CREATE INDEX idx_emails_sent_at ON emails(sent_at);
CREATE INDEX idx_emails_user ON emails(user_id, sent_at);
CREATE INDEX idx_email_contacts_contact ON email_contacts(contact_id);
CREATE INDEX idx_deliveries_email ON deliveries(email_id);
CREATE INDEX idx_deliveries_contact ON deliveries(contact_id);
CREATE INDEX idx_links_email ON links(email_id);
CREATE INDEX idx_events_email ON events(email_id, kind, verdict);
CREATE INDEX idx_events_delivery ON events(delivery_id, kind);
CREATE INDEX idx_events_contact ON events(contact_id, at);
CREATE INDEX idx_events_at ON events(at);
CREATE INDEX idx_attachments_email ON attachments(email_id);
CREATE INDEX idx_attachments_sha ON attachments(sha256);
CREATE INDEX idx_outbox_status ON outbox(status, next_attempt_at);
CREATE INDEX idx_inbound_received ON inbound_log(received_at);
CREATE INDEX idx_email_deals_deal ON email_deals(deal_id);
CREATE INDEX idx_deal_contacts_contact ON deal_contacts(contact_id);
CREATE INDEX idx_contacts_company ON contacts(company_id);
"""

TRACKER_NOTIFICATIONS = """
ALTER TABLE events ADD COLUMN caused_by INTEGER REFERENCES events(id) ON DELETE CASCADE;
CREATE INDEX idx_events_caused_by ON events(caused_by);
CREATE INDEX idx_events_delivery_at ON events(delivery_id, at);
CREATE TABLE user_webhooks (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    url TEXT NOT NULL,
    secret TEXT NOT NULL,
    all_hits INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    UNIQUE (user_id, url)
);
CREATE TABLE webhook_queue (
    id INTEGER PRIMARY KEY,
    webhook_id INTEGER REFERENCES user_webhooks(id) ON DELETE CASCADE,
    url TEXT NOT NULL,
    payload TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    last_error TEXT,
    created_at TEXT NOT NULL
);
CREATE INDEX idx_webhook_queue_due ON webhook_queue(status, next_attempt_at);
"""

INGEST_INBOUND_DETAILS = """
ALTER TABLE inbound_log ADD COLUMN details TEXT;
ALTER TABLE inbound_log ADD COLUMN user_id INTEGER REFERENCES users(id) ON DELETE SET NULL;
CREATE UNIQUE INDEX idx_inbound_spool ON inbound_log(spool_path) WHERE spool_path IS NOT NULL;
CREATE INDEX idx_attachments_email_sha ON attachments(email_id, sha256);
"""

# Every index on events is work for each hit the tracker records (measured: 6-25 us per
# index and event). (delivery_id, kind) already serves every lookup by copy, the burst
# rules' recent hits included (the writer keeps those in memory after one read), so
# (delivery_id, at) goes; only inferred opens have a cause, so that index keeps only them.
TRACKER_LEAN_EVENT_INDEXES = """
DROP INDEX idx_events_delivery_at;
DROP INDEX idx_events_caused_by;
CREATE INDEX idx_events_caused_by ON events(caused_by) WHERE caused_by IS NOT NULL;
"""

# The same for the contact index: lookups by contact (timelines, recomputed properties,
# erasure) filter and sort a contact's few events themselves; a text column in the key
# made it the dearest index per insert. Anonymous events name no contact.
TRACKER_CONTACT_INDEX = """
DROP INDEX idx_events_contact;
CREATE INDEX idx_events_contact ON events(contact_id) WHERE contact_id IS NOT NULL;
"""

# No query looks events up by time alone (the burst rules' recent hits go by copy, reports
# by email, sent time or contact), and a text key made it the dearest index per insert.
TRACKER_NO_TIME_INDEX = "DROP INDEX idx_events_at;"

MIGRATIONS: list[Migration] = [
    ("0001_core_schema", CORE_SCHEMA),
    ("0002_report_indexes", REPORT_INDEXES),
    ("tracker_0001_notifications", TRACKER_NOTIFICATIONS),
    ("ingest_0001_inbound_details", INGEST_INBOUND_DETAILS),
    ("reports_0001_people", report_schema.migrate_people),
    ("reports_0002_triggers", report_schema.recreate_triggers),
    ("reports_0003_emails_cover", report_schema.EMAILS_COVER),
    ("reports_0004_events_link", report_schema.EVENTS_LINK),
    ("reports_0005_batch_gate", report_schema.install_batch_gate),
    ("tracker_0002_lean_event_indexes", TRACKER_LEAN_EVENT_INDEXES),
    ("tracker_0003_contact_index", TRACKER_CONTACT_INDEX),
    ("tracker_0004_batched_email_refresh", report_schema.install_batched_refresh),
    ("reports_0006_relabel_by_difference", report_schema.recreate_triggers),
    ("tracker_0005_no_time_index", TRACKER_NO_TIME_INDEX),
]


def applied(db: sqlite_utils.Database) -> list[str]:
    """Names of the migrations already applied, in order."""
    if "_migrations" not in db.table_names():
        return []
    return [r[0] for r in db.execute("SELECT name FROM _migrations ORDER BY rowid")]


def migrate(db: sqlite_utils.Database, upto: str | None = None) -> list[str]:
    """Apply every pending migration (or up to and including ``upto``); return their names."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
    )
    done = set(applied(db))
    ran = []
    for name, step in MIGRATIONS:
        if name not in done:
            conn = db.conn
            with transaction(db):
                # Re-check under the write lock: another process may have migrated meanwhile.
                if conn.execute("SELECT 1 FROM _migrations WHERE name = ?", [name]).fetchone():
                    continue
                if isinstance(step, str):
                    for statement in step.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                else:
                    step(db)
                conn.execute(
                    "INSERT INTO _migrations (name, applied_at) VALUES (?, ?)",
                    [name, dt.datetime.now(dt.UTC).isoformat()],
                )
            ran.append(name)
        if name == upto:
            break
    return ran
