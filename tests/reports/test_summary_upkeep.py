"""The summary tables behind `report emails` stay exact whatever writes the events:
random hits (tracker-style, with inferred opens, and raw), re-labelled verdicts and a GDPR
erasure, each checked against the report recomputed from the raw rows."""

from __future__ import annotations

import random

import store
from store import contacts as store_contacts
from store import events as store_events
from store import records, reports
from store import sent as store_sent

KINDS = ("open", "open", "open", "click", "reply")
VERDICTS = (
    ("human", "human"),
    ("machine", "apple_mpp"),
    ("machine", "scanner_ua"),
    ("self", "sender_network"),
)

# (how many, verdict, reason) per round of re-labelling random events, replies included
RELABELS = (
    (60, "machine", "burst"),
    (20, "human", "human"),
    (40, "machine", "scanner_ua"),
    (30, "self", "sender_network"),
    (50, "human", "human"),
    (40, "machine", "burst"),
)


def expected_report(db, email_ids: list[int]) -> dict[int, dict]:
    """Hits of each email per person, recomputed from events and deliveries."""
    out = {}
    for email_id in email_ids:
        copies = {d["id"]: d for d in store_sent.deliveries_of(db, email_id)}
        people: dict[str, dict] = {}
        for d in copies.values():
            if d["recipient"] and not d["shared"]:
                people.setdefault(d["recipient"], _blank())
        totals, someone = _blank(), _blank()
        for ev in store_events.events_of_email(db, email_id):
            copy = copies.get(ev["delivery_id"])
            if ev["anonymous"] or copy is None or copy["shared"] or not copy["recipient"]:
                target = someone
            else:
                target = people.setdefault(copy["recipient"], _blank())
            for obj in (totals, target):
                _add(obj, ev)
        out[email_id] = {"totals": totals, "someone": someone, "people": people}
    return out


def _blank() -> dict:
    return {
        "opens": 0,
        "clicks": 0,
        "first": None,
        "last": None,
        "inferred": False,
        "replied": False,
        "machine": {"opens": 0, "clicks": 0, "reasons": {}},
        "self": {"opens": 0, "clicks": 0, "reasons": {}},
    }


def _add(obj: dict, ev: dict) -> None:
    kind, verdict = ev["kind"], ev["verdict"]
    if verdict == "human":
        if kind == "open":
            obj["opens"] += 1
            obj["first"] = min(filter(None, (obj["first"], ev["at"])))
            obj["last"] = max(filter(None, (obj["last"], ev["at"])))
            obj["inferred"] |= bool(ev["inferred"])
        elif kind == "click":
            obj["clicks"] += 1
        else:
            obj["replied"] = True
    elif kind in ("open", "click"):
        other = obj[verdict]
        other[kind + "s"] += 1
        other["reasons"][ev["reason"]] = other["reasons"].get(ev["reason"], 0) + 1


def check(db, email_ids: list[int]) -> None:
    want = expected_report(db, email_ids)
    got = {e["message_id"]: e for e in reports.email_report(db, all_hits=True)}
    for email_id, w in want.items():
        e = got[f"<m{email_id}@seller.test>"]
        assert (e["opens"], e["clicks"]) == (w["totals"]["opens"], w["totals"]["clicks"])
        for verdict in ("machine", "self"):
            assert e[verdict] == w["totals"][verdict]
            assert e["someone"][verdict] == w["someone"][verdict]
        assert (e["someone"]["opens"], e["someone"]["clicks"]) == (
            w["someone"]["opens"],
            w["someone"]["clicks"],
        )
        assert [r["address"] for r in e["recipients"]] == sorted(w["people"])
        for r in e["recipients"]:
            p = w["people"][r["address"]]
            assert r == {
                "address": r["address"],
                "opens": p["opens"],
                "clicks": p["clicks"],
                "first_open_at": p["first"],
                "last_open_at": p["last"],
                "inferred_open": p["inferred"],
                "replied": p["replied"],
                "machine": p["machine"],
                "self": p["self"],
            }


def test_random_writes_relabels_and_erasure_keep_the_report_exact(tmp_path) -> None:
    rng = random.Random(1234)
    db = store.connect(tmp_path / "m.db")
    people = [f"p{i}@acme.test" for i in range(6)]
    contact_ids = {a: store_contacts.ensure_contact(db, a)[0]["id"] for a in people}
    email_ids, copies = [], []
    for n in range(8):
        shared = n % 4 == 3
        e = records.add_email(
            db,
            message_id=f"<m{n + 1}@seller.test>",
            subject=f"S{n}",
            track_opens=True,
            track_clicks=True,
            sent_at=store.now_iso(),
        )
        assert e == n + 1
        email_ids.append(e)
        link = records.add_link(db, e, 0, "https://example.com/")
        if shared:
            copies.append((e, records.add_delivery(db, e, None, shared=True), None, link))
        else:
            for addr in rng.sample(people, rng.randint(1, 3)):
                d = records.add_delivery(db, e, addr, contact_ids[addr])
                copies.append((e, d, contact_ids[addr], link))
    ids = []
    for i in range(400):
        e, d, c, link = rng.choice(copies)
        kind = rng.choice(KINDS)
        verdict, reason = rng.choice(VERDICTS) if kind != "reply" else ("human", "reply")
        event = {
            "kind": kind,
            "at": f"2026-11-2{rng.randint(0, 9)}T{rng.randint(10, 23)}:00:00+00:00",
            "email_id": e,
            "delivery_id": d,
            "contact_id": c,
            "link_id": link if kind == "click" else None,
            "verdict": verdict,
            "reason": reason,
            "anonymous": int(rng.random() < 0.1),
        }
        if i % 2:
            ids += store_events.insert_event(db, event)
        else:
            ids.append(records.add_event(db, **event))
    check(db, email_ids)
    # Re-labellings change summaries by difference (reports_events_relabel): each round
    # must leave them as a recount from the events would.
    for n, verdict, reason in RELABELS:
        store_events.relabel(db, rng.sample(ids, n), verdict, reason)
        check(db, email_ids)
    db.execute("UPDATE events SET at = ? WHERE id = ?", ["2026-11-19T09:00:00+00:00", ids[0]])
    check(db, email_ids)  # any other change still recounts the person (or moves the hit)
    store_contacts.forget(db, people[0])
    store_contacts.forget(db, people[3])
    remaining = [e for e in email_ids if store_sent.email_by_id(db, e)]
    check(db, remaining)
    db.close()
