"""Generate a database the size of a busy sales team's year, for the report benchmarks.

Default: 100,000 emails and exactly 1,000,000 events, with the mix mailtally really sees:
sent through the relay (mostly per-recipient copies, some shared copies), logged by BCC
and by forward; tracked, and untracked for each reason; human, machine (Apple MPP, Gmail
prefetch, scanners, early hits) and self hits; inferred opens, replies, privacy-mode
anonymous hits and Someone hits on shared copies. Seeded, so the same arguments give the
same database.

    python bench/gen_reports_db.py /tmp/reports.db [--emails 100000] [--events 1000000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import store  # noqa: E402
from store.events import HIT_COLUMNS  # noqa: E402
from store.records import analyze, bulk_insert  # noqa: E402

UTC = dt.UTC
MACHINE_REASONS = [
    ("apple_mpp", 40),
    ("gmail_prefetch", 10),
    ("scanner_ua", 12),
    ("safe_links", 10),
    ("within_delivery_window", 12),
    ("head_request", 4),
    ("burst", 8),
    ("honeypot", 2),
    ("empty_user_agent", 2),
]
UNTRACKED = [
    ("plain-text-only: no HTML part", 55),
    ("empty-html: the HTML part shows nothing", 15),
    ("header: X-Mailtally-Track: none", 20),
    ("user-defaults: the user tracks neither opens nor clicks", 10),
]
# Bodies of a realistic size (1.5 KB of text, 6 KB of HTML) so that reading an email row
# costs what it costs in production (overflow pages).
TEXT_BODY = "Hello,\n\nfollowing our call, proposal {n} is attached.\n" + "Details. " * 170
HTML_BODY = (
    "<html><head><style>td{{padding:0}}</style></head><body><table><tr><td><p>{body}</p>"
    + "<p>Section text with a <a href='https://example.com/x'>link</a>.</p>" * 60
    + "</td></tr></table></body></html>"
)
UAS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",
    "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17928; Pro)",
]


def pick(rng: random.Random, weighted: list[tuple[str, int]]) -> str:
    return rng.choices([w[0] for w in weighted], [w[1] for w in weighted])[0]


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, UTC).isoformat(timespec="microseconds")


def generate(path: Path, n_emails: int, n_events: int, seed: int = 7) -> dict:
    """Write the database at ``path`` (replaced) and return what it holds."""
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    rng = random.Random(seed)
    db = store.connect(path)
    now = time.time()
    start = now - 365 * 86400
    created = iso(start)

    n_users = max(2, n_emails // 5000)
    users = [(i, f"rep{i}@mailtally-bench.com", f"Rep {i}", created) for i in range(1, n_users + 1)]
    bulk_insert(db, "users", ["id", "email", "name", "created_at"], users)
    n_companies = max(1, n_emails // 50)
    bulk_insert(
        db,
        "companies",
        ["id", "domain", "name", "created_at"],
        [(i, f"company{i}.example", f"Company {i}", created) for i in range(1, n_companies + 1)],
    )
    n_contacts = max(10, n_emails // 5)
    contacts = []
    for i in range(1, n_contacts + 1):
        company = rng.randint(1, n_companies)
        basis = pick(rng, [("yes", 70), ("unknown", 25), ("no", 5)])
        contacts.append(
            (i, f"person{i}@company{company}.example", f"Person {i}", company, basis, created)
        )
    bulk_insert(
        db,
        "contacts",
        ["id", "email", "name", "company_id", "lawful_basis", "created_at"],
        contacts,
    )
    address_of = {c[0]: c[1] for c in contacts}
    n_deals = n_contacts // 10
    bulk_insert(
        db,
        "deals",
        ["id", "name", "stage", "created_at"],
        [
            (i, f"Deal {i}", pick(rng, [("open", 60), ("won", 25), ("lost", 15)]), created)
            for i in range(1, n_deals + 1)
        ],
    )
    bulk_insert(
        db,
        "deal_contacts",
        ["deal_id", "contact_id"],
        {(rng.randint(1, n_deals), rng.randint(1, n_contacts)) for _ in range(n_deals * 2)},
    )

    emails, deliveries, links, filed = [], [], [], []
    # (delivery id, email id, contact id, sent time, shared, n_links first link id)
    copies: list[tuple[int, int, int | None, float, bool, int, int]] = []
    logged_replies: list[tuple[int, int, float]] = []
    d_id = l_id = 0
    times = sorted(rng.uniform(start, now - 600) for _ in range(n_emails))
    for e_id, sent in enumerate(times, start=1):
        user = rng.randint(1, n_users)
        source = pick(rng, [("relay", 70), ("bcc", 22), ("forward", 8)])
        recipients = rng.sample(range(1, n_contacts + 1), pick(rng, [(1, 60), (2, 25), (3, 15)]))
        to = ",".join(f'"{address_of[c]}"' for c in recipients)
        t_opens = t_clicks = 0
        reason = None
        if source == "relay":
            if rng.random() < 0.9:
                t_opens, t_clicks = 1, int(rng.random() < 0.95)
                if not t_clicks:
                    reason = "user-defaults: clicks off"
            else:
                reason = pick(rng, UNTRACKED)
        else:
            reason = "logged"
        body = TEXT_BODY.format(n=e_id)
        emails.append(
            (
                e_id,
                body,
                HTML_BODY.format(body=body)
                if source == "relay" and not (reason or "").startswith("plain-text")
                else None,
                f"<{e_id}.{seed}@mailtally-bench.com>",
                f"mid:{e_id}.{seed}@mailtally-bench.com",
                source,
                user,
                users[user - 1][1],
                f"[{to}]",
                f"Proposal {e_id} for Company {e_id % 997}",
                iso(sent),
                t_opens,
                t_clicks,
                reason,
                iso(sent),
            )
        )
        if source == "relay":
            shared = rng.random() < 0.05 and len(recipients) > 1
            n_links = rng.randint(1, 4) if t_clicks else 0
            first_link = l_id + 1
            for pos in range(n_links):
                l_id += 1
                links.append((l_id, e_id, pos, f"https://example.com/p/{e_id}/{pos}?utm=mail"))
            for c in [None] if shared else recipients:
                d_id += 1
                deliveries.append(
                    (d_id, e_id, address_of[c] if c else None, c, int(shared), iso(sent), iso(sent))
                )
                if t_opens:
                    copies.append((d_id, e_id, c, sent, shared, n_links, first_link))
            if rng.random() < 0.3:  # sent and logged
                filed.extend((e_id, c, "to") for c in recipients)
        else:
            filed.extend((e_id, c, "to") for c in recipients)
            if source == "forward":
                logged_replies.append((e_id, recipients[0], sent))
    cols = [
        "id",
        "text_body",
        "html_body",
        "message_id",
        "message_key",
        "source",
        "user_id",
        "from_addr",
        "to_addrs",
        "subject",
        "sent_at",
        "track_opens",
        "track_clicks",
        "untracked_reason",
        "created_at",
    ]
    bulk_insert(db, "emails", cols, emails)
    bulk_insert(
        db,
        "deliveries",
        ["id", "email_id", "recipient", "contact_id", "shared", "created_at", "delivered_at"],
        deliveries,
    )
    bulk_insert(db, "links", ["id", "email_id", "position", "url"], links)
    bulk_insert(db, "email_contacts", ["email_id", "contact_id", "role"], filed)

    events: list[tuple] = []
    mean = n_events / max(1, len(copies))
    for d, e, c, sent, shared, n_links, first_link in copies:
        if len(events) >= n_events:
            break
        count = max(0, int(rng.expovariate(1 / mean) + 0.5))
        anonymous = int(bool(shared) or rng.random() < 0.05)
        t = sent + rng.uniform(1, 5)
        human_open = False
        for _ in range(count):
            t += rng.expovariate(1 / 7200)
            r = rng.random()
            kind = "open"
            link = None
            if r < 0.45:
                verdict, reason = "machine", pick(rng, MACHINE_REASONS)
            elif r < 0.48:
                verdict, reason = "self", "sender_network"
            else:
                verdict, reason = "human", "human"
            if n_links and rng.random() < 0.2:
                kind, link = "click", first_link + rng.randrange(n_links)
            if kind == "click" and verdict == "human" and not human_open:
                events.append(_event("open", 1, t, e, d, None, c, anonymous, "human", "inferred"))
                human_open = True
            if kind == "open" and verdict == "human":
                human_open = True
            events.append(_event(kind, 0, t, e, d, link, c, anonymous, verdict, reason))
            if verdict == "human" and rng.random() < 0.03:
                events.append(_event("reply", 0, t + 600, e, d, None, c, 0, "human", "reply"))
    for e, c, sent in logged_replies:
        events.append(_event("reply", 0, sent, e, None, None, c, 0, "human", "forwarded_reply"))
    events = events[:n_events]
    while len(events) < n_events:  # top up with machine opens on random copies
        d, e, c, sent, *_ = rng.choice(copies)
        t = sent + rng.uniform(0, 3)
        events.append(_event("open", 0, t, e, d, None, c, 0, "machine", "within_delivery_window"))
    events.sort(key=lambda ev: ev[2])  # the tracker appends in time order
    ev_cols = list(HIT_COLUMNS)
    for i in range(0, len(events), 50_000):
        bulk_insert(
            db,
            "events",
            ev_cols,
            [(*ev[:2], iso(ev[2]), *ev[3:]) for ev in events[i : i + 50_000]],
        )
    analyze(db)
    db.close()
    return {
        "emails": n_emails,
        "events": len(events),
        "deliveries": len(deliveries),
        "links": len(links),
        "contacts": n_contacts,
        "users": n_users,
    }


def _event(kind, inferred, t, e, d, link, c, anonymous, verdict, reason) -> tuple:
    ip = None if anonymous else f"198.51.100.{int(t) % 250 + 1}"
    ua = None if anonymous else UAS[int(t) % len(UAS)]
    return (
        kind,
        inferred,
        t,
        e,
        d,
        link,
        None if anonymous else c,
        anonymous,
        ip,
        ua,
        "GET",
        verdict,
        reason,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--emails", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    began = time.perf_counter()
    sizes = generate(args.path, args.emails, args.events, args.seed)
    sizes["seconds"] = round(time.perf_counter() - began, 1)
    print(sizes)


if __name__ == "__main__":
    main()
