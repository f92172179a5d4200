"""Pieces of the delivery worker on their own: line breaking for strict upstreams, and
which queue entries may go now (first in line per recipient)."""

from __future__ import annotations

from relay import delivery
from store import now_iso
from store import outbox as store_outbox


def test_fit_lines_breaks_only_overlong_lines_postfix_style():
    ok = b"Subject: hi\r\n\r\n" + b"y" * 998 + b"\r\n"
    assert delivery.fit_lines(ok) is ok
    data = b"X-Long: " + b"x" * 3000 + b"\r\nSubject: s\r\n\r\n" + b"z" * 2500 + b"\r\n"
    out = delivery.fit_lines(data)
    assert all(len(line) <= 998 for line in out.split(b"\r\n"))
    assert out.replace(b"\r\n ", b"") == data  # only CRLF SPACE inserted


def test_choose_takes_the_first_entry_of_each_recipient(db):
    def add(rcpts):
        return store_outbox.add(db, [{"mail_from": "a@x.test", "rcpts": rcpts, "spool_path": "-"}])[
            0
        ]

    c1 = add(["carol@y.test"])
    d1 = add(["dave@y.test"])
    c2 = add(["Carol@y.test"])  # same mailbox, other case: waits behind c1
    both = add(["dave@y.test", "erin@y.test"])  # waits behind d1, and holds erin back
    e1 = add(["erin@y.test"])
    f1 = add(["frank@y.test"])
    now = now_iso()

    def ids(**kw):
        runs, scan = delivery.choose(
            db, kw.pop("now", now), kw.pop("want", 10), kw.pop("busy", set()), **kw
        )
        return [[e["id"] for e in run] for run in runs], scan

    # c2 follows c1 in the same run (nothing else to carol in between); "both" ends dave's
    # run and holds erin back.
    assert ids(inflight=set())[0] == [[c1, c2], [d1], [f1]]
    assert ids(inflight=set(), want=2)[0] == [[c1], [d1]]  # want counts entries
    # c1 and d1 in flight: their recipients stay held back.
    busy = {"carol@y.test", "dave@y.test"}
    assert ids(busy=busy, inflight={c1, d1})[0] == [[f1]]
    # c1 waits for a retry later: c2 still may not overtake it.
    store_outbox.mark_retry(db, c1, "9999-01-01T00:00:00+00:00", "451", ["carol@y.test"])
    chosen, scan = ids(inflight=set())
    assert chosen == [[d1], [f1]] and scan.complete
    # A walk resumed for entries queued since reads only those.
    g1 = add(["gina@y.test"])
    c3 = add(["carol@y.test"])
    assert ids(now=now_iso(), inflight={d1, f1}, resume=scan)[0] == [[g1]]
    # d1 delivered (its commit still to come): skipped, and no longer holds dave back.
    assert ids(now=now_iso(), inflight={d1}, delivered={d1})[0] == [[both], [f1], [g1]]
    assert e1 and c3


async def test_start_removes_spool_files_of_sent_entries(settings, db):
    """A crash between marking an entry sent and deleting its file leaves the file behind."""
    import os

    from relay import outbox

    settings.relay.upstream = "maildir:" + str(settings.data_dir / "sink")
    sent_id = outbox.enqueue(settings, db, "a@x.test", ["b@y.test"], b"Subject: 1\r\n\r\nx\r\n")
    store_outbox.mark_sent(db, sent_id)
    failed_id = outbox.enqueue(settings, db, "a@x.test", ["c@y.test"], b"Subject: 2\r\n\r\nx\r\n")
    store_outbox.mark_failed(db, failed_id, "550")  # kept for `queue retry --failed`
    worker = delivery.Worker(settings)
    await worker.start()
    await worker.stop()
    assert not os.path.exists(store_outbox.get(db, sent_id)["spool_path"])
    assert os.path.exists(store_outbox.get(db, failed_id)["spool_path"])


def test_smtp_payload_is_what_aiosmtplib_would_send():
    """The DATA bytes made with counts and one replace equal aiosmtplib's regex-made ones,
    for every mix of CR, LF, CRLF and leading dots."""
    import random

    from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

    rng = random.Random(20261123)
    pieces = [b"\r", b"\n", b"\r\n", b".", b"..", b"a", b"\n.", b"\r."]
    for _ in range(5000):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        expected = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data)) + b".\r\n"
        assert delivery.smtp_payload(data) == expected, data


def _ids(runs):
    return [[e["id"] for e in run] for run in runs]


def test_a_walk_that_skips_what_an_earlier_walk_read_chooses_the_same(db):
    """``choose(known=...)`` skips entries an earlier complete walk read once every one of
    their recipients is held back; whatever the queue went through since (entries sent,
    waiting for a retry, new ones), it must choose exactly what a full walk chooses."""
    import random

    rng = random.Random(8)
    names = [f"r{i}@y.test" for i in range(8)]
    weights = [40, 30, 10, 5, 2, 1, 1, 1]  # some recipients only deep in the queue
    now = "9000-01-01T00:00:00+00:00"  # every entry added is due, but for these:
    later = "9999-01-01T00:00:00+00:00"
    skipped = 0

    def add(n):
        rows = []
        while len(rows) < n:  # blocks to one recipient list: runs that cross pages
            rcpts = rng.choices(names, weights, k=rng.choice([1, 1, 1, 2]))
            rows += [{"mail_from": "a@x.test", "rcpts": rcpts, "spool_path": "-"}] * (
                rng.randint(1, 40)
            )
        return store_outbox.add(db, rows[:n])

    for _ in range(60):
        ids = add(rng.randint(0, 900))
        _, known = delivery.choose(db, now, 10**6, set(rng.sample(names, 2)), set())
        assert known.complete
        for i in rng.sample(ids, len(ids) // 3):
            store_outbox.mark_sent(db, i)
        for i in rng.sample(ids, len(ids) // 10):  # some recipients took it, the rest wait
            rest = rng.sample(store_outbox.get(db, i)["rcpts"], 1)
            store_outbox.mark_retry(db, i, rng.choice([now, later]), "451", rest)
        ids += add(rng.randint(0, 300))
        active = [e for e, _, _ in store_outbox.active_brief(db, 0, 10**6)]
        busy = set(rng.sample(names, rng.randint(0, 3)))
        inflight = set(rng.sample(active, min(len(active), rng.randint(0, 20))))
        delivered = set(rng.sample(active, min(len(active), rng.randint(0, 5))))
        want = rng.choice([1, 5, 32, 10**6])
        args = (db, now, want, busy, inflight, None, delivered)
        full, full_scan = delivery.choose(*args)
        fast, fast_scan = delivery.choose(*args, known=known)
        assert _ids(fast) == _ids(full)
        assert fast_scan.complete == full_scan.complete
        if fast_scan.complete:
            assert fast_scan.blocked == full_scan.blocked and fast_scan.met == full_scan.met
        skipped += fast_scan.base != full_scan.base
        for i in active:
            store_outbox.mark_sent(db, i)
    assert skipped > 10  # the skip happened, not only the full walk


def test_a_burst_to_one_recipient_is_not_read_whole_per_walk(db):
    """The relay bench's case: thousands queued to one recipient whose run is in flight.
    With the last complete walk known, a walk reads one page, not the whole queue."""
    rows = [{"mail_from": "a@x.test", "rcpts": ["r0@y.test"], "spool_path": "-"}] * 3000
    ids = store_outbox.add(db, rows)
    now = now_iso()
    _, known = delivery.choose(db, now, 32, set(), set())
    assert known.complete and known.after == ids[-1]
    read = []
    brief = store_outbox.active_brief

    def counting(db, after=0, limit=256):
        page = brief(db, after, limit)
        read.extend(page)
        return page

    store_outbox.active_brief, saved = counting, brief
    try:
        for i in ids[:10]:
            store_outbox.mark_sent(db, i)  # part of the run in flight delivered
        runs, scan = delivery.choose(
            db, now, 16, {"r0@y.test"}, set(ids[10:16]), None, set(), known=known
        )
    finally:
        store_outbox.active_brief = saved
    assert runs == [] and scan.complete
    assert len(read) <= delivery.PAGE
