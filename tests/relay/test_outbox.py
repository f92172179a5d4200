"""The durable queue: spool file + row, recovery of orphaned files, RFC 3464 reports."""

from __future__ import annotations

import email
import os
from email import policy

import pytest

from relay import dsn, outbox
from store import outbox as store_outbox


def test_enqueue_writes_spool_file_then_row(settings, db):
    entry_id = outbox.enqueue(
        settings, db, "a@x.test", ["b@y.test"], b"Subject: hi\r\n\r\nbody\r\n", None
    )
    row = store_outbox.get(db, entry_id)
    assert row["status"] == "pending" and row["rcpts"] == ["b@y.test"]
    head, data = outbox.read_spool(row["spool_path"])
    assert data == b"Subject: hi\r\n\r\nbody\r\n"
    assert head["mail_from"] == "a@x.test"
    assert oct(os.stat(row["spool_path"]).st_mode & 0o777) == "0o600"


def test_recover_queues_orphaned_spool_files(settings, db):
    root = outbox.spool_dir(settings)
    path = outbox.write_spool(root, outbox.Copy("a@x.test", ["c@y.test"], b"X: 1\r\n\r\nz\r\n"))
    assert outbox.recover(settings, db) == 1
    assert outbox.recover(settings, db) == 0
    rows = store_outbox.listing(db)
    assert [r["spool_path"] for r in rows] == [str(path)]


def test_read_spool_reads_old_files_and_refuses_truncated_ones(settings, tmp_path):
    old = tmp_path / "old.eml"  # one message per file, its envelope as the first line
    old.write_bytes(b'{"mail_from": "a@x.test", "rcpts": ["b@y.test"]}\nX: 1\r\n\r\nold\r\n')
    head, data = outbox.read_spool(old)
    assert head["rcpts"] == ["b@y.test"] and data == b"X: 1\r\n\r\nold\r\n"
    root = outbox.spool_dir(settings)
    copies = [
        outbox.Copy("a@x.test", [f"{n}@y.test"], f"X: {n}\r\n\r\n{n}\r\n".encode()) for n in (1, 2)
    ]
    first, second = outbox.write_batch(root, copies)
    assert outbox.read_spool(second) == (outbox.read_envelope(second)[0], copies[1].data)
    assert outbox.read_spool(second)[0]["rcpts"] == ["2@y.test"]
    os.truncate(first, os.path.getsize(first) - 1)  # both names are the same file
    assert outbox.read_spool(first)[1] == copies[0].data
    with pytest.raises(ValueError, match="truncated"):
        outbox.read_spool(second)


def test_failure_report_is_rfc3464():
    original = (
        b"From: a@x.test\r\nSubject: Quarterly\r\nMessage-ID: <m1@x.test>\r\n\r\nsecret body\r\n"
    )
    data = dsn.failure_report(
        reporting_mta="relay.test",
        to="a@x.test",
        original=original,
        recipients=[dsn.FailedRecipient("b@y.test", "5.1.1", "smtp; 550 5.1.1 no such user")],
        explanation="Your message could not be delivered.",
    )
    msg = email.message_from_bytes(data, policy=policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    status = parts[1].get_payload()
    assert status[1]["Final-Recipient"] == "rfc822; b@y.test"
    assert status[1]["Status"] == "5.1.1"
    assert b"Subject: Quarterly" in data and b"secret body" not in data
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))


def test_sent_rows_for_the_tracker(db):
    from store import contacts, sent

    contacts.ensure_contact(db, "known@y.test")
    email_id, created = sent.record_email(
        db,
        message_key="mid:m1@x.test",
        message_id="<m1@x.test>",
        user_id=None,
        from_addr="a@x.test",
        to_addrs=["known@y.test"],
        cc_addrs=[],
        subject="Hi",
        track_opens=True,
        track_clicks=True,
        untracked_reason=None,
    )
    assert created
    assert sent.record_email(
        db,
        message_key="mid:m1@x.test",
        message_id="<m1@x.test>",
        user_id=None,
        from_addr="a@x.test",
        to_addrs=[],
        cc_addrs=[],
        subject="Hi",
        track_opens=True,
        track_clicks=True,
        untracked_reason=None,
    ) == (email_id, False)
    d1 = sent.add_delivery(db, email_id, "Known@y.test")
    d2 = sent.add_delivery(db, email_id, None, shared=True)
    sent.add_links(db, email_id, [(1, "https://a.test/"), (2, "https://b.test/")])
    sent.add_links(db, email_id, [(1, "https://a.test/")])
    rows = sent.deliveries_of(db, email_id)
    assert [(r["id"], r["recipient"], r["shared"]) for r in rows] == [
        (d1, "known@y.test", 0),
        (d2, None, 1),
    ]
    assert rows[0]["contact_id"] is not None and rows[1]["contact_id"] is None
    assert [(r["position"], r["url"]) for r in sent.links_of(db, email_id)] == [
        (1, "https://a.test/"),
        (2, "https://b.test/"),
    ]
