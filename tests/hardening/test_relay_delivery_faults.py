"""Upstream faults against the real relay: the upstream unreachable for a while, then a real
aiosmtpd sink started on that port; an upstream answering 4xx before it accepts. Accepted
mail waits in the outbox and then arrives exactly once, each recipient's mail in the order
the relay accepted it (SPEC relay 2: 4xx and network errors retry; nothing accepted is lost)."""

from __future__ import annotations

import asyncio
import re

import aiosmtplib
import pytest

import cli
from relay import service as relay_service
from store import outbox as store_outbox
from tests.hardening.relay_helpers import db_with_alice, relay_settings
from tests.relay.conftest import PASSWORD, Upstream
from tests.support import wait_for

RCPTS = ["carol@client.test", "dave@client.test", "erin@other.test"]
SEQ = re.compile(rb"^Subject: seq (\d+)\r?$", re.M)


@pytest.fixture
async def relay_setup(tmp_path):
    """Settings (short retry schedule), a user and an upstream that is NOT started yet."""
    up = Upstream()
    s = relay_settings(tmp_path, up.port)
    db = db_with_alice(s)
    yield s, up, db
    if up.server is not None:
        await up.stop()
    db.close()


def message(seq: int, rcpts: list[str]) -> bytes:
    return (
        f"From: Alice <alice@corp.test>\r\nTo: {', '.join(rcpts)}\r\nSubject: seq {seq}\r\n"
        f"Message-ID: <seq-{seq}@corp.test>\r\n\r\nmessage number {seq}\r\n"
    ).encode()


async def submit_in_order(s, first: int, count: int) -> dict[str, list[int]]:
    """Submit messages one after another (acceptance order = seq); 1 or 2 recipients each.
    Returns, per recipient, the seqs accepted for it in order."""
    host, port = s.relay.listen.split(":")
    sent: dict[str, list[int]] = {r: [] for r in RCPTS}
    client = aiosmtplib.SMTP(hostname=host, port=int(port), start_tls=False, timeout=30)
    await client.connect()
    await client.login("alice@corp.test", PASSWORD)
    for seq in range(first, first + count):
        rcpts = [RCPTS[seq % 3]] + ([RCPTS[(seq + 1) % 3]] if seq % 4 == 0 else [])
        errors, _ = await client.sendmail("alice@corp.test", rcpts, message(seq, rcpts))
        assert not errors, errors
        for r in rcpts:
            sent[r].append(seq)
    await client.quit()
    return sent


def received(up: Upstream) -> dict[str, list[int]]:
    """Per recipient, the seqs the upstream accepted, in the order it accepted them."""
    got: dict[str, list[int]] = {r: [] for r in RCPTS}
    for _, rcpts, data in up.messages:
        assert len(rcpts) == 1, rcpts  # one copy per recipient
        got[rcpts[0]].append(int(SEQ.search(data).group(1)))
    return got


async def wait_delivered(up: Upstream, db, sent: dict[str, list[int]]) -> None:
    """Until the upstream has every copy of ``sent`` and the outbox marks them all sent."""
    total = sum(map(len, sent.values()))
    await wait_for(lambda: len(up.messages) >= total, timeout=60)
    await wait_for(lambda: store_outbox.counts(db).get("sent", 0) == total, timeout=30)


def merge(a: dict[str, list[int]], b: dict[str, list[int]]) -> dict[str, list[int]]:
    return {r: a.get(r, []) + b.get(r, []) for r in RCPTS}


async def test_upstream_down_then_up_delivers_everything_once_in_order(relay_setup):
    s, up, db = relay_setup
    svc = await relay_service.start(s)
    try:
        sent = await submit_in_order(s, 0, 20)
        # The upstream refuses connections: the first entries are retried, none delivered.
        await wait_for(lambda: store_outbox.counts(db).get("retrying", 0) >= 3, timeout=30)
        assert store_outbox.counts(db).get("sent", 0) == 0
        sent = merge(sent, await submit_in_order(s, 20, 20))  # more mail while it is down
        retried = store_outbox.listing(db, ["retrying"])
        assert retried and all("Connect" in r["last_error"] for r in retried), retried
        await up.start()
        await wait_delivered(up, db, sent)
    finally:
        await svc.stop()
    got = received(up)
    assert got == sent  # everything, once, and per recipient in acceptance order
    assert not store_outbox.listing(db, ["pending", "retrying", "failed"])


async def test_upstream_4xx_then_accepting_keeps_order_and_delivers_once(relay_setup):
    s, up, db = relay_setup
    await up.start()
    # DATA is deferred three times (whichever messages come first), carol's mailbox is
    # "busy" (450 at RCPT) until the test lifts it.
    up.data_replies = ["451 4.3.0 try again later"] * 3
    up.rcpt_replies = {"carol@client.test": "450 4.2.1 mailbox busy"}
    svc = await relay_service.start(s)
    try:
        sent = await submit_in_order(s, 0, 24)
        others = sum(len(v) for r, v in sent.items() if r != "carol@client.test")
        await wait_for(
            lambda: sum(1 for _, rc, _ in up.messages if rc != ["carol@client.test"]) >= others,
            timeout=60,
        )
        assert not any(rc == ["carol@client.test"] for _, rc, _ in up.messages)
        (head,) = [
            r for r in store_outbox.listing(db, ["retrying"]) if r["rcpts"] == ["carol@client.test"]
        ]  # only carol's first message was tried: the later ones wait behind it
        assert "450" in head["last_error"]
        up.rcpt_replies = {}
        await wait_delivered(up, db, sent)
    finally:
        await svc.stop()
    assert received(up) == sent
    rows = store_outbox.listing(db, ["sent"])
    assert max(r["attempts"] for r in rows) >= 2  # the deferred ones were tried again


async def test_queue_retry_sends_a_waiting_message_to_the_running_relay(relay_setup):
    """`mailtally queue retry` only changes the database; the running worker must notice."""
    from click.testing import CliRunner

    s, up, db = relay_setup
    s.relay.retry_schedule = [3600]  # without `queue retry` nothing would happen for an hour
    svc = await relay_service.start(s)
    try:
        sent = await submit_in_order(s, 0, 6)
        await wait_for(lambda: store_outbox.counts(db).get("retrying", 0) == 3, timeout=30)
        await up.start()
        result = await asyncio.to_thread(
            CliRunner().invoke, cli.main, ["--config", str(s.config_path), "queue", "retry"]
        )
        assert result.exit_code == 0, result.output
        await wait_delivered(up, db, sent)
    finally:
        await svc.stop()
    assert received(up) == sent
