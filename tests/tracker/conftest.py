"""Fixtures for the tracker tests: real config and SQLite file, sent copies made through
store/, a real tracker service on a free loopback port."""

from __future__ import annotations

import datetime as dt

import pytest

import cli
import store
from store import contacts as store_contacts
from store import tracking
from store import users as store_users
from tests.support import free_port
from tracker import service, tokens


@pytest.fixture
def settings(tmp_path):
    s = cli.initialise(tmp_path / "data")
    port = free_port()
    s.tracker.listen = f"127.0.0.1:{port}"
    s.tracker.base_url = f"http://127.0.0.1:{port}"
    return s


@pytest.fixture
def db(settings):
    database = store.connect(settings.db_path)
    yield database
    database.close()


HOUR_AGO = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat()


@pytest.fixture
def sent(db):
    """Make a sent email: sent(recipients=[...], links=[...], basis=..., shared=...)."""
    user = store_users.add_user(db, "alice@seller.example", "Alice", None)

    def make(
        recipients=("bob@acme.example",),
        links=("https://pricing.example.com/plans?a=1&b=2#top",),
        subject="Proposal",
        shared=False,
        basis="unknown",
        delivered_at=HOUR_AGO,
        user_id=None,
    ):
        pairs = []
        for addr in recipients:
            contact, _ = store_contacts.ensure_contact(db, addr)
            if basis != "unknown":
                store_contacts.set_basis(db, addr, basis)
            pairs.append((addr, contact["id"]))
        made = tracking.add_sent_email(
            db,
            user_id=user_id or user["id"],
            subject=subject,
            recipients=pairs,
            links=list(links),
            shared=shared,
            delivered_at=delivered_at,
            from_addr=user["email"],
        )
        made["contacts"] = [cid for _, cid in pairs]
        made["user"] = user
        return made

    return make


@pytest.fixture
async def tracker(settings):
    """A running tracker service; yields (service, base_url, signer)."""
    svc = await service.start(settings)
    yield svc, settings.tracker.base_url, tokens.Signer(settings.tracker.secrets)
    await svc.stop()
