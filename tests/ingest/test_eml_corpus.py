"""Bad input: every message of ../shared/corpora/eml (RFC examples, legacy charsets,
malformed MIME, bad boundaries, uuencode…) sent to the BCC address is logged or explained,
and the listener and worker survive all of them."""

from __future__ import annotations

import aiosmtplib

from ingest import parse
from store import addresses, users
from store import inbound as store_inbound
from tests.ingest.conftest import CORPORA, deliver, message, wait_for


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
