"""A sales team's day, steps 1–6 of the end-to-end issue, through the real system.

Alice (a mailtally user, sent mail logged on contacts) writes to Globex with swaks through
the relay; Postfix delivers; Chromium opens and clicks like people and like machines; a
scanner and a HEAD request hit a link; replies are forwarded to the forwarding address; a
mail is BCC'd to the logging address; the reports must then say exactly what happened.
The tests run in file order and build on each other (it is one day).
"""

from __future__ import annotations

import email.utils
import http.client
import json
import secrets
import sqlite3
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e import mail
from tests.e2e.browser import DESKTOP_UA, PageServer
from tests.e2e.conftest import start_mailtally
from tests.e2e.postfix import Delivered, Postfix, wait_until
from tests.e2e.system import Mailtally
from tracker.tokens import Signer

ALICE = "alice@acme.example"
BOB = "bob@acme.example"
CAROL, DAVE, ERIN = "carol@globex.example", "dave@globex.example", "erin@initech.example"
FRANK, HEIDI, GRACE = "frank@umbrella.example", "heidi@umbrella.example", "grace@hooli.example"
SAFE_LINKS_IP = "40.107.22.13"  # Microsoft Exchange Online Protection (Defender Safe Links)

PROPOSAL_HTML = """\
<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Proposal</title></head>
<body style="font-family: sans-serif">
<p>Hi Carol, hi Dave,</p>
<p>as promised, our <a href="{landing}/landing/pricing?plan=team&amp;seats=25#annual">pricing</a>,
a <a href="{landing}/landing/case-study?id=42">case study</a> and
<a href="{landing}/landing/contact">how to reach us</a>. The proposal is attached.</p>
<p>Best,<br>Alice</p>
</body></html>
"""


@dataclass
class Day:
    """What the day has produced so far, for the later steps."""

    system: Mailtally
    postfix: Postfix
    pages: PageServer
    tag: str
    subject: str = ""
    original: bytes = b""
    pdf: bytes = b""
    copies: dict[str, Delivered] = field(default_factory=dict)
    links: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def day(tmp_path_factory, postfix: Postfix, pages: PageServer):
    system = start_mailtally(
        tmp_path_factory.mktemp("day"),
        postfix,
        tracker={"trusted_proxies": ["127.0.0.1/32"]},
    )
    try:
        system.add_user(ALICE, "Alice Archer")
        system.add_user(BOB, "Bob Baker")
        system.cli("users", "defaults", ALICE, "--log")
        system.cli("never-log", "add", "@hooli.example")
        yield Day(system, postfix, pages, tag=secrets.token_hex(3))
    finally:
        system.stop()


# --- helpers --------------------------------------------------------------------------------


def emails_report(system: Mailtally, all_hits: bool = False) -> list[dict]:
    args = ["report", "emails"] + (["--all-hits"] if all_hits else [])
    return system.cli_json(*args)  # type: ignore[return-value]


def entry(system: Mailtally, subject: str, all_hits: bool = False) -> dict:
    (found,) = [e for e in emails_report(system, all_hits) if e["subject"] == subject]
    return found


def person(report_entry: dict, address: str) -> dict:
    (found,) = [r for r in report_entry["recipients"] if r["address"] == address]
    return found


def wait_for_report(system: Mailtally, subject: str, check, what: str, all_hits=False) -> dict:
    """Poll ``report emails`` until ``check(entry)`` holds (hits are written in batches)."""
    seen: list[dict] = []

    def ok() -> bool:
        found = [e for e in emails_report(system, all_hits) if e["subject"] == subject]
        seen[:] = found
        return bool(found) and check(found[0])

    try:
        wait_until(ok, 30, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last report entry: {seen}") from None
    return seen[0]


def tracker_urls(html: str, base_url: str, kind: str) -> list[str]:
    """The tracker URLs of one kind (``/o/`` pixel, ``/c/`` click) in a copy, in order."""
    out, start = [], 0
    prefix = f"{base_url}/{kind}/"
    while (i := html.find(prefix, start)) >= 0:
        end = min(j for j in (html.find('"', i), html.find("'", i), len(html)) if j >= 0)
        out.append(html[i:end])
        start = end
    return out


def token_of(url: str) -> str:
    return url.rsplit("/", 1)[1].removesuffix(".gif")


def past_machine_window(system: Mailtally, copy: Delivered) -> None:
    """Hits within ``machine_window_seconds`` of delivery are machines; wait it out."""
    window = system.settings.tracker.machine_window_seconds + 0.5
    delivered_at = copy.path.stat().st_mtime
    wait_until(lambda: time.time() > delivered_at + window, window + 5, "machine window")


def serve_copy(day: Day, rcpt: str) -> str:
    """The delivered copy as the recipient's (web)mail client would show it."""
    name = rcpt.split("@")[0]
    return day.pages.add(f"/mail/{day.tag}/{name}.html", day.copies[rcpt].html() or "")


def http_request(url: str, method: str, headers: dict[str, str]) -> http.client.HTTPResponse:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers)
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp


# --- 1. send ------------------------------------------------------------------------------


def test_1_swaks_through_the_relay_one_copy_per_recipient(day: Day) -> None:
    system = day.system
    day.subject = f"Proposal for Globex {day.tag}"
    day.links = [
        f"{day.pages.base_url}/landing/pricing?plan=team&seats=25#annual",
        f"{day.pages.base_url}/landing/case-study?id=42",
        f"{day.pages.base_url}/landing/contact",
    ]
    for path in ("/landing/pricing", "/landing/case-study", "/landing/contact"):
        day.pages.add(path, f"<html><body><h1>{path}</h1></body></html>")
    day.pdf = mail.tiny_pdf(f"Proposal {day.tag}")
    msg = mail.compose(
        f"Alice Archer <{ALICE}>",
        [f"Carol Chen <{CAROL}>"],
        day.subject,
        html=PROPOSAL_HTML.format(landing=day.pages.base_url),
        text="Hi Carol, hi Dave, the proposal is attached.",
        cc=[f"Dave Dunn <{DAVE}>"],
        attachments=[("proposal.pdf", "application/pdf", day.pdf)],
    )
    day.original = msg.as_bytes()
    # Erin and Alice herself are Bcc: envelope recipients only.
    transcript = mail.submit(system.relay_port, ALICE, msg, [CAROL, DAVE, ERIN, ALICE])
    assert "STARTTLS" in transcript and "AUTH LOGIN" in transcript
    assert "235 " in transcript  # authenticated (after STARTTLS: no trusted networks)

    copies = day.postfix.wait_for_messages(lambda m: m.subject == day.subject, 4, timeout=60)
    by_rcpt = {c.recipient: c for c in copies}
    assert sorted(by_rcpt) == sorted([CAROL, DAVE, ERIN, ALICE])
    assert len(copies) == 4  # one copy each, no duplicates
    day.copies = by_rcpt

    signer = Signer(system.settings.tracker.secrets)
    base = system.settings.tracker.base_url
    original_html = msg.get_body(("html",)).get_content()
    delivery_ids = set()
    for rcpt in (CAROL, DAVE, ERIN):
        copy = by_rcpt[rcpt]
        html = copy.html() or ""
        pixels = tracker_urls(html, base, "o")
        assert len(pixels) == 1, (rcpt, pixels)
        opened = signer.verify(token_of(pixels[0]))
        assert opened is not None and opened.kind == "open"
        delivery_ids.add(opened.delivery_id)
        clicks = [signer.verify(token_of(u)) for u in tracker_urls(html, base, "c")]
        targets = [t.url for t in clicks if t is not None and t.kind == "click"]
        assert targets == day.links, (rcpt, targets)  # every link wrapped, URL exact
        assert {t.delivery_id for t in clicks if t is not None} == {opened.delivery_id}
        for link in day.links:
            assert link.replace("&", "&amp;") not in html  # no bare original left
        (pdf,) = [p for p in copy.msg.iter_attachments() if p.get_filename() == "proposal.pdf"]
        assert pdf.get_content() == day.pdf  # byte-identical attachment
    assert len(delivery_ids) == 3  # each copy its own tokens

    own = by_rcpt[ALICE]
    assert own.html() == original_html  # the user's own copy is untouched
    assert base not in own.raw.decode("utf-8", "replace")
    (pdf,) = [p for p in own.msg.iter_attachments()]
    assert pdf.get_content() == day.pdf


# --- 2. Chromium: a person and a headless browser -------------------------------------------


def test_2_chromium_human_open_and_click_headless_is_machine(day: Day, browser) -> None:
    system = day.system
    assert day.copies, "step 1 did not deliver"
    past_machine_window(system, day.copies[CAROL])

    context = browser.new_context(user_agent=DESKTOP_UA)
    try:
        page = context.new_page()
        redirects: list[tuple[int, str]] = []
        page.on(
            "response",
            lambda r: (
                redirects.append((r.status, r.headers.get("location", "")))
                if "/c/" in r.url
                else None
            ),
        )
        page.goto(serve_copy(day, CAROL), wait_until="load")
        wait_for_report(
            system,
            day.subject,
            lambda e: person(e, CAROL)["opens"] == 1,
            "Carol's human open",
        )
        with page.expect_navigation(url=day.links[0]):
            page.click("text=pricing")
        assert page.inner_text("h1") == "/landing/pricing"
        assert redirects == [(302, day.links[0])]
    finally:
        context.close()
    landing = day.pages.hits("/landing/pricing")
    assert landing and landing[-1][2]["User-Agent"] == DESKTOP_UA

    found = wait_for_report(
        system,
        day.subject,
        lambda e: person(e, CAROL)["clicks"] == 1,
        "Carol's human click",
    )
    carol = person(found, CAROL)
    assert carol["opens"] == 1 and not carol["inferred_open"]  # a real open, none inferred
    for other in (DAVE, ERIN):
        assert person(found, other)["opens"] == 0 and person(found, other)["clicks"] == 0

    # Chromium with its own HeadlessChrome user agent opens Dave's copy: a machine.
    past_machine_window(system, day.copies[DAVE])
    context = browser.new_context()
    try:
        page = context.new_page()
        assert "HeadlessChrome" in page.evaluate("navigator.userAgent")
        page.goto(serve_copy(day, DAVE), wait_until="load")
    finally:
        context.close()
    found = wait_for_report(
        system,
        day.subject,
        lambda e: person(e, DAVE)["machine"]["opens"] == 1,
        "Dave's machine open",
        all_hits=True,
    )
    assert person(found, DAVE)["opens"] == 0
    assert person(found, DAVE)["machine"]["reasons"] == {"headless_browser": 1}
    assert person(found, CAROL)["machine"]["opens"] == 0


# --- 3. HEAD and a Safe-Links-like scanner --------------------------------------------------


def test_3_head_and_safe_links_requests_are_machine(day: Day) -> None:
    system = day.system
    assert day.copies, "step 1 did not deliver"
    past_machine_window(system, day.copies[ERIN])
    base = system.settings.tracker.base_url
    link = tracker_urls(day.copies[ERIN].html() or "", base, "c")[1]  # the case study

    # Safe Links fetches the link from Microsoft's network, looking like a browser.
    scan = http_request(link, "GET", {"User-Agent": DESKTOP_UA, "X-Forwarded-For": SAFE_LINKS_IP})
    assert scan.status == 302 and scan.getheader("Location") == day.links[1]
    wait_for_report(
        system,
        day.subject,
        lambda e: person(e, ERIN)["machine"]["clicks"] == 1,
        "the Safe Links click recorded as machine",
        all_hits=True,
    )
    head = http_request(link, "HEAD", {"User-Agent": DESKTOP_UA})
    assert head.status == 302 and head.getheader("Location") == day.links[1]

    found = wait_for_report(
        system,
        day.subject,
        lambda e: person(e, ERIN)["machine"]["clicks"] == 2,
        "Erin's two machine clicks",
        all_hits=True,
    )
    erin = person(found, ERIN)
    assert erin["opens"] == 0 and erin["clicks"] == 0
    assert erin["machine"]["reasons"]["microsoft_defender_network"] == 1
    assert sum(erin["machine"]["reasons"].values()) == 2  # and one for the HEAD request
    human = person(entry(system, day.subject), ERIN)
    assert (human["opens"], human["clicks"], human["inferred_open"]) == (0, 0, False)


# --- 4. replies forwarded to the forwarding address -----------------------------------------


def thunderbird_forward(day: Day) -> mail.EmailMessage:
    """Carol's reply (Thunderbird-quoted), forwarded by Alice from Thunderbird."""
    date = email.utils.formatdate(localtime=True)
    body = (
        "Carol liked it, see below.\n\n"
        "-------- Forwarded Message --------\n"
        f"Subject: \tRe: {day.subject}\n"
        f"Date: \t{date}\n"
        f"From: \tCarol Chen <{CAROL}>\n"
        f"To: \tAlice Archer <{ALICE}>\n"
        f"CC: \tDave Dunn <{DAVE}>\n\n"
        "Thanks Alice, the team plan looks right for us. Can we talk on Thursday?\n\n"
        "Carol\n\n"
        f"On {time.strftime('%d/%m/%Y %H:%M')}, Alice Archer wrote:\n"
        "> Hi Carol, hi Dave,\n"
        ">\n"
        "> as promised, our pricing, a case study and how to reach us.\n"
    )
    return mail.compose(f"Alice Archer <{ALICE}>", [day.system.settings.ingest.forward_address],
                        f"Fwd: Re: {day.subject}", text=body)  # fmt: skip


def outlook_forward(day: Day) -> mail.EmailMessage:
    """Dave's reply (Outlook-quoted), forwarded by Alice from Outlook."""
    sent = time.strftime("%A, %B %d, %Y %I:%M %p")
    body = (
        "FYI\n\n"
        "________________________________\n"
        f"From: Dave Dunn <{DAVE}>\n"
        f"Sent: {sent}\n"
        f"To: Alice Archer <{ALICE}>\n"
        f"Subject: RE: {day.subject}\n\n"
        "Alice, we need the security questionnaire before we can sign.\n\n"
        "Dave\n\n"
        f"From: Alice Archer <{ALICE}>\n"
        f"Sent: {sent}\n"
        f"To: Carol Chen <{CAROL}>\n"
        f"Cc: Dave Dunn <{DAVE}>\n"
        f"Subject: {day.subject}\n\n"
        "Hi Carol, hi Dave,\n"
    )
    return mail.compose(f"Alice Archer <{ALICE}>", [day.system.settings.ingest.forward_address],
                        f"FW: RE: {day.subject}", text=body)  # fmt: skip


def test_4_forwarded_replies_are_logged_with_reply_events(day: Day) -> None:
    system = day.system
    assert day.copies, "step 1 did not deliver"
    forward = system.settings.ingest.forward_address
    for msg in (thunderbird_forward(day), outlook_forward(day)):
        transcript = mail.send_to_ingest(system.ingest_port, ALICE, forward, msg)
        assert "<-  250" in transcript.split(" -> .", 1)[-1], transcript

    def replied(e: dict) -> bool:
        return person(e, CAROL)["replied"] and person(e, DAVE)["replied"]

    found = wait_for_report(system, day.subject, replied, "reply events on the tracked email")
    assert not person(found, ERIN)["replied"]
    # Dave had no human open: his reply adds an inferred open. Carol's open was real.
    assert person(found, DAVE)["inferred_open"] and person(found, DAVE)["opens"] == 1
    assert not person(found, CAROL)["inferred_open"]

    for who, subject in ((CAROL, f"Re: {day.subject}"), (DAVE, f"RE: {day.subject}")):
        shown = system.cli_json("contacts", "show", who)
        logged = [t for t in shown["timeline"] if t["kind"] == "logged"]
        assert [t["subject"] for t in logged] == [subject], shown["timeline"]
        assert [t["subject"] for t in shown["timeline"] if t["kind"] == "reply"] == [day.subject]
        assert shown["last_reply_at"]


# --- 5. BCC to the logging address ----------------------------------------------------------


def test_5_bcc_logging_with_attachment_skips_never_log_domain(day: Day) -> None:
    system = day.system
    subject = f"Umbrella kickoff notes {day.tag}"
    notes = mail.tiny_pdf(f"Kickoff {day.tag}")
    msg = mail.compose(
        f"Alice Archer <{ALICE}>",
        [f"Frank Fischer <{FRANK}>"],
        subject,
        html="<p>Notes from today's kickoff attached.</p>",
        cc=[f"Heidi Hall <{HEIDI}>", f"Grace Gale <{GRACE}>"],
        attachments=[("kickoff-notes.pdf", "application/pdf", notes)],
    )
    bcc = system.settings.ingest.bcc_address
    mail.send_to_ingest(system.ingest_port, ALICE, bcc, msg)

    def logged_on(who: str) -> list[dict]:
        shown = system.cli("contacts", "show", who, "--format", "json", check=False)
        if not shown.strip():
            return []
        return [t for t in json.loads(shown)["timeline"] if t["subject"] == subject]

    wait_until(lambda: logged_on(FRANK) and logged_on(HEIDI), 30, "the BCC'd mail logged")
    for who in (FRANK, HEIDI):
        (item,) = logged_on(who)
        assert item["kind"] == "logged" and item["detail"] == "bcc"
    shown = system.cli_json("contacts", "show", FRANK)
    assert shown["company"] == "umbrella.example"
    # Grace's domain is on the never-log list: no contact, nothing logged.
    listed = [c["email"] for c in system.cli_json("contacts", "list")]
    assert GRACE not in listed and FRANK in listed and HEIDI in listed

    # The attachment is kept with the email, content-addressed, byte-identical.
    db = sqlite3.connect(system.settings.db_path)
    try:
        rows = db.execute(
            "SELECT a.filename, a.sha256, a.size FROM attachments a "
            "JOIN emails e ON e.id = a.email_id WHERE e.subject = ?",
            [subject],
        ).fetchall()
    finally:
        db.close()
    assert [(r[0], r[2]) for r in rows] == [("kickoff-notes.pdf", len(notes))]
    stored = [p for p in Path(system.settings.data_dir, "attachments").rglob(rows[0][1] + "*")]
    assert stored and stored[0].read_bytes() == notes


# --- 6. the reports -------------------------------------------------------------------------


def test_6_reports_give_exact_numbers_for_the_day(day: Day) -> None:
    system = day.system
    report = emails_report(system)
    mine = [e for e in report if day.tag in (e["subject"] or "")]
    by_subject = {e["subject"]: e for e in mine}
    assert sorted(by_subject) == sorted(
        [
            day.subject,
            f"Re: {day.subject}",
            f"RE: {day.subject}",
            f"Umbrella kickoff notes {day.tag}",
        ]
    ), [e["subject"] for e in mine]

    sent = by_subject[day.subject]
    assert sent["user"] == ALICE and sent["source"] == "relay"
    assert sent["tracked"] == {"opens": True, "clicks": True}
    got = {
        r["address"]: (r["opens"], r["clicks"], r["inferred_open"], r["replied"])
        for r in sent["recipients"]
    }
    assert got == {
        CAROL: (1, 1, False, True),
        DAVE: (1, 0, True, True),
        ERIN: (0, 0, False, False),
    }
    assert sent["opens"] == 2 and sent["clicks"] == 1
    assert sent["someone"] == {"opens": 0, "clicks": 0}

    for subject, source in (
        (f"Re: {day.subject}", "forward"),
        (f"RE: {day.subject}", "forward"),
        (f"Umbrella kickoff notes {day.tag}", "bcc"),
    ):
        logged = by_subject[subject]
        assert logged["source"] == source and logged["user"] == ALICE
        assert logged["opens"] == 0 and logged["clicks"] == 0

    everything = {e["subject"]: e for e in emails_report(system, all_hits=True)}
    machine = {r["address"]: r["machine"] for r in everything[day.subject]["recipients"]}
    assert (machine[DAVE]["opens"], machine[DAVE]["clicks"]) == (1, 0)
    assert (machine[ERIN]["opens"], machine[ERIN]["clicks"]) == (0, 2)
    assert (machine[CAROL]["opens"], machine[CAROL]["clicks"]) == (0, 0)

    expected = {
        # email: (emails on the timeline, opens, clicks, replies)
        CAROL: (2, 1, 1, 1),
        DAVE: (2, 1, 0, 1),
        ERIN: (1, 0, 0, 0),
        FRANK: (1, 0, 0, 0),
        HEIDI: (1, 0, 0, 0),
    }
    for who, numbers in expected.items():
        shown = system.cli_json("contacts", "show", who)
        assert (shown["emails"], shown["opens"], shown["clicks"], shown["replies"]) == numbers, (
            who,
            shown,
        )
    carol = system.cli_json("contacts", "show", CAROL)
    assert carol["company"] == "globex.example"
    assert carol["last_open_at"] and carol["last_click_at"] and carol["last_reply_at"]
    erin = system.cli_json("contacts", "show", ERIN)
    assert erin["last_open_at"] is None and erin["last_click_at"] is None
