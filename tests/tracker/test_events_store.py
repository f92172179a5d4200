"""store.events: replies, inferred opens and contact properties (one shared code path)."""

from __future__ import annotations

from store import contacts as store_contacts
from store import events


def test_reply_adds_inferred_open_and_properties(db, sent):
    made = sent()
    at = "2026-01-02T10:00:00.000000+00:00"
    events.record_reply(
        db,
        email_id=made["email_id"],
        delivery_id=made["deliveries"][0],
        contact_id=made["contacts"][0],
        at=at,
    )
    got = events.events_of_delivery(db, made["deliveries"][0])
    assert [(e["kind"], e["inferred"], e["verdict"], e["at"]) for e in got] == [
        ("reply", 0, "human", at),
        ("open", 1, "human", at),
    ]
    assert got[0]["reason"] == "reply"
    assert got[1]["caused_by"] == got[0]["id"]
    contact = store_contacts.find_contact(db, "bob@acme.example")
    assert contact["last_reply_at"] == at
    assert contact["last_engagement_at"] == at
    assert contact["last_open_at"] == at
    assert contact["last_click_at"] is None
    # The same reply again is not recorded twice.
    events.record_reply(
        db,
        email_id=made["email_id"],
        delivery_id=made["deliveries"][0],
        contact_id=made["contacts"][0],
        at=at,
    )
    assert len(events.events_of_delivery(db, made["deliveries"][0])) == 2


def test_reply_after_human_open_adds_no_inferred_open(db, sent):
    made = sent()
    d = made["deliveries"][0]
    base = {"email_id": made["email_id"], "delivery_id": d, "contact_id": made["contacts"][0]}
    events.insert_event(
        db, dict(base, kind="open", at="2026-01-02T09:00:00+00:00", verdict="human", reason="human")
    )
    events.record_reply(db, at="2026-01-02T10:00:00+00:00", **base)
    kinds = [(e["kind"], e["inferred"]) for e in events.events_of_delivery(db, d)]
    assert kinds == [("open", 0), ("reply", 0)]


def test_machine_open_does_not_count_and_reply_without_delivery(db, sent):
    made = sent()
    base = {"email_id": made["email_id"], "contact_id": made["contacts"][0]}
    events.insert_event(
        db,
        dict(
            base,
            delivery_id=made["deliveries"][0],
            kind="open",
            at="2026-01-02T09:00:00+00:00",
            verdict="machine",
            reason="apple_mpp_user_agent",
        ),
    )
    assert store_contacts.find_contact(db, "bob@acme.example")["last_open_at"] is None
    events.record_reply(db, delivery_id=None, at="2026-01-02T10:00:00+00:00", **base)
    got = events.events_of_email(db, made["email_id"])
    assert [(e["kind"], e["inferred"], e["verdict"]) for e in got] == [
        ("open", 0, "machine"),
        ("reply", 0, "human"),
        ("open", 1, "human"),
    ]


def test_relabel_moves_inferred_open_and_recomputes_contact(db, sent):
    made = sent()
    d = made["deliveries"][0]
    ids = events.insert_event(
        db,
        {
            "kind": "click",
            "at": "2026-01-02T09:00:00+00:00",
            "email_id": made["email_id"],
            "delivery_id": d,
            "contact_id": made["contacts"][0],
            "link_id": made["links"][0],
            "verdict": "human",
            "reason": "human",
        },
    )
    assert len(ids) == 2
    assert store_contacts.find_contact(db, "bob@acme.example")["last_click_at"]
    changed = events.relabel(db, [ids[0]], "machine", "link_burst")
    assert {c["id"] for c in changed} == set(ids)
    assert {e["verdict"] for e in events.events_of_delivery(db, d)} == {"machine"}
    contact = store_contacts.find_contact(db, "bob@acme.example")
    assert contact["last_click_at"] is None and contact["last_engagement_at"] is None
