"""The batch writer's fast path (one-statement inserts, summaries folded per batch, contact
properties per batch) leaves the database exactly as the per-event path would: the report
matches one recomputed from the raw events, contact properties match a recomputation,
and every hit is one event."""

from __future__ import annotations

import datetime as dt
import json
import random
import sqlite3
import time

import store
from store import contacts as store_contacts
from store import events as store_events
from store import report_schema, tracking
from store import users as store_users
from tests.reports.test_summary_upkeep import check
from tracker import classify, service
from tracker.writer import STALE_MARGIN, BatchWriter, PendingHit, _iso, _RecentHits

AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",
    "curl/8.5.0",
    "Mozilla/5.0",
]
DELIVERED = "2026-01-01T00:00:00.000000+00:00"
EDGES = (0.0, 0.0000004, 0.0000005, 0.5, 0.9999994, 0.9999995, 0.9999996)


def _sent(db, user: dict, n: int, pairs: list, *, shared: bool = False) -> dict:
    """Sent email number ``n`` (``<mN@seller.test>``, the id ``check`` looks for) to
    ``pairs`` (address, contact id), with three links."""
    return tracking.add_sent_email(
        db,
        user_id=user["id"],
        subject=f"S{n}",
        recipients=pairs,
        links=[f"https://example.com/{n}/{i}" for i in range(3)],
        shared=shared,
        delivered_at=DELIVERED,
        message_id=f"<m{n}@seller.test>",
    )


def test_random_batches_keep_reports_and_contacts_exact(settings, db):
    rng = random.Random(99)
    user = store_users.add_user(db, "alice@seller.example", "Alice", None)
    people = [f"p{i}@acme.test" for i in range(5)]
    contacts = {a: store_contacts.ensure_contact(db, a)[0]["id"] for a in people}
    email_ids, copies = [], []
    for n in range(6):
        shared = n == 5
        pairs = [(a, contacts[a]) for a in rng.sample(people, 3)]
        made = _sent(db, user, n + 1, pairs, shared=shared)
        assert made["email_id"] == n + 1
        email_ids.append(made["email_id"])
        copies += [(made["email_id"], d) for d in made["deliveries"]]
    gate = db.execute(  # the insert triggers know the batch gate (reports_0005_batch_gate)
        "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = 'reports_events_insert'"
    ).fetchone()
    assert gate is not None and "report_batch" in gate[0]

    writer = BatchWriter(settings, service.build_rules(settings))
    writer.start()
    sent = 0
    now = time.time()
    for round_ in range(12):  # batches of different sizes, hits close enough for bursts
        futures = []
        for _ in range(rng.randint(1, 40)):
            _, d = rng.choice(copies)
            kind = rng.choice(["open", "open", "click", "click", "honeypot"])
            hit = PendingHit(
                kind=kind,
                delivery_id=d,
                position=rng.randrange(3) if kind == "click" else None,
                url="https://example.com/",
                method=rng.choice(["GET", "GET", "GET", "HEAD"]),
                user_agent=rng.choice(AGENTS),
                ip=f"203.0.113.{rng.randint(1, 4)}",
                at=now + round_ * 0.7 + rng.random(),
            )
            futures.append(writer.submit(hit))
            sent += 1
        for f in futures:
            f.result(timeout=30)
    writer.enqueue(  # an erased copy: recorded, anonymous and unattached
        PendingHit("open", 10_000, None, "", "GET", AGENTS[0], "203.0.113.9", now)
    )
    sent += 1
    writer.close()

    assert store_events.count_hits(db) == sent
    check(db, email_ids)
    verdicts = {e["verdict"] for i in email_ids for e in store_events.events_of_email(db, i)}
    assert {"human", "machine"} <= verdicts
    assert any(
        e["reason"] in ("link_burst", "address_burst")
        for i in email_ids
        for e in store_events.events_of_email(db, i)
    )
    before = {a: store_contacts.find_contact(db, a) for a in people}
    for cid in contacts.values():
        store_events.recompute_contact(db, cid)
    for a in people:
        after = store_contacts.find_contact(db, a)
        for col in ("last_open_at", "last_click_at", "last_engagement_at"):
            assert before[a][col] == after[col], (a, col)
    assert db.execute("SELECT COUNT(*) FROM report_batch").fetchone()[0] == 0
    # The cached report entries (re-rendered once per email and batch) match a fresh render.
    assert _tails_fresh(db, email_ids) == [True] * len(email_ids)


def _tails_fresh(db, email_ids: list[int]) -> list[bool]:
    """Whether each email's cached report entry is what rendering it now gives."""
    out = []
    for email_id in email_ids:
        cached = db.execute("SELECT tail FROM report_emails WHERE email_id = ?", [email_id])
        fresh = db.execute(f"SELECT ({report_schema.tail_sql(str(email_id))})").fetchone()[0]
        out.append(json.loads(cached.fetchone()[0]) == json.loads(fresh))
    return out


def _one_copy(db) -> tuple[dict, int]:
    """One sent email with one delivered copy: (what ``add_sent_email`` made, the copy)."""
    user = store_users.add_user(db, "alice@seller.example", "Alice", None)
    made = tracking.add_sent_email(
        db,
        user_id=user["id"],
        subject="S",
        recipients=[("p@acme.test", None)],
        links=[],
        delivered_at=DELIVERED,
        message_id="<m1@seller.test>",
    )
    (d,) = made["deliveries"]
    return made, d


def test_a_copy_deleted_while_the_writer_runs_is_read_again(settings, db):
    """The writer keeps copies' contexts between batches only while no other connection
    commits: a hit after the email is deleted is recorded unattached, as for any unknown
    copy, not with the context kept from before."""
    made, d = _one_copy(db)
    writer = BatchWriter(settings, service.build_rules(settings))
    writer.start()
    try:
        now = time.time()
        writer.submit(PendingHit("open", d, None, "", "GET", AGENTS[0], "203.0.113.1", now)).result(
            timeout=30
        )
        tracking.delete_email(db, made["email_id"])
        writer.submit(
            PendingHit("open", d, None, "", "GET", AGENTS[0], "203.0.113.1", now + 1)
        ).result(timeout=30)
    finally:
        writer.close()
    rows = db.execute("SELECT delivery_id, email_id FROM events WHERE inferred = 0").fetchall()
    assert [tuple(r) for r in rows] == [(None, None)]


def test_report_entries_wait_while_hits_queue_and_are_exact_once_none_does(settings, db):
    """While hits wait in the queue a batch leaves its emails' report entries for later (at
    most ``refresh_seconds``); the first batch after which none waits re-renders them all,
    those of earlier batches included."""
    user = store_users.add_user(db, "alice@seller.example", "Alice", None)
    emails = [_two_copies(db, user, n) for n in (1, 2, 3)]
    ids = [e for e, _, _ in emails]
    writer = BatchWriter(settings, service.build_rules(settings))  # not started: _write by hand
    now = time.time() - 60

    def hit(n: int, at: float) -> PendingHit:
        return PendingHit("open", emails[n][1][0], None, "", "GET", AGENTS[0], "198.51.100.1", at)

    wdb = store.connect(settings.db_path)
    writer._refreshed = time.monotonic()
    writer.enqueue(hit(2, now + 10))  # a hit waiting: the queue is not empty
    writer._write(wdb, [hit(0, now)])
    assert _tails_fresh(db, ids) == [False, True, True]
    writer.refresh_seconds = 0.0  # a second has passed: re-rendered though hits still wait
    writer._write(wdb, [hit(1, now + 1)])
    assert _tails_fresh(db, ids) == [True, True, True]
    writer.refresh_seconds = 3600.0
    writer._write(wdb, [hit(0, now + 2)])
    writer._write(wdb, [hit(1, now + 3)])
    assert _tails_fresh(db, ids) == [False, False, True]
    writer._queue.get_nowait()  # nothing waits any more
    writer._write(wdb, [hit(2, now + 4)])
    assert _tails_fresh(db, ids) == [True, True, True]
    wdb.close()
    check(db, ids)


def test_event_times_are_the_text_store_to_iso_makes():
    """The writer's cached-seconds ``_iso`` gives what ``store.to_iso`` of a datetime gives,
    microseconds rounded the same way (up into the next second included)."""
    rng = random.Random(7)
    times = [rng.uniform(0, 2e9) for _ in range(20_000)]
    times += [s + f for s in (0, 1_767_225_599, 1_767_225_600) for f in EDGES]
    for ts in times:
        assert _iso(ts) == store.to_iso(dt.datetime.fromtimestamp(ts, dt.UTC)), ts


def test_a_batch_rolled_back_and_retried_leaves_no_phantom_priors(settings, db, monkeypatch):
    """A batch that fails after recording hits in the writer's kept priors (then rolled
    back and retried) must not leave those hits there twice: the copies are read again."""
    made, d = _one_copy(db)
    real, failed = store_events.insert_numbered, []

    def locked_once(conn, events):
        if not failed:
            failed.append(len(events))
            raise sqlite3.OperationalError("database is locked")
        real(conn, events)

    monkeypatch.setattr(store_events, "insert_numbered", locked_once)
    writer = BatchWriter(settings, service.build_rules(settings))
    writer.start()
    now = time.time()
    writer.submit(PendingHit("open", d, None, "", "GET", AGENTS[0], "203.0.113.1", now)).result(
        timeout=30
    )
    writer.close()
    assert failed == [1]
    ids = [e["id"] for e in store_events.events_of_email(db, made["email_id"])]
    assert [p.id for p in writer.recent.priors(d)[0]] == ids


def _two_copies(db, user: dict, n: int) -> tuple[int, list[int], list[int]]:
    """Email ``n`` to two new contacts with three links: (email id, copies, contact ids)."""
    pairs = [
        (a, store_contacts.ensure_contact(db, a)[0]["id"]) for a in (f"a{n}@x.test", f"b{n}@x.test")
    ]
    made = _sent(db, user, n, pairs)
    return made["email_id"], made["deliveries"], [c for _, c in pairs]


# (copy, kind, link position, client address, seconds): a human open and click, a click
# without an open (an inferred open), then a link burst on that copy (the earlier click
# and its inferred open turn machine), and opens from more and more addresses.
BURSTS = [
    (0, "open", None, "198.51.100.1", 0.0),
    (0, "click", 0, "198.51.100.1", 4.0),
    (1, "click", 1, "198.51.100.2", 5.0),
    (1, "click", 2, "198.51.100.2", 5.4),
    (1, "click", 0, "198.51.100.2", 5.6),
    (0, "open", None, "198.51.100.3", 9.0),
    (0, "open", None, "198.51.100.4", 9.5),
    (0, "open", None, "198.51.100.5", 10.0),
    (1, "open", None, "198.51.100.2", 12.0),
]


def test_a_burst_within_one_batch_is_labelled_as_hit_by_hit(settings, db):
    """Re-labelling events still held by the batch (not yet written) gives the events,
    contact properties, summaries and notices that one batch per hit gives."""
    user = store_users.add_user(db, "alice@seller.example", "Alice", None)
    now = time.time() - 60
    runs = {}
    for n, one_batch in ((1, False), (2, True)):
        email_id, copies, contact_ids = _two_copies(db, user, n)
        notices: list[dict] = []
        writer = BatchWriter(
            settings, service.build_rules(settings), lambda got, _q, into=notices: into.extend(got)
        )
        hits = [
            PendingHit(kind, copies[c], pos, "https://example.com/", "GET", AGENTS[0], ip, now + s)
            for c, kind, pos, ip, s in BURSTS
        ]
        if one_batch:
            writer.enqueue_many(hits)  # queued before the thread runs: one batch
            writer.start()
        else:
            writer.start()
            for hit in hits:
                writer.submit(hit).result(timeout=30)
        writer.close()
        assert writer.batches == (1 if one_batch else len(hits))
        index = {d: i for i, d in enumerate(copies)}
        first = min(e["id"] for e in store_events.events_of_email(db, email_id))
        runs[n] = {
            "events": [
                (index[e["delivery_id"]], e["kind"], e["inferred"], e["verdict"], e["reason"])
                + (e["caused_by"] and e["caused_by"] - first,)
                for e in store_events.events_of_email(db, email_id)
            ],
            "contacts": [
                {
                    k: v
                    for k, v in store_contacts.find_contact(db, f"{p}{n}@x.test").items()
                    if k.startswith("last_")
                }
                for p in "ab"
            ],
            "notices": [
                (
                    x["type"],
                    x["kind"],
                    x["inferred"],
                    x["verdict"],
                    x["reason"],
                    x.get("previous_verdict"),
                )
                + (x.get("open_number"),)
                for x in notices
            ],
            "report": [
                tuple(r)[2:]
                for r in db.execute(
                    "SELECT * FROM report_people WHERE email_id = ? ORDER BY target", [email_id]
                )
            ],
        }
        check(db, [email_id])
    reasons = {e[4] for e in runs[1]["events"]}
    assert "link_burst" in reasons and any(e[3] == "machine" and e[2] for e in runs[1]["events"])
    assert any(x[0] == "relabel" for x in runs[1]["notices"])
    assert runs[2] == runs[1]


def test_recent_hits_let_go_of_idle_copies_and_old_hits():
    """Pruning drops the copies with no hit left in the burst window and a copy hit for long
    lets go of its oldest hits; whatever is kept, a copy not reported missing for a batch
    gives exactly its hits in the window (else the batch reads it again)."""
    recent = _RecentHits(lookback=30.0)
    hits: dict[int, list[classify.Prior]] = {}

    def add(d: int, at: float) -> None:
        p = classify.Prior(
            len(hits) * 1000 + len(hits.get(d, [])), "open", at, "ip", "human", "human", None
        )
        hits.setdefault(d, []).append(p)
        recent.add(d, p)

    def exact(at: float) -> None:
        since = at - 30.0
        for d in hits:
            if d not in recent.missing({d}, since):
                want = [p.id for p in hits[d] if p.at >= since]
                got = [p.id for p in recent.priors(d)[0] if p.at >= since]
                assert got == want, (d, at)

    for d in range(1, 4):
        add(d, 100.0)
    add(2, 140.0)  # copy 2 is in use again; 1 and 3 stay idle
    recent.prune(150.0)
    assert sorted(recent._copies) == [2]
    exact(150.0)
    for n in range(100):  # copy 5 hit every second for 100 s
        add(5, 200.0 + n)
        exact(200.0 + n + 0.5)
    assert min(p.at for p in recent._copies[5][1]) >= 299.0 - 2 * 30.0 - STALE_MARGIN
    assert recent.missing({5}, 210.0) == [5]  # its early hits are gone: read again
