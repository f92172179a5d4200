"""SPEC ingest 5: forward logging over the real listener.

Every case of the crisp corpus is wrapped into a message from a user to the forwarding
address, once as text/plain and once as text/html, and must yield the expected original
sender, subject, first To and Cc (or nothing logged for the non-forwards). Own fixtures
cover iPhone/iPad, Android Gmail, Samsung Mail and Windows Live Mail.
"""

from __future__ import annotations

import html
import json
from email.message import EmailMessage
from email.utils import make_msgid

import aiosmtplib
import pytest

from store import contacts, users
from store import inbound as store_inbound
from tests.ingest.conftest import CORPORA, deliver, message
from tests.support import wait_for

CRISP = CORPORA / "forwarded" / "crisp"
NEUTRAL_SUBJECT = "Logged mail"


def as_html(text: str) -> str:
    """How a client would put a plain forward into an HTML-only body."""
    lines = text.replace("\r\n", "\n").split("\n")
    return (
        '<html><head><style>p{margin:0}</style></head><body><div dir="ltr">'
        + "<br>\n".join(html.escape(line) for line in lines)
        + "</div></body></html>"
    )


def forward_message(
    body: str, subject: str, *, as_html_only: bool, sender="alice@acme.io"
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "log-forward"  # replaced by the caller
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="acme.io")
    msg["Date"] = "Tue, 24 Nov 2026 09:00:00 +0000"
    if as_html_only:
        msg.set_content(as_html(body), subtype="html")
    else:
        msg.set_content(body)
    return msg


def check_case(case: dict, entry: dict) -> list[str]:
    """Differences between the expectation and what was logged (empty = pass)."""
    fwd = entry["details"].get("forward")
    if not case["forwarded"]:
        problems = []
        if fwd is not None:
            problems.append(f"parsed as a forward ({fwd['format']})")
        if entry["decision"] != "not_logged":
            problems.append(f"decision {entry['decision']}")
        return problems
    if fwd is None:
        return ["no forward found: " + "; ".join(entry["reasons"])]
    problems = []
    for key in ("subject", "from_address", "from_name"):
        if fwd[key] != case[key]:
            problems.append(f"{key}={fwd[key]!r}, expected {case[key]!r}")
    if "to_first" in case and fwd["to"][:1] != [case["to_first"]]:
        problems.append(f"to={fwd['to']}")
    if "cc" in case and fwd["cc"] != case["cc"]:
        problems.append(f"cc={fwd['cc']}")
    if case["from_address"]:
        if entry["decision"] != "logged":
            problems.append(f"decision {entry['decision']}: {entry['reasons']}")
        else:
            email = store_inbound.email_row(entry["_db"], entry["email_id"])
            if email["from_addr"] != case["from_address"] or email["subject"] != case["subject"]:
                problems.append(f"stored from/subject {email['from_addr']}/{email['subject']}")
    elif entry["decision"] != "not_logged":
        problems.append("logged without an original sender address")
    return problems


async def test_crisp_corpus_text_and_html(ingest, db, alice, settings):
    cases = json.loads((CRISP / "expectations.json").read_text())["cases"]
    assert len(cases) == 206
    sent = []
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=ingest.port, timeout=60)
    await smtp.connect()
    try:
        for mode in ("text", "html"):
            for case in cases:
                body = (CRISP / case["body"]).read_text(encoding="utf-8")
                subject = (
                    (CRISP / case["subject_file"]).read_text(encoding="utf-8").strip()
                    if case["subject_file"]
                    else NEUTRAL_SUBJECT
                )
                msg = forward_message(body, subject, as_html_only=mode == "html")
                msg.replace_header("To", settings.ingest.forward_address)
                await smtp.sendmail(
                    "alice@acme.io", [settings.ingest.forward_address], msg.as_bytes()
                )
                sent.append((mode, case, msg["Message-ID"]))
    finally:
        await smtp.quit()
    await wait_for(
        lambda: db.execute("SELECT COUNT(*) FROM inbound_log").fetchone()[0] == len(sent),
        timeout=240,
    )
    failures = []
    for mode, case, mid in sent:
        (entry,) = store_inbound.inbound_by_message_id(db, mid)
        entry["_db"] = db
        problems = check_case(case, entry)
        if problems:
            failures.append(f"{mode} {case['body']}: {problems}")
    passed = len(sent) - len(failures)
    print(f"\ncrisp forward corpus: {passed}/{len(sent)} passed ({100 * passed / len(sent):.1f}%)")
    assert not failures, "\n".join(failures)
    # Only original senders became contacts: never the forwarded To/Cc recipients.
    assert {c["email"] for c in contacts.list_contacts(db)} == {"john.doe@acme.com"}


# Own fixtures: clients the crisp corpus does not cover. (body, outer subject, expected)
OWN_FIXTURES = {
    "iphone": (
        "Worth a look.\n\nSent from my iPhone\n\nBegin forwarded message:\n\n"
        "From: Jane Roe <jane.roe@prospect.com>\n"
        "Date: 23 November 2026 at 09:12:44 CET\n"
        "To: Alice <alice@acme.io>\n"
        "Cc: Sam <sam@prospect.com>\n"
        "Subject: Re: Pricing for 2027\n\n"
        "Hi Alice, we are ready to sign.\n",
        "Fwd: Pricing for 2027",
    ),
    "ipad_de": (
        "Von meinem iPad gesendet\n\nAnfang der weitergeleiteten Nachricht:\n\n"
        "Von: Jane Roe <jane.roe@prospect.com>\n"
        "Datum: 23. November 2026 um 09:12:44 MEZ\n"
        "An: Alice <alice@acme.io>\n"
        "Kopie: Sam <sam@prospect.com>\n"
        "Betreff: Re: Pricing for 2027\n\n"
        "Hallo Alice, wir unterschreiben.\n",
        "WG: Pricing for 2027",
    ),
    "android_gmail": (
        "FYI\n\n---------- Forwarded message ---------\n"
        "From: Jane Roe <jane.roe@prospect.com>\n"
        "Date: Mon, 23 Nov 2026, 09:12\n"
        "Subject: Re: Pricing for 2027\n"
        "To: Alice <alice@acme.io>\n"
        "Cc: Sam <sam@prospect.com>\n\n\n"
        "Hi Alice, we are ready to sign.\n",
        "Fwd: Re: Pricing for 2027",
    ),
    "samsung_mail": (
        "\n\n\nSent from my Galaxy\n\n\n"
        "-------- Original message --------\n"
        "From: Jane Roe <jane.roe@prospect.com> \n"
        "Date: 23/11/2026 09:12 (GMT+01:00) \n"
        "To: alice@acme.io \n"
        "Cc: sam@prospect.com \n"
        "Subject: Re: Pricing for 2027 \n\n"
        "Hi Alice, we are ready to sign.\n",
        "Fwd: Re: Pricing for 2027",
    ),
    "samsung_mail_fr": (
        "Envoyé depuis mon Galaxy\n\n"
        "-------- Message d'origine --------\n"
        "De : Jane Roe <jane.roe@prospect.com> \n"
        "Date : 23/11/2026 09:12 (GMT+01:00) \n"
        "À : alice@acme.io \n"
        "Cc : sam@prospect.com \n"
        "Objet : Re: Pricing for 2027 \n\n"
        "Bonjour Alice.\n",
        "TR: Re: Pricing for 2027",
    ),
    "windows_live_mail": (
        "Please log this.\n\n"
        "----- Original Message ----- \n"
        'From: "Jane Roe" <jane.roe@prospect.com>\n'
        "To: <alice@acme.io>\n"
        "Cc: <sam@prospect.com>\n"
        "Sent: Monday, November 23, 2026 9:12 AM\n"
        "Subject: Re: Pricing for 2027\n\n\n"
        "> Hi Alice, we are ready to sign.\n",
        "Fw: Re: Pricing for 2027",
    ),
}


@pytest.mark.parametrize("mode", ["text", "html"])
@pytest.mark.parametrize("client", sorted(OWN_FIXTURES))
async def test_own_client_fixtures(ingest, db, alice, settings, client, mode):
    body, subject = OWN_FIXTURES[client]
    msg = forward_message(body, subject, as_html_only=mode == "html")
    msg.replace_header("To", settings.ingest.forward_address)
    entry = await deliver(ingest, db, msg, to_forward=True)
    assert entry["decision"] == "logged", entry["reasons"]
    fwd = entry["details"]["forward"]
    assert (fwd["from_name"], fwd["from_address"]) == ("Jane Roe", "jane.roe@prospect.com")
    assert fwd["subject"] == "Re: Pricing for 2027"
    assert fwd["to"] == ["alice@acme.io"] and fwd["cc"] == ["sam@prospect.com"]
    assert "2026" in fwd["date"]
    email = store_inbound.email_row(db, entry["email_id"])
    assert email["source"] == "forward" and email["user_id"] == alice["id"]
    assert email["from_addr"] == "jane.roe@prospect.com"
    assert email["sent_at"].startswith("2026-11-23T0")  # the original's date, not the forward's
    assert "Alice" in email["text_body"] and "Sent from my" not in email["text_body"]
    assert {c["email"] for c in store_inbound.email_contacts_of(db, entry["email_id"])} == {
        "jane.roe@prospect.com"
    }
    assert contacts.find_contact(db, "sam@prospect.com") is None  # Cc is not a contact
    contact = contacts.get_contact(db, "jane.roe@prospect.com")
    assert contact["name"] == "Jane Roe" and contact["company_id"] is not None


async def test_reply_with_quoted_header_block_is_not_a_forward(ingest, db, alice, settings):
    body = (
        "Thanks, see you then.\n\n________________________________\n"
        "From: Jane Roe <jane.roe@prospect.com>\nSent: Monday, November 23, 2026 09:12\n"
        "To: Alice <alice@acme.io>\nSubject: Meeting\n\nCan we meet?\n"
    )
    msg = forward_message(body, "Re: Meeting", as_html_only=False)
    entry = await deliver(ingest, db, msg, to_forward=True)
    assert entry["decision"] == "not_logged"
    assert entry["reasons"][0].startswith("reply, not a forward")
    assert contacts.find_contact(db, "jane.roe@prospect.com") is None


async def test_unrecognised_forward_logs_nothing(ingest, db, alice):
    msg = forward_message("Just a note with no forwarded block.\n", "Hello", as_html_only=False)
    entry = await deliver(ingest, db, msg, to_forward=True)
    assert entry["decision"] == "not_logged"
    assert entry["reasons"] == ["unrecognised forward format"]
    assert store_inbound.count_emails(db) == 0


async def test_html_only_gmail_markup(ingest, db, alice):
    """Gmail's real HTML structure (gmail_quote, <b>/<span> around the header values)."""
    markup = (
        '<div dir="ltr">see below<br><br><div class="gmail_quote"><div dir="ltr" '
        'class="gmail_attr">---------- Forwarded message ---------<br>From: <b class="gmail_sendername" '
        'dir="auto">Jane Roe</b> <span dir="auto">&lt;<a href="mailto:jane.roe@prospect.com">'
        "jane.roe@prospect.com</a>&gt;</span><br>Date: Mon, 23 Nov 2026 at 09:12<br>Subject: "
        'Re: Pricing&nbsp;for 2027<br>To: Alice &lt;<a href="mailto:alice@acme.io">alice@acme.io</a>&gt;'
        '<br></div><br><br><div dir="ltr"><p>Hi Alice,</p><p>we are ready to sign.</p></div></div></div>'
    )
    msg = message(subject="Fwd: Re: Pricing for 2027", text=None, html=markup)
    entry = await deliver(ingest, db, msg, to_forward=True)
    assert entry["decision"] == "logged", entry["reasons"]
    fwd = entry["details"]["forward"]
    assert (fwd["from_name"], fwd["from_address"], fwd["subject"]) == (
        "Jane Roe",
        "jane.roe@prospect.com",
        "Re: Pricing for 2027",
    )
    assert "we are ready to sign" in fwd["body"] and "see below" not in fwd["body"]
    assert fwd["note"] == "see below"


async def test_forward_as_attachment(ingest, db, alice):
    inner = message(sender="Jane Roe <jane.roe@prospect.com>", to="alice@acme.io", subject="Re: Q")
    outer = message(subject="Fwd: Re: Q", text="see attached")
    outer.add_attachment(inner.as_bytes(), maintype="message", subtype="rfc822")
    entry = await deliver(ingest, db, outer, to_forward=True)
    assert entry["decision"] == "logged", entry["reasons"]
    assert entry["details"]["forward"]["format"] == "attached-message"
    assert entry["details"]["forward"]["from_address"] == "jane.roe@prospect.com"


async def test_never_logged_original_sender(ingest, db, alice):
    contacts.never_log_add(db, "@prospect.com")
    body, subject = OWN_FIXTURES["android_gmail"]
    entry = await deliver(
        ingest, db, forward_message(body, subject, as_html_only=False), to_forward=True
    )
    assert entry["decision"] == "not_logged"
    assert any("never-log" in r for r in entry["reasons"])
    assert contacts.find_contact(db, "jane.roe@prospect.com") is None


async def test_forward_from_non_user_is_refused(ingest, db, alice):
    body, subject = OWN_FIXTURES["android_gmail"]
    msg = forward_message(body, subject, as_html_only=False, sender="stranger@else.org")
    entry = await deliver(ingest, db, msg, to_forward=True)
    assert entry["decision"] == "not_logged" and "not a user" in entry["reasons"][0]
    assert contacts.find_contact(db, "jane.roe@prospect.com") is None


async def test_forwarded_reply_to_tracked_email_records_reply(ingest, db, alice):
    """Alice sent "Pricing for 2027" through the relay to Jane; Jane replied; Alice forwards
    the reply: a reply event on Jane's copy, plus an inferred open (no human open yet)."""
    from store import emails, events

    key = emails.message_key(make_msgid(domain="acme.io"), b"")
    email_id, _ = store_inbound.ensure_email(
        db,
        {
            "message_id": key[4:],
            "message_key": key,
            "source": "relay",
            "user_id": alice["id"],
            "attribution": "relay",
            "from_addr": "alice@acme.io",
            "to_addrs": ["jane.roe@prospect.com"],
            "cc_addrs": [],
            "subject": "Pricing for 2027",
            "sent_at": "2026-11-20T10:00:00+00:00",
            "text_body": "offer",
            "html_body": None,
        },
    )
    db.execute(
        "INSERT INTO deliveries (email_id, recipient, created_at) VALUES (?, ?, ?)",
        [email_id, "jane.roe@prospect.com", "2026-11-20T10:00:00+00:00"],
    )
    db.conn.commit()
    body, subject = OWN_FIXTURES["android_gmail"]
    entry = await deliver(
        ingest, db, forward_message(body, subject, as_html_only=False), to_forward=True
    )
    assert entry["decision"] == "logged"
    assert entry["details"]["reply"]["email_id"] == email_id
    evs = events.events_of_email(db, email_id)
    kinds = sorted((e["kind"], bool(e["inferred"])) for e in evs)
    assert kinds == [("open", True), ("reply", False)]
    assert all(
        e["contact_id"] == contacts.get_contact(db, "jane.roe@prospect.com")["id"] for e in evs
    )
    assert contacts.get_contact(db, "jane.roe@prospect.com")["last_reply_at"]


async def test_two_users_forward_the_same_reply(ingest, db, alice):
    users.add_user(db, "dave@acme.io", "Dave", None)
    body, subject = OWN_FIXTURES["iphone"]
    await deliver(ingest, db, forward_message(body, subject, as_html_only=False), to_forward=True)
    await deliver(
        ingest,
        db,
        forward_message(body, subject, as_html_only=True, sender="dave@acme.io"),
        to_forward=True,
    )
    assert store_inbound.count_emails(db) == 1
