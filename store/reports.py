"""Read-only queries behind the reports and the contact timeline.

Reports count ``human`` hits unless asked for everything. A hit that cannot be pinned on
one person — on a shared copy, or recorded anonymously in privacy mode — is counted on the
email as "Someone" and never on a recipient. Every time returned is the stored UTC ISO 8601
string with its offset; presentation (local zone, relative dates) is the CLI's business.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

import sqlite_utils

from store import report_schema
from store.addresses import normalize
from store.contacts import contact_deals, find_contact, get_contact
from store.db import StoreError, to_iso
from store.sql import row, rows
from store.users import get_user

LOGGED_REASON = "logged copy: not sent through the relay"


# --- filters --------------------------------------------------------------------------------

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_when(text: str, *, end: bool = False) -> str:
    """A ``--since``/``--until`` value in the stored UTC form.

    ``YYYY-MM-DD`` is a whole day in the local zone: the start of it for ``since``, the start
    of the next day for ``until`` (so ``--until`` includes that day). An ISO datetime without
    offset is local time; ``--until`` with a datetime includes that instant.
    Results are compared with ``<`` for ``until``.
    """
    value = text.strip()
    try:
        if _DATE.match(value):
            day = dt.date.fromisoformat(value)
            if end:
                day += dt.timedelta(days=1)
            moment = dt.datetime.combine(day, dt.time()).astimezone()
        else:
            moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            if moment.tzinfo is None:
                moment = moment.astimezone()
            if end:
                moment += dt.timedelta(microseconds=1)
    except ValueError:
        raise StoreError(
            f"invalid date {text!r}: expected YYYY-MM-DD or an ISO datetime "
            "(2026-11-23T09:30, 2026-11-23T09:30+01:00)"
        ) from None
    return to_iso(moment)


@dataclass
class Filter:
    """Which emails a report covers (all of them when nothing is set)."""

    since: str | None = None  # stored form, inclusive
    until: str | None = None  # stored form, exclusive
    user: str | None = None  # a user's account email
    contact: str | None = None  # a recipient's address
    tracked: bool | None = None  # True: opens or clicks tracked; False: neither

    def sql(self, db: sqlite_utils.Database) -> tuple[str, dict]:
        """A WHERE clause over ``emails e`` and its parameters."""
        where, params = ["1"], {}
        if self.since:
            where.append("e.sent_at >= :since")
            params["since"] = self.since
        if self.until:
            where.append("e.sent_at < :until")
            params["until"] = self.until
        if self.user:
            where.append("e.user_id = :user_id")
            params["user_id"] = get_user(db, self.user)["id"]
        if self.contact:
            addr = normalize(self.contact)
            found = find_contact(db, addr)
            params["addr"] = addr
            params["contact_id"] = found["id"] if found else -1
            where.append(
                """e.id IN (SELECT email_id FROM deliveries
                            WHERE contact_id = :contact_id OR recipient = :addr
                            UNION ALL SELECT email_id FROM email_contacts
                            WHERE contact_id = :contact_id)"""
            )
        if self.tracked is True:
            where.append("(e.track_opens OR e.track_clicks)")
        elif self.tracked is False:
            where.append("NOT (e.track_opens OR e.track_clicks)")
        return " AND ".join(where), params


# --- report emails --------------------------------------------------------------------------
#
# SQLite builds each entry's JSON itself from the summary tables kept by triggers
# (store/report_schema.py): 100,000 emails come out in well under a second, where
# aggregating the events and building the objects in Python took seconds.


_EMPTY_TAIL = '{"opens":0,"clicks":0,"someone":{"opens":0,"clicks":0},"recipients":[]}'
_EMPTY_TAIL_ALL = (
    '{"opens":0,"clicks":0,"someone":{"opens":0,"clicks":0,'
    '"machine":{"opens":0,"clicks":0,"reasons":{}},"self":{"opens":0,"clicks":0,"reasons":{}}},'
    '"recipients":[],'
    '"machine":{"opens":0,"clicks":0,"reasons":{}},"self":{"opens":0,"clicks":0,"reasons":{}}}'
)


def _emails_sql(where: str, all_hits: bool) -> str:
    """Each entry is the email's own fields (a JSON object) joined with its hit part: the
    cached ``report_emails.tail`` for human hits, rendered on the spot for --all-hits."""
    if all_hits:
        tail = f"coalesce(({report_schema.tail_sql('e.id', all_hits=True)}), :empty)"
        join = ""
    else:
        tail, join = "coalesce(re.tail, :empty)", "LEFT JOIN report_emails re ON re.email_id = e.id"
    # The email's own fields are concatenated with json_quote (a third faster than
    # json_object over 100,000 rows), then the tail without its opening brace.
    true_false = "CASE WHEN {} THEN 'true' ELSE 'false' END"
    return f"""
SELECT '{{"message_id":' || json_quote(e.message_id)
    || ',"subject":' || json_quote(e.subject)
    || ',"sent_at":' || json_quote(e.sent_at)
    || ',"user":' || json_quote(u.email)
    || ',"source":' || json_quote(e.source)
    || ',"tracked":{{"opens":' || {true_false.format("e.track_opens")}
    || ',"clicks":' || {true_false.format("e.track_clicks")}
    || '}},"untracked_reason":' || json_quote(CASE
           WHEN e.untracked_reason IS NOT NULL OR e.track_opens OR e.track_clicks
           THEN e.untracked_reason
           WHEN e.source = 'relay' THEN 'not tracked' ELSE :logged_reason END)
    || ',' || substr({tail}, 2)
FROM emails e
LEFT JOIN users u ON u.id = e.user_id
{join}
WHERE {where}
ORDER BY e.sent_at DESC, e.id DESC
LIMIT :limit"""


def iter_email_json(
    db: sqlite_utils.Database,
    filt: Filter | None = None,
    *,
    all_hits: bool = False,
    limit: int | None = None,
) -> Iterator[str]:
    """The ``report emails`` entries as compact JSON texts, newest first (at most ``limit``)."""
    where, params = (filt or Filter()).sql(db)
    params["logged_reason"] = LOGGED_REASON
    params["empty"] = _EMPTY_TAIL_ALL if all_hits else _EMPTY_TAIL
    params["limit"] = -1 if limit is None else limit
    for (text,) in db.conn.execute(_emails_sql(where, all_hits), params):
        yield text


def email_report(
    db: sqlite_utils.Database, filt: Filter | None = None, *, all_hits: bool = False
) -> list[dict]:
    """One entry per sent or logged email, newest first (the ``report emails`` JSON shape)."""
    return [json.loads(t) for t in iter_email_json(db, filt, all_hits=all_hits)]


def count_emails(db: sqlite_utils.Database, filt: Filter | None = None) -> int:
    """How many emails a report will list (for progress bars)."""
    where, params = (filt or Filter()).sql(db)
    return db.execute(f"SELECT count(*) FROM emails e WHERE {where}", params).fetchone()[0]


# --- report links ---------------------------------------------------------------------------


def link_report(
    db: sqlite_utils.Database, filt: Filter | None = None, *, all_hits: bool = False
) -> list[dict]:
    """Per tracked link: clicks, distinct recipients who clicked, and Someone's clicks."""
    where, params = (filt or Filter()).sql(db)
    found = rows(
        db,
        f"""SELECT l.id, e.message_id, e.subject, e.sent_at, u.email AS user, l.position, l.url,
                   count(ev.id) FILTER (WHERE ev.verdict = 'human') AS clicks,
                   count(DISTINCT CASE WHEN ev.verdict = 'human' AND NOT ev.anonymous
                                        AND NOT coalesce(d.shared, 0)
                                  THEN coalesce(d.recipient, 'contact:' || ev.contact_id) END)
                       AS unique_clicks,
                   count(ev.id) FILTER (WHERE ev.verdict = 'human' AND (ev.anonymous
                          OR coalesce(d.shared, 0) OR coalesce(d.recipient, ev.contact_id) IS NULL))
                       AS someone_clicks,
                   count(ev.id) FILTER (WHERE ev.verdict = 'machine') AS machine_clicks,
                   count(ev.id) FILTER (WHERE ev.verdict = 'self') AS self_clicks
            FROM emails e
            JOIN links l ON l.email_id = e.id
            LEFT JOIN users u ON u.id = e.user_id
            LEFT JOIN events ev ON ev.link_id = l.id AND ev.kind = 'click'
            LEFT JOIN deliveries d ON d.id = ev.delivery_id
            WHERE {where} AND e.track_clicks
            GROUP BY l.id
            ORDER BY e.sent_at DESC, e.id DESC, l.position""",
        params,
    )
    reasons: dict[int, dict[str, dict[str, int]]] = {}
    if all_hits:
        for r in rows(
            db,
            f"""SELECT ev.link_id, ev.verdict, ev.reason, count(*) AS n FROM events ev
                JOIN links l ON l.id = ev.link_id JOIN emails e ON e.id = l.email_id
                WHERE {where} AND ev.kind = 'click' AND ev.verdict != 'human'
                GROUP BY ev.link_id, ev.verdict, ev.reason""",
            params,
        ):
            reasons.setdefault(r["link_id"], {}).setdefault(r["verdict"], {})[r["reason"]] = r["n"]
    out = []
    for r in found:
        item = {
            k: r[k]
            for k in (
                "message_id",
                "subject",
                "sent_at",
                "user",
                "position",
                "url",
                "clicks",
                "unique_clicks",
                "someone_clicks",
            )
        }
        if all_hits:
            mine = reasons.get(r["id"], {})
            item["machine"] = {"clicks": r["machine_clicks"], "reasons": mine.get("machine", {})}
            item["self"] = {"clicks": r["self_clicks"], "reasons": mine.get("self", {})}
        out.append(item)
    return out


# --- report users ---------------------------------------------------------------------------


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def user_report(db: sqlite_utils.Database, filt: Filter | None = None) -> list[dict]:
    """Per user over the period: sent, logged, tracked, open/click/reply rates (human hits
    only, per email), and how many hits were filtered as machine or self.

    Rates are fractions of the emails that could show them: opened / emails with opens
    tracked, clicked / emails with clicks tracked, replied / sent.
    """
    filt = filt or Filter()
    where, params = filt.sql(db)
    per_user = {
        r["user_id"]: r
        for r in rows(
            db,
            f"""WITH hits AS (
                    SELECT p.email_id,
                           max(p.opens > 0) AS opened,
                           max(p.clicks > 0) AS clicked,
                           max(p.replies > 0) AS replied,
                           sum(p.machine_opens + p.machine_clicks) AS machine,
                           sum(p.self_opens + p.self_clicks) AS self
                    FROM report_people p
                    WHERE p.email_id IN (SELECT e.id FROM emails e WHERE {where})
                    GROUP BY p.email_id)
                SELECT e.user_id,
                       sum(e.source = 'relay') AS sent,
                       sum(e.source != 'relay') AS logged,
                       sum(e.source = 'relay' AND (e.track_opens OR e.track_clicks)) AS tracked,
                       sum(e.source = 'relay' AND e.track_opens) AS open_tracked,
                       sum(e.source = 'relay' AND e.track_clicks) AS click_tracked,
                       sum(e.source = 'relay' AND e.track_opens AND coalesce(h.opened, 0))
                           AS opened,
                       sum(e.source = 'relay' AND e.track_clicks AND coalesce(h.clicked, 0))
                           AS clicked,
                       sum(e.source = 'relay' AND coalesce(h.replied, 0)) AS replied,
                       coalesce(sum(h.machine), 0) AS machine_hits,
                       coalesce(sum(h.self), 0) AS self_hits
                FROM emails e LEFT JOIN hits h ON h.email_id = e.id
                WHERE {where}
                GROUP BY e.user_id""",
            params,
        )
    }
    users = rows(db, "SELECT id, email, name FROM users ORDER BY email")
    if filt.user:
        users = [u for u in users if u["email"] == normalize(filt.user)]
    listed = [(u["id"], u["email"], u["name"]) for u in users]
    if None in per_user and not filt.user:
        listed.append((None, None, "(unattributed)"))
    out = []
    for user_id, email, name in listed:
        r = per_user.get(user_id) or {}

        def get(k: str, r: dict = r) -> int:
            return r.get(k) or 0

        out.append(
            {
                "user": email,
                "name": name,
                "sent": get("sent"),
                "logged": get("logged"),
                "tracked": get("tracked"),
                "opened": get("opened"),
                "clicked": get("clicked"),
                "replied": get("replied"),
                "open_rate": _rate(get("opened"), get("open_tracked")),
                "click_rate": _rate(get("clicked"), get("click_tracked")),
                "reply_rate": _rate(get("replied"), get("sent")),
                "machine_hits": get("machine_hits"),
                "self_hits": get("self_hits"),
            }
        )
    return out


# --- contact timeline -----------------------------------------------------------------------


def contact_detail(db: sqlite_utils.Database, email: str) -> dict:
    """A contact, its company, deals and engagement, and its timeline newest first.

    The timeline has the emails sent to it (through the relay) and logged on it (BCC or
    forward), and its own human opens, clicks and replies; anonymous (privacy mode) and
    shared-copy hits are not the contact's and are left out.
    """
    c = get_contact(db, email)
    company = row(db, "SELECT domain, name FROM companies WHERE id = ?", [c["company_id"]])
    timeline = rows(
        db,
        """WITH mine AS (
               SELECT id FROM deliveries
               WHERE (contact_id = :c OR recipient = :addr) AND NOT shared),
           filed AS (
               SELECT email_id FROM email_contacts WHERE contact_id = :c
               UNION SELECT email_id FROM deliveries WHERE id IN (SELECT id FROM mine))
           SELECT e.sent_at AS at,
                  CASE e.source WHEN 'relay' THEN 'sent' ELSE 'logged' END AS kind,
                  e.subject, e.message_id,
                  CASE e.source WHEN 'relay' THEN '' ELSE e.source END AS detail,
                  e.id AS email_id, 0 AS event_id
           FROM emails e WHERE e.id IN (SELECT email_id FROM filed)
           UNION ALL
           SELECT ev.at, ev.kind, e.subject, e.message_id,
                  CASE WHEN ev.inferred THEN 'inferred' ELSE coalesce(l.url, '') END,
                  e.id, ev.id
           FROM events ev JOIN emails e ON e.id = ev.email_id
           LEFT JOIN links l ON l.id = ev.link_id
           WHERE ev.verdict = 'human' AND NOT ev.anonymous
             AND (ev.delivery_id IN (SELECT id FROM mine)
                  OR (ev.delivery_id IS NULL AND ev.contact_id = :c))
           ORDER BY at DESC, email_id DESC, event_id DESC""",
        {"c": c["id"], "addr": c["email"]},
    )
    for t in timeline:
        del t["email_id"], t["event_id"]
    counts = {k: sum(1 for t in timeline if t["kind"] == k) for k in ("open", "click", "reply")}
    return {
        "email": c["email"],
        "name": c["name"],
        "company": company["domain"] if company else None,
        "company_name": company["name"] if company else None,
        "lawful_basis": c["lawful_basis"],
        "source": c["source"],
        "created_at": c["created_at"],
        "last_open_at": c["last_open_at"],
        "last_click_at": c["last_click_at"],
        "last_reply_at": c["last_reply_at"],
        "last_engagement_at": c["last_engagement_at"],
        "emails": sum(1 for t in timeline if t["kind"] in ("sent", "logged")),
        "opens": counts["open"],
        "clicks": counts["click"],
        "replies": counts["reply"],
        "deals": contact_deals(db, c["id"]),
        "timeline": timeline,
    }
