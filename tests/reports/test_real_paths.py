"""Reports over data made through the real paths: mail submitted with smtplib to a running
relay (maildir upstream), BCC'd with smtplib to a running ingest; then the report JSON is
asserted exactly (times, which nobody can predict, are read back from the store)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re

from click.testing import CliRunner

import cli
from store import contacts as store_contacts
from store import emails as store_emails
from store import events as store_events
from store import reports
from store import sent as store_sent
from tests.reports.paths import bcc, delivered, report, submit
from tests.support import wait_for

HTML_MAIL = """From: Alice <alice@seller.test>
To: Bob <bob@acme.test>, carol@acme.test
Subject: Proposal for Acme
Message-ID: <proposal-1@seller.test>
MIME-Version: 1.0
Content-Type: text/html; charset=utf-8

<html><body><p>Hello, see <a href="https://pricing.example.com/plans?a=1&amp;b=2">our plans</a>.</p></body></html>
"""

TEXT_MAIL = """From: Alice <alice@seller.test>
To: erin@beta.test
Subject: Quick note
Message-ID: <note-1@seller.test>
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8

Just text.
"""


def tracking_urls(msg) -> tuple[str, list[str]]:
    html = msg.get_body(("html",)).get_content()
    pixel = re.search(r'src="([^"]+/o/[^"]+)"', html).group(1)
    clicks = re.findall(r'href="([^"]+/c/[^"]+)"', html)
    return pixel, clicks


async def test_sent_and_logged_mail_appear_exactly(settings, db, services) -> None:
    store_contacts.ensure_contact(db, "bob@acme.test", company_domain="acme.test")
    # smtplib blocks: it runs in a thread while the servers run on this loop.
    await asyncio.to_thread(submit, settings, HTML_MAIL, ["bob@acme.test", "carol@acme.test"])
    await asyncio.to_thread(submit, settings, TEXT_MAIL, ["erin@beta.test"])
    await wait_for(lambda: len(delivered(settings)) == 3)
    # Each recipient got its own copy, with its own pixel and tracked link.
    copies = [m for m in delivered(settings) if m["Subject"] == "Proposal for Acme"]
    assert len(copies) == 2 and len({tracking_urls(m)[0] for m in copies}) == 2

    bcc_mail = (
        "From: Alice <alice@seller.test>\nTo: Dan <dan@delta.test>\nSubject: Call recap\n"
        "Date: Mon, 23 Nov 2026 08:00:00 +0000\nMessage-ID: <recap-1@seller.test>\n\nNotes.\n"
    )
    await asyncio.to_thread(bcc, settings, bcc_mail, [settings.ingest.bcc_address])
    logged = await wait_for(
        lambda: store_emails.find_email(db, "mid:recap-1@seller.test"), timeout=20
    )
    proposal = store_emails.find_email(db, "mid:proposal-1@seller.test")
    note = store_emails.find_email(db, "mid:note-1@seller.test")
    assert store_sent.deliveries_of(db, proposal["id"])  # one copy per recipient

    def zero(address):
        return {
            "address": address,
            "opens": 0,
            "clicks": 0,
            "first_open_at": None,
            "last_open_at": None,
            "inferred_open": False,
            "replied": False,
        }

    def head(row, tracked, reason):
        return {
            "message_id": row["message_id"],
            "subject": row["subject"],
            "sent_at": row["sent_at"],
            "user": "alice@seller.test",
            "source": row["source"],
            "tracked": {"opens": tracked, "clicks": tracked},
            "untracked_reason": reason,
            "opens": 0,
            "clicks": 0,
            "someone": {"opens": 0, "clicks": 0},
        }

    expected = {
        "<note-1@seller.test>": {
            **head(note, False, note["untracked_reason"]),
            "recipients": [zero("erin@beta.test")],
        },
        "<proposal-1@seller.test>": {
            **head(proposal, True, None),
            "recipients": [zero("bob@acme.test"), zero("carol@acme.test")],
        },
        "<recap-1@seller.test>": {
            **head(logged, False, logged["untracked_reason"] or reports.LOGGED_REASON),
            "recipients": [zero("dan@delta.test")],
        },
    }
    got = report(settings, "emails")
    assert {e["message_id"]: e for e in got} == expected
    # Newest first; the BCC'd mail carries its Date header's time.
    assert [e["sent_at"] for e in got] == sorted((e["sent_at"] for e in got), reverse=True)
    assert dt.datetime.fromisoformat(logged["sent_at"]) == dt.datetime(
        2026, 11, 23, 8, tzinfo=dt.UTC
    )
    assert note["untracked_reason"]  # the relay says why plain text is not tracked
    assert report(settings, "emails", "--untracked") == [
        e for e in got if e["message_id"] != "<proposal-1@seller.test>"
    ]
    assert [e["message_id"] for e in report(settings, "emails", "--contact", "dan@delta.test")] == [
        "<recap-1@seller.test>"
    ]
    users = report(settings, "users")
    assert users == [
        {
            "user": "alice@seller.test",
            "name": "Alice",
            "sent": 2,
            "logged": 1,
            "tracked": 1,
            "opened": 0,
            "clicked": 0,
            "replied": 0,
            "open_rate": 0.0,
            "click_rate": 0.0,
            "reply_rate": 0.0,
            "machine_hits": 0,
            "self_hits": 0,
        }
    ]
    links = report(settings, "links")
    assert links == [
        {
            "message_id": "<proposal-1@seller.test>",
            "subject": "Proposal for Acme",
            "sent_at": proposal["sent_at"],
            "user": "alice@seller.test",
            "position": links[0]["position"],
            "url": "https://pricing.example.com/plans?a=1&b=2",
            "clicks": 0,
            "unique_clicks": 0,
            "someone_clicks": 0,
        }
    ]


async def test_forwarded_reply_is_a_reply_and_an_inferred_open(settings, db, services) -> None:
    """Bob answers the tracked proposal; Alice forwards his reply to the logging address:
    the ingest files it on Bob and records a reply (and an inferred open) on his copy."""
    await asyncio.to_thread(submit, settings, HTML_MAIL, ["bob@acme.test", "carol@acme.test"])
    await wait_for(lambda: len(delivered(settings)) == 2)
    forward = (
        "From: Alice <alice@seller.test>\n"
        f"To: {settings.ingest.forward_address}\n"
        "Subject: Fwd: Re: Proposal for Acme\n"
        "Message-ID: <fwd-1@seller.test>\n"
        "Date: Mon, 23 Nov 2026 11:00:00 +0000\n"
        "Content-Type: text/plain; charset=utf-8\n\n"
        "FYI, he is in.\n\n"
        "---------- Forwarded message ---------\n"
        "From: Bob <bob@acme.test>\n"
        "Date: Mon, 23 Nov 2026 10:15:00 +0000\n"
        "Subject: Re: Proposal for Acme\n"
        "To: Alice <alice@seller.test>\n\n"
        "Looks good, let's talk on Monday.\n"
    )
    await asyncio.to_thread(bcc, settings, forward, [settings.ingest.forward_address])
    proposal = store_emails.find_email(db, "mid:proposal-1@seller.test")
    bob_copy = next(
        d for d in store_sent.deliveries_of(db, proposal["id"]) if d["recipient"] == "bob@acme.test"
    )
    events = await wait_for(lambda: store_events.events_of_delivery(db, bob_copy["id"]))
    assert sorted((e["kind"], e["inferred"]) for e in events) == [("open", 1), ("reply", 0)]
    reply_at = next(e["at"] for e in events if e["kind"] == "reply")
    assert dt.datetime.fromisoformat(reply_at) == dt.datetime(2026, 11, 23, 10, 15, tzinfo=dt.UTC)
    logged = next(
        e for e in store_events.events_of_email(db, proposal["id"]) if e["kind"] == "reply"
    )
    assert logged["verdict"] == "human"

    got = {e["message_id"]: e for e in report(settings, "emails")}
    assert got["<proposal-1@seller.test>"]["recipients"] == [
        {
            "address": "bob@acme.test",
            "opens": 1,
            "clicks": 0,
            "first_open_at": reply_at,
            "last_open_at": reply_at,
            "inferred_open": True,
            "replied": True,
        },
        {
            "address": "carol@acme.test",
            "opens": 0,
            "clicks": 0,
            "first_open_at": None,
            "last_open_at": None,
            "inferred_open": False,
            "replied": False,
        },
    ]
    assert (
        got["<proposal-1@seller.test>"]["opens"],
        got["<proposal-1@seller.test>"]["clicks"],
    ) == (
        1,
        0,
    )
    fwd = [e for e in got.values() if e["source"] == "forward"]
    assert len(fwd) == 1 and fwd[0]["subject"] == "Re: Proposal for Acme"
    assert [r["address"] for r in fwd[0]["recipients"]] == ["bob@acme.test"]
    assert fwd[0]["untracked_reason"]
    # The contact's timeline has the sent proposal, its reply, the inferred open, the log.
    detail = CliRunner().invoke(
        cli.main,
        [
            "--config",
            str(settings.config_path),
            "contacts",
            "show",
            "bob@acme.test",
            "--format",
            "json",
        ],
    )
    timeline = json.loads(detail.output)["timeline"]
    kinds = sorted((t["kind"], t["detail"]) for t in timeline)
    assert kinds == sorted(
        [("sent", ""), ("reply", ""), ("open", "inferred"), ("logged", "forward")]
    )
    assert json.loads(detail.output)["last_reply_at"] == reply_at
