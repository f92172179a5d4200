"""Read-only queries behind the reports and the contact timeline."""

from __future__ import annotations

import sqlite_utils

from store.contacts import contact_deals, get_contact
from store.sql import row, rows


def contact_detail(db: sqlite_utils.Database, email: str) -> dict:
    """A contact, its company and deals, and its timeline newest first."""
    c = get_contact(db, email)
    company = row(db, "SELECT domain, name FROM companies WHERE id = ?", [c["company_id"]])
    timeline = rows(
        db,
        """SELECT e.sent_at AS at,
                  CASE e.source WHEN 'relay' THEN 'sent' ELSE 'logged' END AS kind,
                  e.subject, e.source AS detail, e.message_id
           FROM email_contacts ec JOIN emails e ON e.id = ec.email_id
           WHERE ec.contact_id = :c
           UNION ALL
           SELECT ev.at, CASE WHEN ev.inferred THEN 'inferred ' ELSE '' END || ev.kind,
                  e.subject, COALESCE(l.url, ''), e.message_id
           FROM events ev JOIN emails e ON e.id = ev.email_id
           LEFT JOIN links l ON l.id = ev.link_id
           WHERE ev.contact_id = :c AND ev.verdict = 'human' AND ev.anonymous = 0
           ORDER BY at DESC""",
        {"c": c["id"]},
    )
    return {
        "email": c["email"],
        "name": c["name"],
        "company": company["domain"] if company else None,
        "lawful_basis": c["lawful_basis"],
        "source": c["source"],
        "created_at": c["created_at"],
        "last_open_at": c["last_open_at"],
        "last_click_at": c["last_click_at"],
        "last_reply_at": c["last_reply_at"],
        "last_engagement_at": c["last_engagement_at"],
        "deals": contact_deals(db, c["id"]),
        "timeline": timeline,
    }
