"""Reports over hits made through the real tracker: mail sent through a running relay
(maildir upstream), its pixel and tracked links fetched from the delivered copies by an
aiohttp client with real browser and proxy user agents; then the report JSON is asserted
exactly (times and the tracker's reason codes are read back from the store)."""

from __future__ import annotations

import asyncio
import datetime as dt
import re

import aiohttp
import pytest

from store import contacts as store_contacts
from store import emails as store_emails
from store import events as store_events
from store import sent as store_sent
from tests.reports.paths import delivered, report, report_contact, submit
from tests.support import wait_for

CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"
GMAIL_PROXY = (
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
)
APPLE_MPP = "Mozilla/5.0"

MAIL = """From: Alice <alice@seller.test>
To: Bob <bob@acme.test>, carol@acme.test
Subject: Pricing
Message-ID: <pricing-1@seller.test>
MIME-Version: 1.0
Content-Type: text/html; charset=utf-8

<html><body><p>Hello, see <a href="https://pricing.example.com/plans?a=1&amp;b=2">our plans</a>
and <a href="https://docs.example.com/start#top">the docs</a>.</p></body></html>
"""


@pytest.fixture
async def running(settings, db):
    from relay import service as relay_service
    from tracker import service as tracker_service

    settings.tracker.machine_window_seconds = 1.0
    svcs = [await tracker_service.start(settings), await relay_service.start(settings)]
    yield svcs
    for svc in reversed(svcs):
        await svc.stop()


def urls_of(msg) -> tuple[str, list[str]]:
    html = msg.get_body(("html",)).get_content()
    pixel = re.search(r'src="([^"]+/o/[^"]+)"', html).group(1)
    return pixel, re.findall(r'href="([^"]+/c/[^"]+)"', html)


async def marked_delivered(db, email_id: int, count: int) -> list[dict]:
    """The email's deliveries once all ``count`` have delivered_at committed."""

    def done():
        rows = store_sent.deliveries_of(db, email_id)
        return len(rows) == count and all(r["delivered_at"] for r in rows) and rows

    return await wait_for(done)


async def send_and_wait(settings, db) -> dict:
    await asyncio.to_thread(submit, settings, MAIL, ["bob@acme.test", "carol@acme.test"])
    copies = await wait_for(lambda: len(delivered(settings)) == 2 and delivered(settings))
    email = store_emails.find_email(db, "mid:pricing-1@seller.test")
    # The maildir file appears before the relay commits delivered_at: wait for both.
    rows = await marked_delivered(db, email["id"], 2)
    deliveries = {d["recipient"]: d for d in rows}
    # Which delivered copy is whose: its pixel token names the copy (delivery id).
    from tracker.tokens import Signer

    signer = Signer(settings.tracker.secrets)
    by_rcpt = {}
    for msg in copies:
        pixel, clicks = urls_of(msg)
        token = signer.verify(pixel.rsplit("/", 1)[1].removesuffix(".gif"))
        rcpt = next(r for r, d in deliveries.items() if d["id"] == token.delivery_id)
        by_rcpt[rcpt] = (pixel, clicks)
    # Hits within tracker.machine_window_seconds of delivery are machines: start after it.
    delivered_at = max(dt.datetime.fromisoformat(d["delivered_at"]) for d in deliveries.values())
    window = settings.tracker.machine_window_seconds
    remaining = (delivered_at - dt.datetime.now(dt.UTC)).total_seconds() + window + 0.05
    if remaining > 0:
        await asyncio.sleep(remaining)
    return {"email": email, "deliveries": deliveries, "urls": by_rcpt}


async def get(session, url, ua, **headers):
    headers["User-Agent"] = ua
    async with session.get(url, headers=headers, allow_redirects=False) as r:
        await r.read()
        return r.status, r.headers.get("Location")


async def test_tracker_hits_become_the_report(settings, db, running) -> None:
    sent = await send_and_wait(settings, db)
    bob_pixel, _ = sent["urls"]["bob@acme.test"]
    _, carol_clicks = sent["urls"]["carol@acme.test"]
    async with aiohttp.ClientSession() as s:
        assert (await get(s, bob_pixel, CHROME))[0] == 200
        assert (await get(s, bob_pixel, APPLE_MPP))[0] == 200  # Apple MPP prefetch: machine
        # A browser prefetching the image: machine.
        assert (await get(s, bob_pixel, CHROME, **{"Sec-Purpose": "prefetch"}))[0] == 200
        status, location = await get(s, carol_clicks[0], FIREFOX)
        assert (status, location) == (302, "https://pricing.example.com/plans?a=1&b=2")
        assert (await get(s, bob_pixel, GMAIL_PROXY))[0] == 200  # Gmail's proxy: a person
    bob, carol = sent["deliveries"]["bob@acme.test"], sent["deliveries"]["carol@acme.test"]
    await wait_for(lambda: len(store_events.events_of_delivery(db, bob["id"])) == 4)
    await wait_for(lambda: len(store_events.events_of_delivery(db, carol["id"])) == 2)
    bob_events = store_events.events_of_delivery(db, bob["id"])
    carol_events = store_events.events_of_delivery(db, carol["id"])
    human = [e for e in bob_events if e["verdict"] == "human"]
    machine = [e for e in bob_events if e["verdict"] == "machine"]
    assert len(human) == 2 and len(machine) == 2, bob_events
    assert sorted((e["kind"], e["inferred"], e["verdict"]) for e in carol_events) == [
        ("click", 0, "human"),
        ("open", 1, "human"),
    ]
    click_at = next(e["at"] for e in carol_events if e["kind"] == "click")
    reasons: dict[str, int] = {}
    for e in machine:
        reasons[e["reason"]] = reasons.get(e["reason"], 0) + 1

    email = sent["email"]
    base = {
        "message_id": "<pricing-1@seller.test>",
        "subject": "Pricing",
        "sent_at": email["sent_at"],
        "user": "alice@seller.test",
        "source": "relay",
        "tracked": {"opens": True, "clicks": True},
        "untracked_reason": None,
        "opens": 3,
        "clicks": 1,
        "someone": {"opens": 0, "clicks": 0},
        "recipients": [
            {
                "address": "bob@acme.test",
                "opens": 2,
                "clicks": 0,
                "first_open_at": min(e["at"] for e in human),
                "last_open_at": max(e["at"] for e in human),
                "inferred_open": False,
                "replied": False,
            },
            {
                "address": "carol@acme.test",
                "opens": 1,
                "clicks": 1,
                "first_open_at": click_at,
                "last_open_at": click_at,
                "inferred_open": True,
                "replied": False,
            },
        ],
    }
    assert report(settings, "emails") == [base]
    every = report(settings, "emails", "--all-hits")[0]
    assert every["machine"] == {"opens": 2, "clicks": 0, "reasons": dict(sorted(reasons.items()))}
    assert every["recipients"][0]["machine"]["opens"] == 2
    assert every["recipients"][1]["machine"] == {"opens": 0, "clicks": 0, "reasons": {}}
    # --all-hits adds, it never changes the human counts.
    for obj in (every, every["someone"], *every["recipients"]):
        del obj["machine"], obj["self"]
    assert every == base
    links = report(settings, "links")
    assert [(x["url"], x["clicks"], x["unique_clicks"]) for x in links] == [
        ("https://pricing.example.com/plans?a=1&b=2", 1, 1),
        ("https://docs.example.com/start#top", 0, 0),
    ]


@pytest.fixture
def privacy(settings):
    settings.privacy.enabled = True
    return settings


async def test_privacy_mode_and_shared_copies_are_someone(privacy, settings, db, running) -> None:
    """Privacy mode: carol has no lawful basis, so her hits are anonymous (Someone); bob has
    one and is counted as himself. A shared copy's hits are Someone's too."""
    store_contacts.ensure_contact(db, "bob@acme.test")
    store_contacts.set_basis(db, "bob@acme.test", "yes")
    store_contacts.ensure_contact(db, "carol@acme.test")
    sent = await send_and_wait(settings, db)
    async with aiohttp.ClientSession() as s:
        assert (await get(s, sent["urls"]["bob@acme.test"][0], CHROME))[0] == 200
        assert (await get(s, sent["urls"]["carol@acme.test"][0], FIREFOX))[0] == 200
        status, _ = await get(s, sent["urls"]["carol@acme.test"][1][1], FIREFOX)
        assert status == 302
    ids = [d["id"] for d in sent["deliveries"].values()]
    await wait_for(lambda: sum(len(store_events.events_of_delivery(db, i)) for i in ids) == 3)
    carol = store_events.events_of_delivery(db, sent["deliveries"]["carol@acme.test"]["id"])
    assert all(e["anonymous"] and e["ip"] is None and e["user_agent"] is None for e in carol)
    bob_open = store_events.events_of_delivery(db, sent["deliveries"]["bob@acme.test"]["id"])[0]
    entry = report(settings, "emails")[0]
    assert (entry["opens"], entry["clicks"], entry["someone"]) == (2, 1, {"opens": 1, "clicks": 1})
    assert entry["recipients"] == [
        {
            "address": "bob@acme.test",
            "opens": 1,
            "clicks": 0,
            "first_open_at": bob_open["at"],
            "last_open_at": bob_open["at"],
            "inferred_open": False,
            "replied": False,
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
    # Carol's timeline has the email, none of the anonymous hits; her properties stay empty.
    timeline = report_contact(settings, "carol@acme.test")
    assert [t["kind"] for t in timeline["timeline"]] == ["sent"]
    assert timeline["last_open_at"] is None and timeline["last_click_at"] is None

    # One shared copy (relay.per_recipient = false): every hit is Someone's. The relay's
    # worker processes read settings when they start, so the relay restarts with it.
    from relay import service as relay_service

    await running[1].stop()
    settings.relay.per_recipient = False
    running[1] = await relay_service.start(settings)
    shared_mail = MAIL.replace("pricing-1@", "pricing-2@").replace(
        "Subject: Pricing", "Subject: Team"
    )
    await asyncio.to_thread(submit, settings, shared_mail, ["bob@acme.test", "carol@acme.test"])
    msgs = await wait_for(lambda: [m for m in delivered(settings) if m["Subject"] == "Team"])
    assert len(msgs) == 1
    pixel, _ = urls_of(msgs[0])
    team = store_emails.find_email(db, "mid:pricing-2@seller.test")
    (copy,) = await marked_delivered(db, team["id"], 1)
    assert copy["shared"] == 1
    remaining = (
        (dt.datetime.fromisoformat(copy["delivered_at"]) - dt.datetime.now(dt.UTC)).total_seconds()
        + settings.tracker.machine_window_seconds
        + 0.05
    )
    if remaining > 0:
        await asyncio.sleep(remaining)
    async with aiohttp.ClientSession() as s:
        assert (await get(s, pixel, CHROME))[0] == 200
    await wait_for(lambda: store_events.events_of_delivery(db, copy["id"]))
    entry = next(e for e in report(settings, "emails") if e["subject"] == "Team")
    assert (entry["opens"], entry["someone"], entry["recipients"]) == (
        1,
        {"opens": 1, "clicks": 0},
        [],
    )
