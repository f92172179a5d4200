"""Copies, decisions, the ingest hand-off and the durable outbox, end to end over SMTP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import smtplib
import subprocess
import sys

from ingest import spool as ingest_spool
from store import outbox as store_outbox
from store import sent
from store.sql import rows
from tests.relay.conftest import (
    PASSWORD,
    Upstream,
    html_message,
    maildir_messages,
    parse,
    running_relay,
)
from tests.relay.rwhelp import SIGNER, TRACKER_URL
from tests.support import free_port, wait_for

HTML = '<html><body><p>Hello <a href="https://example.com/offer?a=1&amp;b=2">the offer</a></p></body></html>'


async def submit(settings, rcpts, data, user="alice@corp.test", mail_from="alice@corp.test"):
    def go():
        host, port = settings.relay.listen.split(":")
        with smtplib.SMTP(host, int(port), timeout=20) as s:
            s.login(user, PASSWORD)
            return s.sendmail(mail_from, rcpts, data)

    return await asyncio.to_thread(go)


def tokens_in(data: bytes) -> list:
    html = parse(data).get_body(("html",)).get_content()
    return [SIGNER.verify(m.group(2)) for m in TRACKER_URL.finditer(html)]


def emails(db):
    return rows(db, "SELECT * FROM emails ORDER BY id")


async def test_one_copy_per_recipient_with_own_tokens_and_untouched_self_copies(
    settings, alice, db
):
    settings.tracker.secrets = [("s" * 32)]
    msg = html_message(HTML, to="carol@client.test, dave@client.test", cc="erin@other.test")
    rcpts = [
        "carol@client.test",
        "dave@client.test",
        "erin@other.test",
        "hidden@bcc.test",
        "alice@corp.test",
        "bob@corp.test",
    ]
    async with running_relay(settings):
        await submit(settings, rcpts, msg)
        got = await wait_for(lambda: (m := maildir_messages(settings)) and len(m) == 5 and m)
    by = {}
    for raw in got:
        targets = [
            line.split(b": ")[1].decode()
            for line in raw.split(b"\r\n")
            if line.startswith(b"Delivered-To:")
        ]
        by[tuple(targets)] = raw
    (email_row,) = emails(db)
    deliveries = {d["recipient"]: d for d in sent.deliveries_of(db, email_row["id"])}
    assert set(deliveries) == {
        "carol@client.test",
        "dave@client.test",
        "erin@other.test",
        "hidden@bcc.test",
    }
    seen_ids = set()
    for rcpt, d in deliveries.items():
        toks = tokens_in(by[(rcpt,)])
        kinds = sorted(t.kind for t in toks)
        assert kinds == ["click", "honeypot", "open"]
        assert {t.delivery_id for t in toks} == {d["id"]}
        seen_ids.add(d["id"])
        assert d["delivered_at"] is not None
    assert len(seen_ids) == 4
    own = by[("alice@corp.test", "bob@corp.test")]
    assert own.endswith(msg)  # the untouched original
    links = sent.links_of(db, email_row["id"])
    assert [(link["position"], link["url"]) for link in links] == [
        (1, "https://example.com/offer?a=1&b=2")
    ]
    assert (
        email_row["track_opens"] == 1
        and email_row["track_clicks"] == 1
        and email_row["source"] == "relay"
    )


async def test_shared_copy_when_per_recipient_is_off(settings, alice, db):
    settings.tracker.secrets = ["s" * 32]
    settings.relay.per_recipient = False
    async with running_relay(settings):
        await submit(settings, ["carol@client.test", "dave@client.test"], html_message(HTML))
        (raw,) = await wait_for(lambda: maildir_messages(settings))
    (d,) = sent.deliveries_of(db, emails(db)[0]["id"])
    assert d["shared"] == 1 and d["recipient"] is None
    assert {t.delivery_id for t in tokens_in(raw)} == {d["id"]}
    assert raw.count(b"Delivered-To:") == 2


async def test_decisions_are_stored_and_control_headers_removed(settings, alice, db):
    from store import users

    plain = b"From: alice@corp.test\r\nTo: carol@client.test\r\nSubject: plain\r\nMessage-ID: <p1@corp.test>\r\n\r\nJust text\r\n"
    empty = html_message(
        "<html><head><title>t</title></head><body> &nbsp; <!-- x --></body></html>"
    )
    opens_only = html_message(HTML, extra="X-Mailtally-Track: opens\r\nX-Mailtally-Log: no\r\n")
    none = html_message(HTML, extra="X-Mailtally-Track: none\r\n")
    async with running_relay(settings):
        for data in (plain, empty, opens_only, none):
            await submit(settings, ["carol@client.test"], data)
        got = await wait_for(lambda: (m := maildir_messages(settings)) and len(m) == 4 and m)
        reasons = [
            (
                e["subject"],
                e["track_opens"],
                e["track_clicks"],
                (e["untracked_reason"] or "").split(":")[0],
            )
            for e in emails(db)
        ]
        assert reasons == [
            ("plain", 0, 0, "plain-text-only"),
            ("Proposal", 0, 0, "empty-html"),
            ("Proposal", 1, 0, "header"),
            ("Proposal", 0, 0, "header"),
        ]
        assert all(b"X-Mailtally" not in raw for raw in got)
        users.set_defaults(db, "alice@corp.test", opens=False, clicks=False)
        await submit(settings, ["carol@client.test"], html_message(HTML))
        users.set_defaults(db, "alice@corp.test", opens=True, clicks=True)
    settings.general.tracking_enabled = False  # settings are read when the relay starts
    async with running_relay(settings):
        await submit(
            settings,
            ["carol@client.test"],
            html_message(HTML, extra="X-Mailtally-Track: opens, clicks\r\n"),
        )
        got = await wait_for(lambda: (m := maildir_messages(settings)) and len(m) == 6 and m)
    last = emails(db)[-2:]
    assert [e["untracked_reason"].split(":")[0] for e in last] == [
        "user-defaults",
        "tracking-disabled",
    ]
    assert all(b"https://t.example" not in raw for raw in got[-2:])


async def test_logging_address_and_sent_mail_logging_go_to_the_ingest(settings, alice, db):
    root = ingest_spool.spool_dir(settings)
    async with running_relay(settings):
        msg = html_message(HTML, extra="X-Mailtally-Log: yes\r\n")
        await submit(settings, ["carol@client.test", settings.ingest.bcc_address], msg)
        await wait_for(lambda: maildir_messages(settings))
    entries = [ingest_spool.read(p) for p in ingest_spool.pending(root)]
    metas = sorted((e.rcpts, e.meta.get("source"), e.meta.get("via")) for e in entries)
    assert metas == [
        (["carol@client.test"], "relay", None),
        ([settings.ingest.bcc_address], None, "relay"),
    ]
    key = emails(db)[0]["message_key"]
    assert all(e.meta["message_key"] == key and e.meta["user_id"] == alice["id"] for e in entries)
    assert all(
        b"X-Mailtally" not in e.read_bytes() and b"t.example" not in e.read_bytes() for e in entries
    )
    # The logging address is never sent out.
    (raw,) = maildir_messages(settings)
    assert settings.ingest.bcc_address.encode() not in raw.split(b"\r\n\r\n")[0].split(b"From:")[0]


async def test_fail_open_delivers_the_original_and_stores_the_error(settings, alice, db):
    bad = html_message(HTML).replace(b"text/html; charset=utf-8", b"text/html; charset=utf-16")
    async with running_relay(settings):
        await submit(settings, ["carol@client.test"], bad)
        (raw,) = await wait_for(lambda: maildir_messages(settings))
    assert raw.endswith(bad)
    (e,) = emails(db)
    assert e["rewrite_error"] and "utf-16" in e["rewrite_error"]
    assert e["untracked_reason"].startswith("rewrite-failed")


async def test_upstream_451_then_250_delivers_once(settings, alice, db, upstream):
    upstream.data_replies = ["451 4.3.0 try later"]
    async with running_relay(settings):
        await submit(settings, ["carol@client.test"], html_message(HTML))
        await wait_for(lambda: upstream.messages, timeout=20)
        await wait_for(lambda: store_outbox.counts(db).get("sent") == 1)
    assert len(upstream.messages) == 1
    (row,) = store_outbox.listing(db, ["sent"])
    assert row["attempts"] == 2


async def test_upstream_550_sends_a_report_to_the_sender(settings, alice, db, upstream):
    upstream.rcpt_replies = {"nobody@client.test": "550 5.1.1 no such user"}
    async with running_relay(settings):
        await submit(settings, ["nobody@client.test"], html_message(HTML))
        await wait_for(lambda: upstream.messages, timeout=20)
    mail_from, rcpts, data = upstream.messages[0]
    assert mail_from in ("", "<>") and rcpts == ["alice@corp.test"]
    report = parse(data)
    assert report.get_content_type() == "multipart/report"
    status = list(report.iter_parts())[1].get_payload()[1]
    assert status["Final-Recipient"] == "rfc822; nobody@client.test" and status["Status"] == "5.1.1"
    failed = store_outbox.listing(db, ["failed"])
    assert len(failed) == 1 and "550" in failed[0]["last_error"]


async def test_expiry_sends_a_report(settings, alice, db, upstream):
    upstream.data_replies = ["451 busy"] * 100
    settings.relay.max_queue_age = 2
    async with running_relay(settings):
        await submit(settings, ["carol@client.test"], html_message(HTML))
        await wait_for(lambda: store_outbox.counts(db).get("failed") == 1, timeout=20)
    (row,) = store_outbox.listing(db, ["failed"])
    assert "expired" in row["last_error"]
    # The report itself is queued for the sender (the upstream still says 451 to it).
    reports = [r for r in store_outbox.listing(db, ["pending", "retrying"]) if r["mail_from"] == ""]
    assert reports and reports[0]["rcpts"] == ["alice@corp.test"]


async def test_sigkill_after_250_delivers_after_restart(settings, alice, db, tmp_path):
    up = Upstream()  # not started yet: the first attempt fails, the message waits in the queue
    env = dict(
        os.environ,
        MAILTALLY_RELAY_LISTEN=settings.relay.listen,
        MAILTALLY_RELAY_UPSTREAM=f"smtp://127.0.0.1:{up.port}",
        MAILTALLY_RELAY_RETRY_SCHEDULE="1",
        MAILTALLY_TRACKER_BASE_URL=settings.tracker.base_url,
        MAILTALLY_INGEST_LISTEN=f"127.0.0.1:{free_port()}",
        MAILTALLY_TRACKER_LISTEN=f"127.0.0.1:{free_port()}",
    )
    cmd = [
        sys.executable,
        "-c",
        "import cli; cli.main()",
        "--config",
        str(settings.config_path),
        "relay",
    ]

    async def start():
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        host, port = settings.relay.listen.split(":")

        def ready():
            try:
                smtplib.SMTP(host, int(port), timeout=2).quit()
                return True
            except OSError:
                return False

        await wait_for(lambda: ready() or proc.poll() is not None, timeout=30, interval=0.1)
        assert proc.poll() is None, proc.stdout.read().decode()
        return proc

    proc = await start()
    try:
        await submit(settings, ["carol@client.test"], html_message(HTML))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    queued = store_outbox.listing(db)
    assert len(queued) == 1 and os.path.exists(queued[0]["spool_path"])
    await up.start()
    proc = await start()
    try:
        await wait_for(lambda: up.messages, timeout=30)
        await wait_for(lambda: store_outbox.counts(db).get("sent") == 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 20)  # the upstream (this loop) answers its QUIT
        await up.stop()
    assert len(up.messages) == 1 and up.messages[0][1] == ["carol@client.test"]
    assert not os.path.exists(queued[0]["spool_path"])
    assert json.loads(json.dumps(queued[0]["rcpts"])) == ["carol@client.test"]


async def test_one_megabyte_line_is_delivered_untouched_when_it_cannot_be_rewritten(
    settings, alice, db
):
    html = (
        "<html><body><p>"
        + "x" * 1_000_000
        + '<a href="https://example.com/a">a</a></p></body></html>'
    )
    msg = html_message(html)
    async with running_relay(settings):
        await submit(settings, ["carol@client.test"], msg)
        (raw,) = await wait_for(lambda: maildir_messages(settings))
    assert raw.endswith(msg)
    (e,) = emails(db)
    assert "998" in e["rewrite_error"] and e["untracked_reason"].startswith("rewrite-failed")
    assert e["track_opens"] == 0 and e["track_clicks"] == 0
