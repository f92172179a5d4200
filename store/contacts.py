"""Contacts, companies, the never-log list, forgotten addresses and GDPR erasure."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import sqlite_utils

from store.addresses import domain_covers, domain_of, is_valid, normalize
from store.db import StoreError, now_iso
from store.sql import row, rows, transaction

BASES = ("yes", "no", "unknown")
ERASED = "[erased]"


def forget_hash(address: str) -> str:
    """One-way hash kept for an erased address so it is never logged again."""
    return hashlib.sha256(b"mailtally-forgotten:" + normalize(address).encode()).hexdigest()


def is_forgotten(db: sqlite_utils.Database, address: str) -> bool:
    return (
        row(db, "SELECT 1 AS x FROM forgotten WHERE hash = ?", [forget_hash(address)]) is not None
    )


# --- never-log list -------------------------------------------------------------------------


def parse_never_log_entry(entry: str) -> str:
    """Validate ``addr@example.com`` or ``@example.com``; return it lower-cased."""
    text = entry.strip().lower()
    if text.startswith("@"):
        if not is_valid("x" + text):
            raise StoreError(f"invalid domain entry: {entry!r} (expected @example.com)")
        return text
    if not is_valid(text):
        raise StoreError(f"invalid entry: {entry!r} (expected an address or @domain)")
    return text


def never_log_add(db: sqlite_utils.Database, entry: str) -> str:
    value = parse_never_log_entry(entry)
    with transaction(db):
        if row(db, "SELECT 1 AS x FROM never_log WHERE entry = ?", [value]):
            raise StoreError(f"already on the never-log list: {value}")
        db.execute("INSERT INTO never_log (entry, created_at) VALUES (?, ?)", [value, now_iso()])
    return value


def never_log_remove(db: sqlite_utils.Database, entry: str) -> None:
    value = entry.strip().lower()
    with transaction(db):
        if db.execute("DELETE FROM never_log WHERE entry = ?", [value]).rowcount == 0:
            raise StoreError(f"not on the never-log list: {value}")


def never_log_list(db: sqlite_utils.Database) -> list[dict]:
    return rows(db, "SELECT entry, created_at FROM never_log ORDER BY entry")


def never_log_match(db: sqlite_utils.Database, address: str) -> str | None:
    """The never-log entry that covers ``address`` (exact address, or domain/subdomain)."""
    addr = normalize(address)
    domain = domain_of(addr)
    for entry in db.execute("SELECT entry FROM never_log").fetchall():
        value = entry[0]
        if value.startswith("@"):
            if domain_covers(value[1:], domain):
                return value
        elif value == addr:
            return value
    return None


# --- companies and contacts -----------------------------------------------------------------


def ensure_company(db: sqlite_utils.Database, domain: str) -> int:
    """The company for an email domain, created if missing."""
    domain = domain.lower().strip(".")
    with transaction(db):
        found = row(db, "SELECT id FROM companies WHERE domain = ?", [domain])
        if found:
            return found["id"]
        cur = db.execute(
            "INSERT INTO companies (domain, name, created_at) VALUES (?, ?, ?)",
            [domain, domain, now_iso()],
        )
        return cur.lastrowid


def find_contact(db: sqlite_utils.Database, email: str) -> dict | None:
    return row(db, "SELECT * FROM contacts WHERE email = ?", [normalize(email)])


def get_contact(db: sqlite_utils.Database, email: str) -> dict:
    contact = find_contact(db, email)
    if contact is None:
        raise StoreError(f"unknown contact: {normalize(email)}")
    return contact


def ensure_contact(
    db: sqlite_utils.Database,
    email: str,
    *,
    name: str = "",
    source: str = "",
    company_domain: str | None = None,
) -> tuple[dict, bool]:
    """The contact for ``email`` and whether it was created now.

    A forgotten (erased) address is refused with StoreError: it must never come back.
    ``company_domain`` (None for free-mail domains) links a new contact to its company.
    """
    addr = normalize(email)
    if not is_valid(addr):
        raise StoreError(f"invalid email address: {email!r}")
    if is_forgotten(db, addr):
        raise StoreError(f"{addr} was erased (GDPR) and cannot be re-created")
    with transaction(db):
        found = find_contact(db, addr)
        if found:
            if company_domain and found["company_id"] is None:
                company_id = ensure_company(db, company_domain)
                db.execute(
                    "UPDATE contacts SET company_id = ? WHERE id = ?", [company_id, found["id"]]
                )
            if name and not found["name"]:
                db.execute("UPDATE contacts SET name = ? WHERE id = ?", [name, found["id"]])
            return find_contact(db, addr), False
        company_id = ensure_company(db, company_domain) if company_domain else None
        db.execute(
            "INSERT INTO contacts (email, name, company_id, source, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            [addr, name, company_id, source, now_iso()],
        )
        return find_contact(db, addr), True


def list_contacts(db: sqlite_utils.Database) -> list[dict]:
    return rows(
        db,
        """SELECT c.email, c.name, co.domain AS company, c.lawful_basis, c.source,
                  c.created_at, c.last_engagement_at
           FROM contacts c LEFT JOIN companies co ON co.id = c.company_id
           ORDER BY c.email""",
    )


def set_basis(db: sqlite_utils.Database, email: str, basis: str) -> dict:
    """Record the lawful basis (GDPR) for processing a contact's data."""
    if basis not in BASES:
        raise StoreError(f"invalid lawful basis {basis!r}")
    contact = get_contact(db, email)
    with transaction(db):
        db.execute("UPDATE contacts SET lawful_basis = ? WHERE id = ?", [basis, contact["id"]])
    return get_contact(db, email)


def contact_deals(db: sqlite_utils.Database, contact_id: int) -> list[dict]:
    return rows(
        db,
        """SELECT d.id, d.name, d.stage, d.created_at, d.closed_at FROM deals d
           JOIN deal_contacts dc ON dc.deal_id = d.id WHERE dc.contact_id = ?
           ORDER BY d.created_at DESC, d.id DESC""",
        [contact_id],
    )


# --- GDPR erasure ---------------------------------------------------------------------------


def _scrub_json_list(text: str, addr: str) -> str:
    try:
        values = json.loads(text or "[]")
    except ValueError:
        return text.replace(addr, ERASED)
    return json.dumps([ERASED if addr in str(v).lower() else v for v in values])


def forget(db: sqlite_utils.Database, email: str, attachments_dir: Path | None = None) -> dict:
    """GDPR erasure: delete the contact, its events, emails where it is the only contact
    (and their attachment files), scrub the address from everything else, keep only a hash.

    Works for addresses that were never a contact too, so they stay out from now on.
    """
    addr = normalize(email)
    if not is_valid(addr):
        raise StoreError(f"invalid email address: {email!r}")
    contact = find_contact(db, addr)
    removed_files: list[str] = []
    summary = {"address": addr, "emails_deleted": 0, "emails_scrubbed": 0, "events_deleted": 0}
    like = f"%{addr}%"
    with transaction(db):
        if contact:
            cid = contact["id"]
            only = [
                r["email_id"]
                for r in rows(
                    db,
                    """SELECT ec.email_id FROM email_contacts ec WHERE ec.contact_id = ?
                       AND NOT EXISTS (SELECT 1 FROM email_contacts o
                                       WHERE o.email_id = ec.email_id AND o.contact_id != ?)""",
                    [cid, cid],
                )
            ]
            summary["events_deleted"] = db.execute(
                "SELECT COUNT(*) FROM events WHERE contact_id = ?", [cid]
            ).fetchone()[0]
            shas = (
                [
                    r["sha256"]
                    for r in rows(
                        db,
                        f"SELECT sha256 FROM attachments WHERE email_id IN ({','.join('?' * len(only))})",
                        only,
                    )
                ]
                if only
                else []
            )
            for email_id in only:
                db.execute("DELETE FROM emails WHERE id = ?", [email_id])
            summary["emails_deleted"] = len(only)
            db.execute("DELETE FROM events WHERE contact_id = ?", [cid])
            db.execute("DELETE FROM contacts WHERE id = ?", [cid])
            for sha in set(shas):
                if not row(db, "SELECT 1 AS x FROM attachments WHERE sha256 = ?", [sha]):
                    removed_files.append(sha)
        # Deliveries addressed to the person: their events go with them.
        db.execute("DELETE FROM deliveries WHERE lower(recipient) = ?", [addr])
        for e in rows(
            db,
            """SELECT id, from_addr, to_addrs, cc_addrs, subject, text_body, html_body FROM emails
               WHERE lower(from_addr) LIKE ? OR lower(to_addrs) LIKE ? OR lower(cc_addrs) LIKE ?
                  OR lower(text_body) LIKE ? OR lower(html_body) LIKE ? OR lower(subject) LIKE ?""",
            [like] * 6,
        ):
            db.execute(
                """UPDATE emails SET from_addr = ?, to_addrs = ?, cc_addrs = ?, subject = ?,
                   text_body = ?, html_body = ? WHERE id = ?""",
                [
                    ERASED if addr in (e["from_addr"] or "").lower() else e["from_addr"],
                    _scrub_json_list(e["to_addrs"], addr),
                    _scrub_json_list(e["cc_addrs"], addr),
                    _replace_ci(e["subject"], addr),
                    _replace_ci(e["text_body"], addr),
                    _replace_ci(e["html_body"], addr),
                    e["id"],
                ],
            )
            summary["emails_scrubbed"] += 1
        for table, columns in (
            ("inbound_log", ("mail_from", "rcpts", "reasons", "details")),
            ("outbox", ("mail_from", "rcpts")),
        ):
            for column in columns:
                db.execute(
                    f"UPDATE {table} SET {column} = replace(lower({column}), ?, ?)"
                    f" WHERE lower({column}) LIKE ?",
                    [addr, ERASED, like],
                )
        db.execute(
            "INSERT OR IGNORE INTO forgotten (hash, forgotten_at) VALUES (?, ?)",
            [forget_hash(addr), now_iso()],
        )
    if attachments_dir is not None:
        for sha in removed_files:
            path = attachments_dir / sha[:2] / sha
            path.unlink(missing_ok=True)
    return summary


def _replace_ci(text: str | None, addr: str) -> str | None:
    """Replace every case variant of ``addr`` in ``text`` by the erased marker."""
    if not text:
        return text
    lower = text.lower()
    out, start = [], 0
    while (i := lower.find(addr, start)) != -1:
        out.append(text[start:i] + ERASED)
        start = i + len(addr)
    out.append(text[start:])
    return "".join(out)
