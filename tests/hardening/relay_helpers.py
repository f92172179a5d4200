"""Helpers for the relay hardening tests (tests/hardening/test_relay_*.py): settings for a
relay that delivers to a test upstream, and its database with alice as the user."""

from __future__ import annotations

from pathlib import Path

import sqlite_utils

import cli
import config
import store
from store import users as store_users
from tests.relay.conftest import PASSWORD
from tests.support import free_port


def relay_settings(tmp_path: Path, upstream_port: int) -> config.Settings:
    """A fresh data dir; the relay on a free port delivering to ``upstream_port`` on
    127.0.0.1 without STARTTLS, retrying after 1 s."""
    s = cli.initialise(tmp_path / "data")
    s.relay.listen = f"127.0.0.1:{free_port()}"
    s.tracker.base_url = "https://t.example"
    s.relay.retry_schedule = [1]
    s.relay.upstream = f"smtp://127.0.0.1:{upstream_port}"
    s.relay.upstream_starttls = False
    return s


def db_with_alice(settings: config.Settings) -> sqlite_utils.Database:
    """The relay's database with alice@corp.test (password ``PASSWORD``) as a user."""
    db = store.connect(settings.db_path)
    store_users.add_user(db, "alice@corp.test", "Alice", PASSWORD)
    return db
