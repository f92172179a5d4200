"""Every message of ../shared/corpora/eml through the ingest over real SMTP, as sent AND
cut off at a random point (seeded), to the BCC address and (a third of them) to the
forwarding address, over 4 concurrent connections, with a 35 KB SIZE limit.

Each one gets a reply — 250, or 552 exactly when it is over SIZE — and each accepted one
has exactly one inbound-log entry (matched by its own envelope sender), logged or not
logged with its reasons, never an error; every stored attachment is on disk with its size;
nothing is left in the spool or the attachment scratch directory; the server still serves.

(tests/ingest/test_eml_corpus.py sends the corpus once, whole, on one connection, and checks
the decisions in bulk; this one adds truncation, forwards, SIZE refusals, concurrency and
the per-message and on-disk checks.)"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
from collections import Counter

import aiosmtplib
import pytest

import store
from ingest import parse, process, spool
from ingest import service as ingest_service
from store import addresses, users
from tests.hardening.ingest_helpers import CORPORA, USER, make_settings, small_mail
from tests.support import wait_for

LIMIT = 35_000


def wire_size(data: bytes) -> int:
    """Bytes the server counts for SIZE: CRLF lines, dot-stuffed (as aiosmtplib sends)."""
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return len(data) + len(re.findall(rb"(?:^|\r\n)\.", data))


@pytest.fixture
def settings(tmp_path):
    s = make_settings(tmp_path / "data")
    s.ingest.max_message_size = LIMIT
    return s


async def test_corpus_whole_and_truncated_over_smtp(settings, tmp_path):
    files = sorted(
        p for p in (CORPORA / "eml").rglob("*") if p.is_file() and p.suffix in (".eml", ".msg")
    )
    assert len(files) >= 150
    db = store.connect(settings.db_path)
    # Corpus senders become users, so most messages go all the way through the rules.
    for f in files:
        mail = parse.parse_file(f, 0, tmp_path, content_cap=1000, attachment_limit=0)
        mail.cleanup()
        for _, addr in addresses.parse_list(mail.header("From")):
            if addresses.is_valid(addr) and not users.find_user(db, addr):
                users.add_user(db, addr, "", None)
    rng = random.Random(11)
    cases = []  # (envelope sender, recipient, bytes)
    for k, f in enumerate(files):
        data = f.read_bytes()
        cases.append((f"whole{k}@corpus.test", settings.ingest.bcc_address, data))
        cases.append(
            (f"cut{k}@corpus.test", settings.ingest.bcc_address, data[: rng.randrange(len(data))])
        )
        if k % 3 == 0:
            cases.append((f"fwd{k}@corpus.test", settings.ingest.forward_address, data))
    replies: dict[str, int] = {}
    svc = await ingest_service.start(settings)
    try:
        queue = list(cases)

        async def client() -> None:
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=svc.port, timeout=60)
            await smtp.connect()
            while queue:
                sender, rcpt, data = queue.pop()
                try:
                    await smtp.sendmail(sender, [rcpt], data)
                    replies[sender] = 250
                except aiosmtplib.SMTPResponseException as exc:
                    replies[sender] = exc.code
                    await smtp.rset()
            await smtp.quit()

        await asyncio.gather(*(client() for _ in range(4)))
        assert len(replies) == len(cases)
        for sender, _, data in cases:
            want = 552 if wire_size(data) > LIMIT else 250
            assert replies[sender] == want, (sender, replies[sender], wire_size(data))
        accepted = {s for s, code in replies.items() if code == 250}
        assert len(accepted) < len(cases)  # some really were over SIZE

        def entries() -> list[dict]:
            return [
                dict(zip(("mail_from", "decision", "reasons", "email_id"), r, strict=True))
                for r in db.execute(
                    "SELECT mail_from, decision, reasons, email_id FROM inbound_log"
                )
            ]

        await wait_for(
            lambda: (
                len(entries()) >= len(accepted) and not spool.pending(spool.spool_dir(settings))
            ),
            timeout=120,
            interval=0.1,
        )
        found = entries()
        per_sender = Counter(e["mail_from"] for e in found)
        assert set(per_sender) == accepted and max(per_sender.values()) == 1
        decisions = Counter(e["decision"] for e in found)
        assert set(decisions) <= {"logged", "not_logged"}, decisions
        for e in found:
            assert json.loads(e["reasons"]), e
            assert (e["email_id"] is not None) == (e["decision"] == "logged"), e
        assert decisions["logged"] > len(accepted) // 3, decisions
        forwards = [e for e in found if e["mail_from"].startswith("fwd")]
        assert forwards and all(json.loads(e["reasons"]) for e in forwards)
        # Every stored attachment is really there, content-addressed, with its size.
        root = process.attachments_dir(settings)
        atts = db.execute("SELECT size, sha256 FROM attachments").fetchall()
        assert atts
        for size, sha in atts:
            path = root / sha[:2] / sha
            assert path.stat().st_size == size, sha
            assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
        assert list((root / "tmp").iterdir()) == []
        assert list((spool.spool_dir(settings) / "tmp").iterdir()) == []
        # Still alive and well after all of it.
        code = await aiosmtplib.send(
            small_mail("after-corpus"),
            sender=USER,
            recipients=[settings.ingest.bcc_address],
            hostname="127.0.0.1",
            port=svc.port,
            timeout=30,
        )
        assert code[1].startswith("2.0.0")
        await wait_for(
            lambda: (
                db.execute(
                    "SELECT decision FROM inbound_log WHERE message_id = '<after-corpus@hardening.test>'"
                ).fetchone()
                == ("logged",)
            ),
            timeout=30,
        )
        print(f"\n{len(cases)} corpus messages: {len(accepted)} accepted, {dict(decisions)}")
    finally:
        await svc.stop()
        db.close()
