"""Every raw message of ../shared/corpora/eml through the relay over SMTP to a real SMTP
upstream (aiosmtpd), from several clients at once.

The codes follow the spec (relay 1, "Bad input, faults"): sent as they are, the corpus
messages carry From headers that are not the user's, often malformed, and each must get
553 5.7.1 (never a 4xx/500 or a dropped connection); with the From header replaced by the
user's address, every one must get 250 and reach the upstream once, parseable, whatever its
MIME, charset or line length. Afterwards the relay still serves a normal message.
(tests/relay/test_corpus.py checks the bytes of the same messages through the maildir sink.)
"""

from __future__ import annotations

import asyncio
import email
import re
from email import policy
from pathlib import Path

import aiosmtplib
import pytest

from relay import service as relay_service
from store import outbox as store_outbox
from tests.hardening.relay_helpers import db_with_alice, relay_settings
from tests.relay.conftest import PASSWORD, Upstream
from tests.support import wait_for

CORPORA = Path(__file__).resolve().parents[3] / "shared" / "corpora"
MESSAGES = sorted(p for p in (CORPORA / "eml").rglob("*") if p.suffix in (".eml", ".msg"))
CLIENTS = 4
TAG = re.compile(rb"^X-Corpus-Index: (\d+)\r?$", re.M)


def with_user_from(data: bytes, index: int) -> bytes:
    """Top-level From replaced by the user's address, plus a header naming the file."""
    cut = min(x for x in (data.find(b"\n\n"), data.find(b"\r\n\r\n"), len(data)) if x != -1)
    kept, skipping = [], False
    for line in re.split(rb"(?<=\n)", data[:cut]):
        if line[:1] in (b" ", b"\t") and skipping:
            continue
        skipping = line.lower().startswith(b"from:")
        if not skipping:
            kept.append(line)
    head = f"From: alice@corp.test\r\nX-Corpus-Index: {index}\r\n".encode()
    return head + b"".join(kept) + data[cut:]


@pytest.fixture
async def relay(tmp_path):
    up = Upstream()
    await up.start()
    s = relay_settings(tmp_path, up.port)
    db = db_with_alice(s)
    svc = await relay_service.start(s)
    yield s, up, db
    await svc.stop()
    await up.stop()
    db.close()


async def submit_all(settings, items: list[tuple[int, bytes]]) -> dict[int, int]:
    """Send (index, message) pairs from CLIENTS connections; return index → reply code."""
    host, port = settings.relay.listen.split(":")
    codes: dict[int, int] = {}
    todo = list(items)

    async def one_client():
        c = aiosmtplib.SMTP(hostname=host, port=int(port), start_tls=False, timeout=60)
        await c.connect()
        await c.login("alice@corp.test", PASSWORD)
        while todo:
            i, data = todo.pop(0)
            try:
                await c.sendmail("alice@corp.test", [f"carol{i}@client.test"], data)
                codes[i] = 250
            except aiosmtplib.SMTPResponseException as exc:
                codes[i] = exc.code
        await c.quit()

    await asyncio.gather(*(one_client() for _ in range(CLIENTS)))
    return codes


def test_corpus_present():
    assert len(MESSAGES) >= 160


async def test_corpus_as_is_gets_553_for_a_foreign_from(relay):
    s, up, db = relay
    codes = await submit_all(s, [(i, p.read_bytes()) for i, p in enumerate(MESSAGES)])
    assert codes == {i: 553 for i in range(len(MESSAGES))}
    assert not up.messages and store_outbox.listing(db) == []


async def test_every_corpus_message_from_the_user_is_accepted_and_delivered(relay):
    s, up, db = relay
    items = [(i, with_user_from(p.read_bytes(), i)) for i, p in enumerate(MESSAGES)]
    codes = await submit_all(s, items)
    refused = {MESSAGES[i].name: c for i, c in codes.items() if c != 250}
    assert not refused, refused
    await wait_for(lambda: len(up.messages) >= len(items), timeout=90, interval=0.1)
    await wait_for(lambda: store_outbox.counts(db).get("sent") == len(items), timeout=30)
    seen: dict[int, int] = {}
    for mail_from, rcpts, data in up.messages:
        index = int(TAG.search(data).group(1))
        seen[index] = seen.get(index, 0) + 1
        assert mail_from == "alice@corp.test" and rcpts == [f"carol{index}@client.test"]
        msg = email.message_from_bytes(data, policy=policy.default)
        for part in msg.walk():  # parseable, every part's payload readable
            part.get_payload(decode=True)
        assert msg["From"] == "alice@corp.test", MESSAGES[index]
    assert seen == {i: 1 for i in range(len(items))}  # each once, none lost
    assert store_outbox.listing(db, ["pending", "retrying", "failed"]) == []
    # The relay still serves an ordinary message after all of that.
    ok = b"From: alice@corp.test\r\nSubject: after\r\nX-Corpus-Index: 99999\r\n\r\nstill here\r\n"
    assert await submit_all(s, [(99999, ok)]) == {99999: 250}
    await wait_for(lambda: len(up.messages) == len(items) + 1, timeout=30)
