"""Bad input: every message of ../shared/corpora/eml (RFC examples, legacy charsets,
malformed MIME, bad boundaries, uuencode…) sent to the BCC address is logged or explained,
and the listener and worker survive all of them."""

from __future__ import annotations

import aiosmtplib

from ingest import parse
from store import addresses, users
from store import inbound as store_inbound
from tests.ingest.conftest import CORPORA, deliver, message
from tests.support import wait_for


async def test_every_corpus_message_logged_or_explained(ingest, db, settings, tmp_path):
    files = sorted(
        p for p in (CORPORA / "eml").rglob("*") if p.is_file() and p.suffix in (".eml", ".msg")
    )
    assert len(files) >= 150
    # Make the corpus senders users, so that most messages go all the way through the rules.
    for f in files:
        mail = parse.parse_file(f, 0, tmp_path, content_cap=1000, attachment_limit=0)
        mail.cleanup()
        for _, addr in addresses.parse_list(mail.header("From")):
            if not users.find_user(db, addr):
                users.add_user(db, addr, "", None)
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=ingest.port, timeout=60)
    await smtp.connect()
    try:
        for f in files:
            await smtp.sendmail(
                "corpus@test.invalid", [settings.ingest.bcc_address], f.read_bytes()
            )
    finally:
        await smtp.quit()
    await wait_for(
        lambda: db.execute("SELECT COUNT(*) FROM inbound_log").fetchone()[0] == len(files),
        timeout=120,
    )
    entries = store_inbound.recent_inbound(db, 10_000)
    decisions = {}
    for e in entries:
        decisions[e["decision"]] = decisions.get(e["decision"], 0) + 1
        assert e["decision"] in ("logged", "not_logged"), e
        assert e["reasons"], e
    print(f"\neml corpus: {len(files)} messages: {decisions}")
    why = sorted({e["reasons"][0] for e in entries if e["decision"] == "not_logged"})
    print("  not logged because:", why)
    assert decisions.get("logged", 0) > len(files) // 3
    # Still alive and well.
    msg = message(sender=next(iter(users.list_users(db)))["email"])
    assert (await deliver(ingest, db, msg))["decision"] in ("logged", "not_logged")


def _nested(depth: int) -> bytes:
    head = b""
    tail = b""
    for i in range(depth):
        head += f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'.encode()
        tail = f"\r\n--b{i}--\r\n".encode() + tail
    return head + b"Content-Type: text/plain\r\n\r\ndeep inside" + tail


async def test_hostile_messages_logged_or_explained(ingest, db, alice, settings):
    base = (
        "From: alice@acme.io\r\nTo: bob@customer.com\r\nSubject: {s}\r\nMessage-ID: <{s}@t>\r\n"
        "MIME-Version: 1.0\r\n"
    )
    cases = {
        "long-line": (base + "Content-Type: text/plain\r\n\r\n").encode()
        + b"x" * 1_000_000
        + b"\r\n",
        "nul-bytes": (base + "Content-Type: text/plain\r\n\r\n").encode() + b"a\x00b\x00c\r\n",
        "unknown-charset": (base + "Content-Type: text/plain; charset=x-klingon\r\n\r\n").encode()
        + b"\xff\xfe caf\xe9\r\n",
        "broken-html": (base + "Content-Type: text/html\r\n\r\n").encode()
        + b"<html><body><table><tr><td><a href='x>unclosed <b><i></div></p>\r\n",
        "deep-nesting": base.format(s="deep-nesting").encode() + _nested(200),
        "bad-base64": (
            base + "Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        ).encode()
        + b"SGVsbG8*gd29y!bGQ=\r\n=====\r\n",
        "no-body": base.encode().rstrip(b"\r\n"),
    }
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=ingest.port, timeout=60)
    await smtp.connect()
    try:
        for name, raw in cases.items():
            raw = raw.replace(b"{s}", name.encode())
            await smtp.sendmail("alice@acme.io", [settings.ingest.bcc_address], raw)
    finally:
        await smtp.quit()
    for name in cases:
        (entry,) = await wait_for(
            lambda n=name: store_inbound.inbound_by_message_id(db, f"<{n}@t>")
        )
        assert entry["decision"] == "logged", (name, entry["reasons"])
    email = store_inbound.email_row(
        db, store_inbound.inbound_by_message_id(db, "<deep-nesting@t>")[0]["email_id"]
    )
    assert email is not None
    nul = store_inbound.email_row(
        db, store_inbound.inbound_by_message_id(db, "<nul-bytes@t>")[0]["email_id"]
    )
    assert nul["text_body"].strip() == "abc"
