"""Report JSON asserted exactly over a dataset made through store functions, plus the
table/CSV key facts, time zones, filters, and the summary tables' upkeep."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json

from store import contacts as store_contacts
from store import events as store_events
from store import reports
from tests.reports.conftest import Mt, T, World, hit

LOGGED = reports.LOGGED_REASON


def rec(address, opens=0, clicks=0, first=None, last=None, inferred=False, replied=False):
    return {
        "address": address,
        "opens": opens,
        "clicks": clicks,
        "first_open_at": first,
        "last_open_at": last,
        "inferred_open": inferred,
        "replied": replied,
    }


def entry(name, subject, sent, user, source, tracked, reason, opens, clicks, someone, recips):
    return {
        "message_id": f"<{name}@seller.example>",
        "subject": subject,
        "sent_at": T(sent),
        "user": user,
        "source": source,
        "tracked": {"opens": tracked[0], "clicks": tracked[1]},
        "untracked_reason": reason,
        "opens": opens,
        "clicks": clicks,
        "someone": {"opens": someone[0], "clicks": someone[1]},
        "recipients": recips,
    }


ALICE, DAVE = "alice@seller.example", "dave@seller.example"
BOB, CAROL, ERIN = "bob@acme.example", "carol@acme.example", "erin@beta.example"

EXPECTED = [
    entry(
        "e5",
        "Privacy",
        "2026-11-22 10:00",
        ALICE,
        "relay",
        (True, True),
        None,
        1,
        0,
        (1, 0),
        [rec(CAROL)],
    ),
    entry(
        "e3",
        "Notes",
        "2026-11-22 08:00",
        DAVE,
        "relay",
        (False, False),
        "plain_text",
        0,
        0,
        (0, 0),
        [rec(ERIN)],
    ),
    entry(
        "e2",
        "Team update",
        "2026-11-21 15:00",
        ALICE,
        "relay",
        (True, False),
        None,
        2,
        0,
        (2, 0),
        [],
    ),
    entry(
        "e1",
        "Proposal",
        "2026-11-20 09:00",
        ALICE,
        "relay",
        (True, True),
        None,
        3,
        1,
        (0, 0),
        [
            rec(BOB, 2, 0, T("2026-11-20 09:30"), T("2026-11-20 11:00")),
            rec(CAROL, 1, 1, T("2026-11-20 10:00"), T("2026-11-20 10:00"), True, True),
        ],
    ),
    entry(
        "e4",
        "Call recap",
        "2026-11-19 12:00",
        ALICE,
        "bcc",
        (False, False),
        LOGGED,
        0,
        0,
        (0, 0),
        [rec(BOB), rec(ERIN)],
    ),
]


def others(m_opens=0, m_clicks=0, m_reasons=None, s_opens=0, s_clicks=0, s_reasons=None):
    return {
        "machine": {"opens": m_opens, "clicks": m_clicks, "reasons": m_reasons or {}},
        "self": {"opens": s_opens, "clicks": s_clicks, "reasons": s_reasons or {}},
    }


def with_all_hits(expected: list[dict]) -> list[dict]:
    """EXPECTED plus the machine/self counts that --all-hits adds."""
    out = json.loads(json.dumps(expected))
    for e in out:
        e.update(others())
        e["someone"].update(others())
        for r in e["recipients"]:
            r.update(others())
    e2, e1 = out[2], out[3]
    e2.update(others(1, 0, {"gmail_prefetch": 1}))
    e2["someone"].update(others(1, 0, {"gmail_prefetch": 1}))
    e1.update(
        others(
            2,
            1,
            {"apple_mpp": 1, "safe_links": 1, "within_delivery_window": 1},
            1,
            0,
            {"sender_network": 1},
        )
    )
    e1["recipients"][0].update(
        others(2, 0, {"apple_mpp": 1, "within_delivery_window": 1}, 1, 0, {"sender_network": 1})
    )
    e1["recipients"][1].update(others(0, 1, {"safe_links": 1}))
    return out


def report_json(mt: Mt, *args: str) -> list[dict]:
    return json.loads(mt("report", "emails", "--format", "json", *args).output)


def test_emails_json_exact_human_only(mt: Mt, world: World) -> None:
    assert report_json(mt) == EXPECTED
    # The key order is part of the documented shape.
    assert list(report_json(mt)[0]) == list(EXPECTED[0])


def test_emails_json_exact_all_hits(mt: Mt, world: World) -> None:
    assert report_json(mt, "--all-hits") == with_all_hits(EXPECTED)


def test_machine_and_self_hits_never_count_as_human(mt: Mt, world: World) -> None:
    # A machine hit arriving later changes nothing in the default report…
    hit(
        mt.db,
        kind="open",
        at=T("2026-11-20 13:00"),
        email_id=world.emails["e1"],
        delivery_id=world.deliveries["e1_bob"],
        contact_id=world.contacts["bob"]["id"],
        verdict="machine",
        reason="scanner_ua",
    )
    assert report_json(mt) == EXPECTED
    # …and is counted, with its reason, under --all-hits.
    e1 = report_json(mt, "--all-hits")[3]
    assert e1["machine"]["opens"] == 3 and e1["machine"]["reasons"]["scanner_ua"] == 1
    assert e1["recipients"][0]["machine"]["reasons"] == {
        "apple_mpp": 1,
        "scanner_ua": 1,
        "within_delivery_window": 1,
    }


def test_relabelled_hits_move_between_human_and_machine(mt: Mt, world: World) -> None:
    """The tracker re-labels a burst after the fact: the report follows, inferred opens too."""
    click = [
        e["id"]
        for e in store_events.events_of_delivery(mt.db, world.deliveries["e1_carol"])
        if e["kind"] == "click" and e["verdict"] == "human"
    ]
    store_events.relabel(mt.db, click, "machine", "burst")
    e1 = report_json(mt, "--all-hits")[3]
    carol = e1["recipients"][1]
    # The inferred open followed its click; the reply stays a human reply.
    assert (carol["opens"], carol["clicks"], carol["inferred_open"], carol["replied"]) == (
        0,
        0,
        False,
        True,
    )
    assert carol["machine"] == {"opens": 1, "clicks": 2, "reasons": {"burst": 2, "safe_links": 1}}
    assert (e1["opens"], e1["clicks"]) == (2, 0)


def test_anonymous_privacy_mode_hits_are_someone_even_with_a_contact(mt: Mt, world: World):
    hit(
        mt.db,
        kind="click",
        at=T("2026-11-20 14:00"),
        email_id=world.emails["e1"],
        delivery_id=world.deliveries["e1_bob"],
        contact_id=world.contacts["bob"]["id"],
        link_id=world.links["e1"],
        anonymous=1,
    )
    e1 = report_json(mt)[3]
    assert e1["someone"] == {"opens": 0, "clicks": 1}
    assert e1["clicks"] == 2
    assert e1["recipients"][0] == EXPECTED[3]["recipients"][0]  # bob unchanged


def test_filters(mt: Mt, world: World) -> None:
    def ids(*args):
        return [e["message_id"][1:3] for e in report_json(mt, *args)]

    assert ids("--since", "2026-11-21T15:00:00+00:00") == ["e5", "e3", "e2"]
    assert ids("--since", "2026-11-21T15:00:01Z") == ["e5", "e3"]
    assert ids("--until", "2026-11-20T09:00:00+00:00") == ["e1", "e4"]  # includes the instant
    assert ids("--until", "2026-11-20T08:59:59+00:00") == ["e4"]
    assert ids("--since", "2026-11-20T10:00+01:00", "--until", "2026-11-21T16:00+01:00") == [
        "e2",
        "e1",
    ]
    assert ids("--user", "DAVE@seller.example") == ["e3"]
    assert ids("--user", ALICE, "--tracked") == ["e5", "e2", "e1"]
    assert ids("--untracked") == ["e3", "e4"]
    assert ids("--contact", ERIN) == ["e3", "e4"]
    assert ids("--contact", "Bob@Acme.example") == ["e1", "e4"]
    assert ids("--contact", "nobody@nowhere.example") == []
    assert ids("--limit", "2") == ["e5", "e3"]
    assert ids("--untracked", "--limit", "1") == ["e3"]
    # A filter narrows the list, never the entries: e1 keeps carol with --contact bob.
    assert report_json(mt, "--contact", BOB)[0] == EXPECTED[3]


def test_bad_filters_are_one_line_errors(mt: Mt, world: World) -> None:
    for args, text in (
        (("--since", "yesterday"), "invalid date 'yesterday'"),
        (("--until", "2026-13-01"), "invalid date"),
        (("--user", "nobody@seller.example"), "unknown user"),
    ):
        result = mt("report", "emails", *args, ok=False)
        assert result.exit_code != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and text in lines[0]


def test_dates_are_days_in_the_local_zone(mt: Mt, world: World) -> None:
    def ids(tz, *args):
        out = mt.run("report", "emails", "--format", "json", *args, tz=tz)
        return [e["message_id"][1:3] for e in json.loads(out)]

    # 2026-11-22 starts at 11-21 15:00 UTC in Tokyo and at 11-22 05:00 UTC in New York.
    assert ids("Asia/Tokyo", "--since", "2026-11-22") == ["e5", "e3", "e2"]
    assert ids("America/New_York", "--since", "2026-11-22") == ["e5", "e3"]
    # --until a day includes that whole local day.
    assert ids("America/New_York", "--until", "2026-11-20") == ["e1", "e4"]
    # One local day: e2 (11-21 15:00 UTC) is on the 21st in New York, the 22nd in Tokyo.
    assert ids("America/New_York", "--since", "2026-11-21", "--until", "2026-11-21") == ["e2"]
    assert ids("Asia/Tokyo", "--since", "2026-11-21", "--until", "2026-11-21") == []


def _local(utc: str, zone_offset_hours: int) -> str:
    moment = dt.datetime.fromisoformat(T(utc)) + dt.timedelta(hours=zone_offset_hours)
    if moment.year != dt.datetime.now().year:
        return f"{moment:%Y-%m-%d %H:%M}"
    return f"{moment:%b %d %H:%M}"


def fits_80(out: str) -> None:
    assert out.strip() and max(len(line) for line in out.splitlines()) <= 80


def test_table_shows_local_times_and_key_facts_in_80_columns(mt: Mt, world: World) -> None:
    fits_80(mt.run("report", "emails", tz="Asia/Tokyo"))
    fits_80(mt.run("report", "emails", "--all-hits"))
    tokyo = mt.run("report", "emails", tz="Asia/Tokyo", columns=200)
    york = mt.run("report", "emails", tz="America/New_York", columns=200)
    assert _local("2026-11-20 09:00", 9) in tokyo and _local("2026-11-20 09:00", -5) in york
    assert _local("2026-11-20 09:00", 9) not in york
    for out in (tokyo, york):
        for fact in (
            "Proposal",
            "Team update",
            "Call recap",
            "not tracked: plain_text",
            "not tracked: " + LOGGED,
            "Someone",
            "carol@acme.example ↩ replied",
            "1 inferred",
            "d ago",
            "alice@seller.example · relay",
        ):
            assert fact in out, fact
    assert "machine" not in tokyo
    every = mt.run("report", "emails", "--all-hits", columns=200)
    assert "machine 3 (apple_mpp 1, safe_links 1, within_delivery_window 1)" in every
    assert "self 1 (sender_network 1)" in every


def test_csv_has_one_row_per_recipient_and_someone(mt: Mt, world: World) -> None:
    rows = list(csv.DictReader(io.StringIO(mt("report", "emails", "--format", "csv").output)))
    got = [(r["message_id"][1:3], r["recipient"], r["opens"], r["clicks"]) for r in rows]
    assert got == [
        ("e5", CAROL, "0", "0"),
        ("e5", "Someone", "1", "0"),
        ("e3", ERIN, "0", "0"),
        ("e2", "Someone", "2", "0"),
        ("e1", BOB, "2", "0"),
        ("e1", CAROL, "1", "1"),
        ("e4", BOB, "0", "0"),
        ("e4", ERIN, "0", "0"),
    ]
    carol = rows[5]
    assert carol["inferred_open"] == "true" and carol["replied"] == "true"
    assert carol["first_open_at"] == T("2026-11-20 10:00")
    assert rows[2]["untracked_reason"] == "plain_text" and rows[2]["tracked_opens"] == "false"
    every = list(
        csv.DictReader(io.StringIO(mt("report", "emails", "--all-hits", "--format", "csv").output))
    )
    bob = next(r for r in every if r["message_id"] == "<e1@seller.example>")
    assert (bob["machine_opens"], bob["self_opens"]) == ("2", "1")
    assert bob["machine_reasons"] == "apple_mpp=1; within_delivery_window=1"


def test_empty_reports_say_so(mt: Mt) -> None:
    assert mt("report", "emails").output.strip() == "No emails yet."
    assert mt("report", "emails", "--format", "json").output.strip() == "[]"
    assert (
        mt("report", "emails", "--format", "csv")
        .output.splitlines()[0]
        .startswith("message_id,sent_at")
    )
    assert mt("report", "links").output.strip() == "No tracked links yet."
    out = mt("report", "emails", "--since", "2030-01-01").output.strip()
    assert out == "No emails match these filters."


def test_progress_bar_on_long_exports(mt: Mt, world: World) -> None:
    env = {"MAILTALLY_PROGRESS": "1", "MAILTALLY_PROGRESS_AFTER": "0"}
    result = mt("report", "emails", "--format", "json", env=env)
    assert "Exporting emails" in result.stderr
    assert json.loads(result.stdout) == EXPECTED
    quiet = mt("report", "emails", "--format", "json")
    assert quiet.stderr == ""


def test_links_report_exact(mt: Mt, world: World) -> None:
    link = {
        "message_id": "<e1@seller.example>",
        "subject": "Proposal",
        "sent_at": T("2026-11-20 09:00"),
        "user": ALICE,
        "position": 0,
        "url": "https://pricing.example.com/plans?a=1&b=2",
        "clicks": 1,
        "unique_clicks": 1,
        "someone_clicks": 0,
    }
    got = json.loads(mt("report", "links", "--format", "json").output)
    assert got == [link]
    # A second human click by carol and an anonymous one: 3 clicks, still 1 person, 1 Someone.
    for anonymous in (0, 1):
        hit(
            mt.db,
            kind="click",
            at=T("2026-11-20 15:00"),
            email_id=world.emails["e1"],
            delivery_id=world.deliveries["e1_carol"],
            contact_id=world.contacts["carol"]["id"],
            link_id=world.links["e1"],
            anonymous=anonymous,
        )
    got = json.loads(mt("report", "links", "--all-hits", "--format", "json").output)
    assert got == [
        {
            **link,
            "clicks": 3,
            "unique_clicks": 1,
            "someone_clicks": 1,
            "machine": {"clicks": 1, "reasons": {"safe_links": 1}},
            "self": {"clicks": 0, "reasons": {}},
        }
    ]
    fits_80(mt.run("report", "links"))
    table = mt.run("report", "links", columns=200)
    assert "pricing.example.com/plans?a=1&b=2" in table and "Proposal" in table


def test_users_report_exact(mt: Mt, world: World) -> None:
    got = json.loads(mt("report", "users", "--format", "json").output)
    assert got == [
        {
            "user": ALICE,
            "name": "Alice",
            "sent": 3,
            "logged": 1,
            "tracked": 3,
            "opened": 3,
            "clicked": 1,
            "replied": 1,
            "open_rate": 1.0,
            "click_rate": 0.5,
            "reply_rate": 0.3333,
            "machine_hits": 4,
            "self_hits": 1,
        },
        {
            "user": DAVE,
            "name": "Dave",
            "sent": 1,
            "logged": 0,
            "tracked": 0,
            "opened": 0,
            "clicked": 0,
            "replied": 0,
            "open_rate": None,
            "click_rate": None,
            "reply_rate": 0.0,
            "machine_hits": 0,
            "self_hits": 0,
        },
    ]
    period = json.loads(
        mt(
            "report", "users", "--since", "2026-11-21T00:00Z", "--user", ALICE, "--format", "json"
        ).output
    )
    assert period == [
        {
            "user": ALICE,
            "name": "Alice",
            "sent": 2,
            "logged": 0,
            "tracked": 2,
            "opened": 2,
            "clicked": 0,
            "replied": 0,
            "open_rate": 1.0,
            "click_rate": 0.0,
            "reply_rate": 0.0,
            "machine_hits": 1,
            "self_hits": 0,
        },
    ]
    fits_80(mt.run("report", "users"))
    table = " ".join(mt.run("report", "users").split())
    assert "alice@seller.example 3 1 3 100% 50% 33% 4" in table
    assert "dave@seller.example 1 0 0 - - 0% 0" in table


def test_contact_show_json_exact(mt: Mt, world: World) -> None:
    got = json.loads(mt("contacts", "show", CAROL, "--format", "json").output)
    created = got.pop("created_at")
    assert dt.datetime.fromisoformat(created).tzinfo is not None

    def item(at, kind, name, subject, detail=""):
        return {
            "at": T(at),
            "kind": kind,
            "subject": subject,
            "message_id": f"<{name}@seller.example>",
            "detail": detail,
        }

    assert got == {
        "email": CAROL,
        "name": "",
        "company": "acme.example",
        "company_name": "acme.example",
        "lawful_basis": "unknown",
        "source": "test",
        "last_open_at": T("2026-11-20 12:00"),
        "last_click_at": T("2026-11-20 10:00"),
        "last_reply_at": T("2026-11-20 12:00"),
        "last_engagement_at": T("2026-11-20 12:00"),
        "emails": 2,
        "opens": 1,
        "clicks": 1,
        "replies": 1,
        "deals": [],
        # Newest first; the anonymous open of e5 is not carol's.
        "timeline": [
            item("2026-11-22 10:00", "sent", "e5", "Privacy"),
            item("2026-11-20 12:00", "reply", "e1", "Proposal"),
            item("2026-11-20 10:00", "open", "e1", "Proposal", "inferred"),
            item(
                "2026-11-20 10:00",
                "click",
                "e1",
                "Proposal",
                "https://pricing.example.com/plans?a=1&b=2",
            ),
            item("2026-11-20 09:00", "sent", "e1", "Proposal"),
        ],
    }
    bob = json.loads(mt("contacts", "show", BOB, "--format", "json").output)
    # Machine and self hits are not engagement; logged mail is on the timeline.
    assert [(t["kind"], t["subject"]) for t in bob["timeline"]] == [
        ("open", "Proposal"),
        ("open", "Proposal"),
        ("sent", "Proposal"),
        ("logged", "Call recap"),
    ]
    assert bob["timeline"][-1]["detail"] == "bcc"


def test_contact_show_table(mt: Mt, world: World) -> None:
    mt("deals", "add", "Acme renewal", "--contact", CAROL)
    fits_80(mt.run("contacts", "show", CAROL, tz="Asia/Tokyo"))
    out = mt.run("contacts", "show", CAROL, tz="Asia/Tokyo", columns=200)
    flat = " ".join(out.split())
    for fact in (
        "carol@acme.example",
        "acme.example",
        "Acme renewal (open)",
        "unknown",
        "replied",
        "clicked",
        "opened",
        "sent",
        "Privacy",
        "pricing.example.com/plans?a=1&b=2",
        _local("2026-11-20 12:00", 9),
    ):
        assert fact in flat, fact
    with_nothing = mt.run("contacts", "show", "erin@beta.example")
    assert "Notes" in with_nothing and "Call recap" in with_nothing


def test_erased_contact_leaves_no_trace_in_reports(mt: Mt, world: World) -> None:
    store_contacts.forget(mt.db, CAROL)
    entries = {e["message_id"][1:3]: e for e in report_json(mt, "--all-hits")}
    # e5 stays (erasure deletes emails she was the only *logged* contact of), without her
    # copy, whose hits went with it.
    assert entries["e5"]["recipients"] == [] and entries["e5"]["someone"]["opens"] == 0
    e1 = entries["e1"]
    assert [r["address"] for r in e1["recipients"]] == [BOB]
    assert (e1["opens"], e1["clicks"], e1["machine"]["clicks"]) == (2, 0, 0)
    assert CAROL not in json.dumps(report_json(mt, "--all-hits"))
