"""Fixtures for the report tests: an initialised data directory and a known dataset.

The dataset is made through store functions only (store.records for rows as the relay
and ingest write them, store.events for hits as the tracker records them, with its
inferred opens and contact properties), at fixed times so that JSON can be asserted exactly.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import cli
import store
from store import contacts as store_contacts
from store import events as store_events
from store import records
from store import users as store_users
from tests.reports.paths import PASSWORD
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]


def T(text: str) -> str:
    """'2026-11-20 09:30' (UTC) in the stored form."""
    return store.to_iso(dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC))


class Mt:
    """Runs `mailtally --config <tmp>/config.toml ...` in-process, or in a subprocess."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.config = directory / "config.toml"
        self.settings = cli.initialise(directory)
        self.db = store.connect(self.settings.db_path)

    def __call__(self, *args: str, ok: bool = True, env: dict | None = None) -> Result:
        result = CliRunner().invoke(cli.main, ["--config", str(self.config), *args], env=env)
        if ok:
            assert result.exit_code == 0, (result.output, result.exception)
        return result

    def run(self, *args: str, tz: str = "UTC", columns: int = 80, env: dict | None = None) -> str:
        """The real command in a subprocess, with its own TZ (local-time rendering)."""
        import os

        done = subprocess.run(
            [sys.executable, "-m", "cli", "--config", str(self.config), *args],
            cwd=ROOT,
            env={**os.environ, "TZ": tz, "COLUMNS": str(columns), **(env or {})},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout


@pytest.fixture
def mt(tmp_path: Path):
    m = Mt(tmp_path / "data")
    yield m
    m.db.close()


@dataclass
class World:
    """What the standard dataset made, by name."""

    users: dict = field(default_factory=dict)
    contacts: dict = field(default_factory=dict)
    emails: dict = field(default_factory=dict)
    deliveries: dict = field(default_factory=dict)
    links: dict = field(default_factory=dict)


def hit(db, **event) -> list[int]:
    """A hit as the tracker records it (store.events.insert_event)."""
    event.setdefault("method", "GET")
    event.setdefault("verdict", "human")
    event.setdefault("reason", event["verdict"])
    return store_events.insert_event(db, event)


CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)


def build_world(db) -> World:
    """The standard dataset (all times UTC):

    E1 "Proposal"  relay, alice, 11-20 09:00, opens+clicks, copies to bob and carol, 1 link:
       bob: human opens 09:30 and 11:00, machine opens (within_delivery_window, apple_mpp),
       a self open; carol: human click 10:00 (→ inferred open), machine click (safe_links),
       reply 12:00.
    E2 "Team update" relay, alice, 11-21 15:00, opens only, ONE SHARED COPY: two human
       opens (Someone) and a machine open (gmail_prefetch).
    E3 "Notes" relay, dave, 11-22 08:00, plain text (not tracked), copy to erin.
    E4 "Call recap" BCC-logged by alice, 11-19 12:00, on bob and erin.
    E5 "Privacy" relay, alice, 11-22 10:00, copy to carol, one anonymous (privacy mode) open.
    """
    w = World()
    for email, name in (("alice@seller.example", "Alice"), ("dave@seller.example", "Dave")):
        w.users[name.lower()] = store_users.add_user(db, email, name, None)
    for addr in ("bob@acme.example", "carol@acme.example", "erin@beta.example"):
        contact, _ = store_contacts.ensure_contact(
            db, addr, source="test", company_domain=store.addresses.domain_of(addr)
        )
        w.contacts[addr.split("@")[0]] = contact
    store_contacts.set_basis(db, "bob@acme.example", "yes")
    alice, dave = w.users["alice"]["id"], w.users["dave"]["id"]
    c = {k: v["id"] for k, v in w.contacts.items()}

    def email(name, **kw):
        w.emails[name] = records.add_email(db, message_id=f"<{name}@seller.example>", **kw)
        return w.emails[name]

    def copy(name, email_id, who):
        addr = f"{who}@{'beta' if who == 'erin' else 'acme'}.example" if who else None
        w.deliveries[name] = records.add_delivery(
            db, email_id, addr, c.get(who), shared=who is None, created_at=None
        )
        return w.deliveries[name]

    e1 = email(
        "e1",
        user_id=alice,
        subject="Proposal",
        sent_at=T("2026-11-20 09:00"),
        track_opens=True,
        track_clicks=True,
        from_addr="alice@seller.example",
        to=["bob@acme.example", "carol@acme.example"],
    )
    d_bob, d_carol = copy("e1_bob", e1, "bob"), copy("e1_carol", e1, "carol")
    w.links["e1"] = records.add_link(db, e1, 0, "https://pricing.example.com/plans?a=1&b=2")
    common = {"email_id": e1, "ip": "203.0.113.7", "user_agent": CHROME}
    hit(db, kind="open", at=T("2026-11-20 09:30"), delivery_id=d_bob, contact_id=c["bob"], **common)
    hit(
        db,
        kind="open",
        at=T("2026-11-20 09:00:02"),
        delivery_id=d_bob,
        contact_id=c["bob"],
        verdict="machine",
        reason="within_delivery_window",
        **common,
    )
    hit(
        db,
        kind="open",
        at=T("2026-11-20 09:05"),
        delivery_id=d_bob,
        contact_id=c["bob"],
        verdict="machine",
        reason="apple_mpp",
        **common,
    )
    hit(
        db,
        kind="open",
        at=T("2026-11-20 09:10"),
        delivery_id=d_bob,
        contact_id=c["bob"],
        verdict="self",
        reason="sender_network",
        **common,
    )
    hit(db, kind="open", at=T("2026-11-20 11:00"), delivery_id=d_bob, contact_id=c["bob"], **common)
    hit(
        db,
        kind="click",
        at=T("2026-11-20 10:00"),
        delivery_id=d_carol,
        contact_id=c["carol"],
        link_id=w.links["e1"],
        **common,
    )
    hit(
        db,
        kind="click",
        at=T("2026-11-20 09:00:03"),
        delivery_id=d_carol,
        contact_id=c["carol"],
        link_id=w.links["e1"],
        verdict="machine",
        reason="safe_links",
        **common,
    )
    store_events.record_reply(
        db, email_id=e1, delivery_id=d_carol, contact_id=c["carol"], at=T("2026-11-20 12:00")
    )

    e2 = email(
        "e2",
        user_id=alice,
        subject="Team update",
        sent_at=T("2026-11-21 15:00"),
        track_opens=True,
        to=["bob@acme.example", "carol@acme.example"],
    )
    shared = copy("e2_shared", e2, None)
    for at in ("2026-11-21 16:00", "2026-11-21 16:30"):
        hit(db, kind="open", at=T(at), email_id=e2, delivery_id=shared)
    hit(
        db,
        kind="open",
        at=T("2026-11-21 15:00:01"),
        email_id=e2,
        delivery_id=shared,
        verdict="machine",
        reason="gmail_prefetch",
    )

    e3 = email(
        "e3",
        user_id=dave,
        subject="Notes",
        sent_at=T("2026-11-22 08:00"),
        untracked_reason="plain_text",
        to=["erin@beta.example"],
    )
    copy("e3_erin", e3, "erin")

    e4 = email(
        "e4",
        source="bcc",
        user_id=alice,
        subject="Call recap",
        sent_at=T("2026-11-19 12:00"),
        to=["bob@acme.example", "erin@beta.example"],
    )
    records.link_contact(db, e4, c["bob"])
    records.link_contact(db, e4, c["erin"], "cc")

    e5 = email(
        "e5",
        user_id=alice,
        subject="Privacy",
        sent_at=T("2026-11-22 10:00"),
        track_opens=True,
        track_clicks=True,
        to=["carol@acme.example"],
    )
    d5 = copy("e5_carol", e5, "carol")
    hit(db, kind="open", at=T("2026-11-22 10:30"), email_id=e5, delivery_id=d5, anonymous=1)
    return w


@pytest.fixture
def world(mt: Mt) -> World:
    return build_world(mt.db)


# --- real servers (relay, ingest, tracker) ----------------------------------------------


@pytest.fixture
def settings(tmp_path: Path):
    s = cli.initialise(tmp_path / "data")
    s.relay.listen = f"127.0.0.1:{free_port()}"
    s.ingest.listen = f"127.0.0.1:{free_port()}"
    port = free_port()
    s.tracker.listen = f"127.0.0.1:{port}"
    s.tracker.base_url = f"http://127.0.0.1:{port}"
    return s


@pytest.fixture
def db(settings):
    conn = store.connect(settings.db_path)
    store_users.add_user(conn, "alice@seller.test", "Alice", PASSWORD)
    yield conn
    conn.close()


@pytest.fixture
async def services(settings, db):
    from ingest import service as ingest_service
    from relay import service as relay_service

    running = [await relay_service.start(settings), await ingest_service.start(settings)]
    yield running
    for svc in reversed(running):
        await svc.stop()
