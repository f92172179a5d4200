"""Fixtures for the tracker tests: a real SQLite file and sent copies made through store/."""

from __future__ import annotations

import pytest

import store
from store import contacts as store_contacts
from store import tracking
from store import users as store_users


@pytest.fixture
def db(tmp_path):
    database = store.connect(tmp_path / "mailtally.db")
    yield database
    database.close()


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
        delivered_at=None,
    ):
        pairs = []
        for addr in recipients:
            contact, _ = store_contacts.ensure_contact(db, addr)
            if basis != "unknown":
                store_contacts.set_basis(db, addr, basis)
            pairs.append((addr, contact["id"]))
        made = tracking.add_sent_email(
            db,
            user_id=user["id"],
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
