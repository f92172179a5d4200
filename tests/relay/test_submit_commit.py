"""The accept path's durable queueing: group commit, one spool file per batch, recovery.

Many sessions waiting at once are made durable together (one file with one name per copy,
one commit); each copy reads back exactly; a name without a row (a crash between the fsyncs
and the commit) is queued by ``recover``; a failed batch leaves nothing queued.
"""

from __future__ import annotations

import asyncio
import os
import shutil

import aiosmtplib
import pytest

from relay import outbox
from relay.commit import GroupCommitter
from store import outbox as store_outbox
from store import sent
from tests.relay.conftest import PASSWORD, html_message, parse
from tests.support import wait_for


def copies(n: int) -> list[outbox.Copy]:
    return [
        outbox.Copy(
            "a@x.test",
            [f"r{n}-{i}@y.test"],
            f"Subject: {n}.{i}\r\n\r\n{'x' * (n * 100 + i)}\r\n".encode(),
            meta={"delivery_ids": [n * 10 + i]},
        )
        for i in range(3)
    ]


async def test_waiting_sessions_share_one_file_and_one_commit(settings, db):
    committer = GroupCommitter(settings)
    try:
        batches = [copies(n) for n in range(8)]
        results = await asyncio.gather(*(committer.commit(b) for b in batches))
        assert committer.batches == 1  # all eight were waiting: one durable write
        ids = [i for r in results for i in r]
        assert len(set(ids)) == 24
        paths = {store_outbox.get(db, i)["spool_path"] for i in ids}
        assert len({os.stat(p).st_ino for p in paths}) == 1  # one file ...
        assert os.stat(next(iter(paths))).st_nlink == 24  # ... under one name per copy
        for batch, got in zip(batches, results, strict=True):
            for copy, entry_id in zip(batch, got, strict=True):
                row = store_outbox.get(db, entry_id)
                assert row["rcpts"] == copy.rcpts and row["status"] == "pending"
                head, data = outbox.read_spool(row["spool_path"])
                assert data == copy.data and head["meta"] == copy.meta
                assert oct(os.stat(row["spool_path"]).st_mode & 0o777) == "0o600"
        # A sent entry's name goes; the file stays for the others, and goes with the last.
        last, *others = sorted(paths)
        for p in others:
            outbox.remove_spool(p)
        assert os.path.exists(last) and os.stat(last).st_nlink == 1
        outbox.remove_spool(last)
        assert not any(os.path.exists(p) for p in paths)
        assert not list((outbox.spool_dir(settings) / "tmp").iterdir())
        # Later sessions get batches of their own.
        await committer.commit(copies(9))
        assert committer.batches == 2
    finally:
        committer.close()


async def test_failed_batch_fails_every_waiting_session_and_leaves_nothing(settings, db):
    committer = GroupCommitter(settings)
    root = outbox.spool_dir(settings)
    root.parent.mkdir(parents=True, exist_ok=True)
    root.write_bytes(b"a file where the spool directory should be")
    try:
        results = await asyncio.gather(
            *(committer.commit(copies(n)) for n in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, OSError) for r in results), results
        assert store_outbox.listing(db, ["pending", "retrying", "failed", "sent"]) == []
        root.unlink()
        assert len(await committer.commit(copies(4))) == 3  # served again once it clears
    finally:
        committer.close()


def test_recover_queues_every_name_of_an_uncommitted_batch(settings, db):
    root = outbox.spool_dir(settings)
    batch = copies(1)
    batch[0].email_id = 12345  # its email row never made it to the disk
    paths = outbox.write_batch(root, batch)
    assert outbox.recover(settings, db) == 3
    assert outbox.recover(settings, db) == 0
    rows = sorted(store_outbox.listing(db), key=lambda r: r["spool_path"])
    assert [r["spool_path"] for r in rows] == [str(p) for p in paths]
    assert [r["rcpts"] for r in rows] == [c.rcpts for c in batch]
    assert all(r["email_id"] is None for r in rows)  # delivered anyway, without the link


async def test_concurrent_clients_all_queued_and_delivered_as_rendered(settings, relay, db):
    """16 sessions at once through AUTH, rewrite and group commit: every 250 is one outbox
    entry per recipient copy, each copy with its own tokens, all delivered."""
    port = int(settings.relay.listen.rsplit(":", 1)[1])
    html = '<html><body><p>Hi</p><a href="https://example.com/x">x</a></body></html>'

    async def session(n: int) -> None:
        c = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=60)
        await c.connect()
        await c.login("alice@corp.test", PASSWORD)
        for k in range(2):
            to = f"c{n}-{k}@client.test"
            msg = html_message(html, to=to, cc=f"d{n}-{k}@client.test")
            errors, _ = await c.sendmail("alice@corp.test", [to, f"d{n}-{k}@client.test"], msg)
            assert errors == {}
        await c.quit()

    await asyncio.wait_for(asyncio.gather(*(session(n) for n in range(16))), 180)
    assert relay.handler.committer.batches <= 32
    rows = store_outbox.listing(db, ["pending", "retrying", "failed", "sent"])
    assert len(rows) == 64
    await wait_for(lambda: store_outbox.counts(db).get("sent") == 64, timeout=120)
    out = list((settings.data_dir / "outbox" / "new").iterdir())
    assert len(out) == 64
    pixels = set()
    for p in out:
        body = parse(p.read_bytes()).get_body(("html",)).get_content()
        assert "https://t.example/c/" in body
        pixels.add(body.split("https://t.example/o/", 1)[1].split(".gif", 1)[0])
    assert len(pixels) == 64  # one open token per recipient copy
    delivered = db.execute(
        "SELECT COUNT(*) FROM deliveries WHERE delivered_at IS NOT NULL"
    ).fetchone()[0]
    assert delivered == 64


@pytest.mark.parametrize("rcpts", [1, 3])
async def test_message_queues_one_file_for_all_copies(settings, db, alice, rcpts):
    from relay import submit

    to = [f"r{i}@client.test" for i in range(rcpts)]
    msg = html_message('<a href="https://example.com/">go</a>', to=", ".join(to))
    prepared = submit.prepare(settings, db, alice, "alice@corp.test", to, msg)
    committer = GroupCommitter(settings)
    try:
        outbox_ids = await committer.commit(prepared)
    finally:
        committer.close()
    paths = [store_outbox.get(db, i)["spool_path"] for i in outbox_ids]
    assert len(paths) == rcpts
    assert len({os.stat(p).st_ino for p in paths}) == 1
    ids = [outbox.read_spool(p)[0]["meta"]["delivery_ids"][0] for p in paths]
    assert ids == [d["id"] for d in sent.deliveries_of(db, prepared.result.email_id)]


async def test_message_whose_hand_off_fails_fails_alone_in_its_batch(settings, db, alice):
    """One message of a batch cannot be handed to the ingest (its spool is unusable): that
    message fails with nothing of it kept; the other message of the batch is queued."""
    from ingest import spool as ingest_spool
    from relay import submit

    bcc = settings.ingest.bcc_address
    assert bcc
    root = ingest_spool.spool_dir(settings)
    if root.exists():
        shutil.rmtree(root)
    root.write_bytes(b"not a directory")
    logged = html_message("<p>hi</p>", to="carol@client.test")
    plain = html_message("<p>hello</p>", to="dave@client.test")
    one = submit.prepare(settings, db, alice, "alice@corp.test", ["carol@client.test", bcc], logged)
    two = submit.prepare(settings, db, alice, "alice@corp.test", ["dave@client.test"], plain)
    committer = GroupCommitter(settings)
    try:
        first, second = await asyncio.gather(
            committer.commit(one), committer.commit(two), return_exceptions=True
        )
    finally:
        committer.close()
    assert isinstance(first, OSError) and len(second) == 1
    assert committer.batches == 1
    rows = store_outbox.listing(db)
    assert [r["rcpts"] for r in rows] == [["dave@client.test"]]
    deliveries = db.execute("SELECT recipient FROM deliveries").fetchall()
    assert [d[0] for d in deliveries] == ["dave@client.test"]


def test_discard_twice_leaves_a_later_messages_rows(settings, db, alice):
    """A message dropped once and then again (it failed alone, then its batch failed) must
    not take the rows of a message recorded in between, which reuse its ids."""
    from relay import submit
    from store.sql import transaction

    def recorded(to: str) -> submit.Prepared:
        msg = html_message('<a href="https://example.com/">go</a>', to=to)
        prepared = submit.prepare(settings, db, alice, "alice@corp.test", [to], msg)
        with transaction(db):
            submit.record(db, prepared)
        return prepared

    first = recorded("carol@client.test")
    submit.discard(db, first)
    second = recorded("dave@client.test")
    assert second.delivery_ids == [d["id"] for d in sent.deliveries_of(db, second.result.email_id)]
    submit.discard(db, first)
    deliveries = db.execute("SELECT recipient FROM deliveries").fetchall()
    assert [d[0] for d in deliveries] == ["dave@client.test"]
    assert db.execute("SELECT id FROM emails").fetchall() == [(second.result.email_id,)]
