"""The tracker over real HTTP: pixel, redirect, tampering, rotation, erasure, lock,
X-Forwarded-For, privacy mode, inferred opens, bursts and the honeypot."""

from __future__ import annotations

import base64
import os
import random
import subprocess
import sys
import time

import aiohttp
import pytest

import store
from store import contacts as store_contacts
from store import events as store_events
from store import tracking
from tests.support import wait_for
from tracker import service, tokens

CHROME = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36"
NO_CACHE = "no-cache, no-store, must-revalidate, max-age=0"
TRICKY = [
    "https://pricing.example.com/plans?a=1&b=2#top",
    "https://example.com/p%20q/%7Euser?q=%E2%82%AC&x=a+b&empty=#frag/with?odd",
    "http://example.com/?utm_source=x&amp=literal&redirect=https%3A%2F%2Fother.example%2F",
    "https://EXAMPLE.com:8443/Case/Path;params?Q=V",
]


def events_of(db, email_id):
    return store_events.events_of_email(db, email_id)


async def get(session, url, method="GET", **headers):
    headers.setdefault("User-Agent", CHROME)
    async with session.request(method, url, headers=headers, allow_redirects=False) as r:
        return r.status, r.headers, await r.read()


async def test_pixel_is_always_the_gif(tracker, sent, db):
    _, base, signer = tracker
    made = sent()
    good = tokens.open_url(base, signer, made["deliveries"][0])
    async with aiohttp.ClientSession() as s:
        for url in [
            good,
            f"{base}/o/garbage.gif",
            f"{base}/o/",
            f"{base}/o/%00<x>.gif",
            f"{base}/o/a/b.gif",
        ]:
            for method in ("GET", "HEAD"):
                status, headers, body = await get(s, url, method)
                assert status == 200, url
                assert headers["Cache-Control"] == NO_CACHE
                assert headers["Content-Type"] == "image/gif"
                if method == "GET":
                    assert len(body) == 43 and body.startswith(b"GIF89a")
    got = await wait_for(
        lambda: len(events_of(db, made["email_id"])) == 2 and events_of(db, made["email_id"])
    )
    assert [(e["kind"], e["method"], e["verdict"], e["reason"]) for e in got] == [
        ("open", "GET", "human", "human"),
        ("open", "HEAD", "machine", "head_request"),
    ]
    contact = store_contacts.find_contact(db, "bob@acme.example")
    assert contact["last_open_at"] == got[0]["at"] == contact["last_engagement_at"]


async def test_click_redirects_to_the_exact_url_and_infers_an_open(tracker, sent, db):
    _, base, signer = tracker
    made = sent(links=TRICKY)
    d = made["deliveries"][0]
    async with aiohttp.ClientSession() as s:
        for position in (0, 2):
            status, headers, _ = await get(
                s, tokens.click_url(base, signer, d, position, TRICKY[position])
            )
            assert status == 302
            assert headers["Location"] == TRICKY[position]
        for position in (1, 3):  # HEAD is answered too (and is a machine)
            status, headers, _ = await get(
                s, tokens.click_url(base, signer, d, position, TRICKY[position]), "HEAD"
            )
            assert status == 302 and headers["Location"] == TRICKY[position]
    got = await wait_for(
        lambda: len(events_of(db, made["email_id"])) == 5 and events_of(db, made["email_id"])
    )
    human_clicks = [e for e in got if e["kind"] == "click" and e["verdict"] == "human"]
    assert [e["link_id"] for e in human_clicks] == [made["links"][0], made["links"][2]]
    inferred = [e for e in got if e["inferred"]]
    assert len(inferred) == 1  # one inferred open for the copy, not one per click
    assert inferred[0]["kind"] == "open" and inferred[0]["at"] == human_clicks[0]["at"]
    assert inferred[0]["verdict"] == "human"
    contact = store_contacts.find_contact(db, "bob@acme.example")
    assert contact["last_click_at"] == human_clicks[1]["at"]


def _tampered(token: str, rng: random.Random) -> list[str]:
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    out = []
    for _ in range(12):
        i = rng.randrange(len(raw))
        flipped = bytearray(raw)
        flipped[i] ^= 1 << rng.randrange(8)
        out.append(base64.urlsafe_b64encode(bytes(flipped)).rstrip(b"=").decode())
    out += [token[:n] for n in (0, 1, 5, len(token) // 2, len(token) - 1)]
    out += [token + "A", token + "AAAA"]
    return out


async def test_tampered_tokens_get_404_and_nothing_reflected(tracker, sent, db):
    _, base, signer = tracker
    made = sent(recipients=("bob@acme.example", "carol@acme.example"), links=TRICKY)
    d1, d2 = made["deliveries"]
    rng = random.Random(4)
    token = signer.click_token(d1, 0, TRICKY[0])
    other = signer.click_token(d2, 1, TRICKY[1])
    # Another copy's link index: copy 1's payload with copy 2's position, and copy 2's tag.
    payload1 = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))[: -tokens.TAG_BYTES]
    tag2 = base64.urlsafe_b64decode(other + "=" * (-len(other) % 4))[-tokens.TAG_BYTES :]
    swapped_position = payload1[:2] + bytes([1]) + payload1[3:]
    spliced = [
        base64.urlsafe_b64encode(swapped_position + tag2).rstrip(b"=").decode(),
        base64.urlsafe_b64encode(
            swapped_position
            + base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))[-tokens.TAG_BYTES :]
        )
        .rstrip(b"=")
        .decode(),
    ]
    randoms = [
        base64.urlsafe_b64encode(os.urandom(n)).rstrip(b"=").decode() for n in (1, 8, 16, 40, 200)
    ]
    bad = (
        _tampered(token, rng)
        + spliced
        + randoms
        + [
            signer.open_token(d1),  # an open token is no link
            "<script>alert(1)</script>",
            "%3Cscript%3Ealert(1)%3C%2Fscript%3E",
            "..%2F..%2Fetc%2Fpasswd",
        ]
    )
    async with aiohttp.ClientSession() as s:
        for t in bad:
            if not t:
                continue
            status, headers, body = await get(s, f"{base}/c/{t}")
            assert status == 404, t
            assert "Location" not in headers
            assert b"<script" not in body and t.encode() not in body
            assert b"Link not found" in body
    # A forged token with a fresh key is refused too.
    forged = tokens.Signer(["x" * 32]).click_token(d1, 0, "https://evil.example/")
    async with aiohttp.ClientSession() as s:
        status, headers, _ = await get(s, f"{base}/c/{forged}")
        assert status == 404 and "Location" not in headers
        # A valid open queued after them: once it is written (one writer, first in first
        # out), anything the refused tokens had queued would be written too.
        assert (await get(s, tokens.open_url(base, signer, d2)))[0] == 200
    got = await wait_for(lambda: events_of(db, made["email_id"]))
    assert [(e["kind"], e["delivery_id"], e["inferred"]) for e in got] == [("open", d2, 0)]


async def test_rotation_old_secret_verifies_removed_secret_does_not(settings, sent, db):
    made = sent()
    old_signer = tokens.Signer(settings.tracker.secrets)
    old_link = tokens.click_url(
        settings.tracker.base_url,
        old_signer,
        made["deliveries"][0],
        0,
        "https://pricing.example.com/plans?a=1&b=2#top",
    )
    settings.tracker.secrets = ["new-secret-" + "n" * 24, *settings.tracker.secrets]
    svc = await service.start(settings)
    try:
        new_signer = tokens.Signer(settings.tracker.secrets)
        new_link = tokens.click_url(
            settings.tracker.base_url, new_signer, made["deliveries"][0], 0, "https://x.example/"
        )
        assert new_link != old_link and tokens.Signer(settings.tracker.secrets[:1]).verify(
            new_link.rsplit("/", 1)[1]
        )
        async with aiohttp.ClientSession() as s:
            assert (await get(s, old_link))[0] == 302
            assert (await get(s, new_link))[0] == 302
    finally:
        await svc.stop()
    settings.tracker.secrets = settings.tracker.secrets[:1]  # the old secret retired
    svc = await service.start(settings)
    try:
        async with aiohttp.ClientSession() as s:
            assert (await get(s, old_link))[0] == 404
            assert (await get(s, new_link))[0] == 302
    finally:
        await svc.stop()


async def test_click_after_the_email_was_erased(tracker, sent, db):
    _, base, signer = tracker
    made = sent()
    link = tokens.click_url(
        base, signer, made["deliveries"][0], 0, "https://pricing.example.com/plans?a=1&b=2#top"
    )
    store_contacts.forget(db, "bob@acme.example")
    assert tracking.copy_context(db, made["deliveries"][0]) is None
    before = store_events.count_events(db)
    async with aiohttp.ClientSession() as s:
        status, headers, _ = await get(s, link)
    assert status == 302 and headers["Location"] == "https://pricing.example.com/plans?a=1&b=2#top"
    await wait_for(lambda: store_events.count_events(db) == before + 1)
    orphan = store.sql.row(db, "SELECT * FROM events ORDER BY id DESC LIMIT 1")
    assert orphan["email_id"] is None and orphan["delivery_id"] is None
    assert orphan["anonymous"] == 1 and orphan["ip"] is None and orphan["user_agent"] is None


LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""


async def test_click_redirects_while_another_process_holds_an_exclusive_lock(
    tracker, sent, db, settings
):
    _, base, signer = tracker
    made = sent()
    link = tokens.click_url(
        base, signer, made["deliveries"][0], 0, "https://pricing.example.com/plans?a=1&b=2#top"
    )
    locker = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(settings.db_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert locker.stdout.readline().strip() == "locked"
        async with aiohttp.ClientSession() as s:
            started = time.monotonic()
            status, headers, _ = await get(s, link)
            elapsed = time.monotonic() - started
            pixel = await get(s, tokens.open_url(base, signer, made["deliveries"][0]))
        assert (
            status == 302 and headers["Location"] == "https://pricing.example.com/plans?a=1&b=2#top"
        )
        assert pixel[0] == 200 and len(pixel[2]) == 43
        # The response waits at most write_wait_seconds for the commit, not for the lock.
        assert elapsed < settings.tracker.write_wait_seconds + 1.0
    finally:
        locker.stdin.write("\n")
        locker.stdin.flush()
        locker.wait(timeout=10)

    # Once the lock is gone, the hits that waited are written.
    def recorded() -> list[dict]:
        return [e for e in events_of(db, made["email_id"]) if not e["inferred"]]

    # The click's inferred open can be written before the pixel's batch: wait for both hits.
    got = await wait_for(lambda: len(recorded()) >= 2 and recorded(), timeout=20)
    assert sorted(e["kind"] for e in got) == ["click", "open"]


@pytest.mark.parametrize("trusted", [True, False])
async def test_x_forwarded_for_only_from_trusted_proxies(settings, sent, db, trusted):
    settings.tracker.trusted_proxies = ["127.0.0.0/8"] if trusted else ["10.0.0.0/8"]
    made = sent()
    svc = await service.start(settings)
    try:
        signer = tokens.Signer(settings.tracker.secrets)
        url = tokens.open_url(settings.tracker.base_url, signer, made["deliveries"][0])
        async with aiohttp.ClientSession() as s:
            # Client 203.0.113.5 → an untrusted hop that lies → our proxy (127.0.0.1).
            await get(s, url, **{"X-Forwarded-For": "6.6.6.6, 203.0.113.5"})
        got = await wait_for(lambda: events_of(db, made["email_id"]))
    finally:
        await svc.stop()
    assert got[0]["ip"] == ("203.0.113.5" if trusted else "127.0.0.1")


async def test_x_forwarded_for_chain_of_trusted_proxies(settings, sent, db):
    settings.tracker.trusted_proxies = ["127.0.0.0/8", "10.0.0.0/8"]
    made = sent()
    svc = await service.start(settings)
    try:
        url = tokens.open_url(
            settings.tracker.base_url,
            tokens.Signer(settings.tracker.secrets),
            made["deliveries"][0],
        )
        async with aiohttp.ClientSession() as s:
            await get(s, url, **{"X-Forwarded-For": "198.51.100.9, 10.1.2.3"})
        got = await wait_for(lambda: events_of(db, made["email_id"]))
    finally:
        await svc.stop()
    assert got[0]["ip"] == "198.51.100.9"


async def test_privacy_mode_someone_and_shared_copies(settings, sent, db):
    settings.privacy.enabled = True
    no_basis = sent(recipients=("nobasis@acme.example",), subject="A")
    with_basis = sent(recipients=("yes@acme.example",), basis="yes", subject="B")
    shared = sent(
        recipients=("s1@acme.example", "s2@acme.example"), shared=True, basis="yes", subject="C"
    )
    svc = await service.start(settings)
    try:
        signer = tokens.Signer(settings.tracker.secrets)
        async with aiohttp.ClientSession() as s:
            for made in (no_basis, with_basis, shared):
                await get(
                    s,
                    tokens.click_url(
                        settings.tracker.base_url,
                        signer,
                        made["deliveries"][0],
                        0,
                        "https://pricing.example.com/plans?a=1&b=2#top",
                    ),
                )
        await wait_for(
            lambda: all(
                len(events_of(db, m["email_id"])) == 2 for m in (no_basis, with_basis, shared)
            )
        )
    finally:
        await svc.stop()
    for made in (no_basis, shared):
        for e in events_of(db, made["email_id"]):
            assert e["anonymous"] == 1 and e["contact_id"] is None
            assert e["ip"] is None and e["user_agent"] is None
            assert e["verdict"] == "human"
    for addr in ("nobasis@acme.example", "s1@acme.example", "s2@acme.example"):
        c = store_contacts.find_contact(db, addr)
        assert c["last_click_at"] is None and c["last_engagement_at"] is None
    named = events_of(db, with_basis["email_id"])
    assert all(e["anonymous"] == 0 and e["ip"] == "127.0.0.1" for e in named)
    assert store_contacts.find_contact(db, "yes@acme.example")["last_click_at"] == named[0]["at"]


async def test_link_burst_relabels_earlier_clicks_and_their_inferred_open(tracker, sent, db):
    _, base, signer = tracker
    made = sent(links=TRICKY[:3])
    d = made["deliveries"][0]
    async with aiohttp.ClientSession() as s:
        for position in range(3):
            await get(s, tokens.click_url(base, signer, d, position, TRICKY[position]))
    got = await wait_for(
        lambda: len(events_of(db, made["email_id"])) == 4 and events_of(db, made["email_id"])
    )
    assert {(e["verdict"], e["reason"]) for e in got} == {("machine", "link_burst")}
    c = store_contacts.find_contact(db, "bob@acme.example")
    assert c["last_click_at"] is None and c["last_open_at"] is None


async def test_honeypot_is_not_a_redirect_and_marks_the_client(tracker, sent, db):
    _, base, signer = tracker
    made = sent()
    d = made["deliveries"][0]
    async with aiohttp.ClientSession() as s:
        status, headers, _ = await get(s, tokens.honeypot_url(base, signer, d))
        assert status == 200 and "Location" not in headers
        await get(
            s, tokens.click_url(base, signer, d, 0, "https://pricing.example.com/plans?a=1&b=2#top")
        )
    got = await wait_for(
        lambda: len(events_of(db, made["email_id"])) == 2 and events_of(db, made["email_id"])
    )
    assert [(e["kind"], e["verdict"], e["reason"]) for e in got] == [
        ("click", "machine", "honeypot"),
        ("click", "machine", "honeypot_client"),
    ]


async def test_healthz(tracker):
    _, base, _ = tracker
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/healthz") as r:
            assert r.status == 200 and (await r.json())["status"] == "ok"


async def test_routes_methods_and_no_traceback(tracker, sent, monkeypatch):
    """What each path and method gets from the tracker's own routing: the endpoints, 404's
    plain page for anything else (a token never spans a slash), 405 with Allow for other
    methods; and when recording fails, a pixel is still the GIF and a link the plain page."""
    svc, base, signer = tracker
    made = sent()
    d = made["deliveries"][0]
    link = tokens.click_url(base, signer, d, 0, "https://example.com/a")
    async with aiohttp.ClientSession() as s:
        for path in ("/c/a/b", "/c/", "/", "/o", "/elsewhere", "/healthz/", "/feed/x"):
            status, headers, body = await get(s, base + path)
            assert status == 404 and b"Link not found" in body, path
        for method, url, allow in [
            ("POST", f"{base}/o/x.gif", "GET,HEAD"),
            ("PUT", link, "GET,HEAD"),
            ("DELETE", f"{base}/healthz", "GET,HEAD"),
            ("HEAD", f"{base}/feed", "GET"),
        ]:
            status, headers, _ = await get(s, url, method)
            assert (status, headers["Allow"]) == (405, allow), (method, url)
        assert (await get(s, f"{base}/healthz", "HEAD"))[0] == 200
        assert (await get(s, f"{base}/feed"))[0] == 401  # routed: asks for its token

        def broken(hit):
            raise RuntimeError("recording failed")

        monkeypatch.setattr(svc.writer, "enqueue", broken)
        status, headers, body = await get(s, tokens.open_url(base, signer, d))
        assert status == 200 and body.startswith(b"GIF89a")
        assert headers["Cache-Control"] == NO_CACHE
        status, headers, body = await get(s, link)
        assert status == 404 and "Location" not in headers and b"Link not found" in body
