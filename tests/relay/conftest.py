"""Shared fixtures for the relay tests: a fresh data directory with config and database."""

from __future__ import annotations

from pathlib import Path

import pytest

import cli
import store


@pytest.fixture
def settings(tmp_path: Path):
    """Fresh settings (real config file, real SQLite database) in a tmp dir."""
    return cli.initialise(tmp_path / "data")


@pytest.fixture
def db(settings):
    conn = store.connect(settings.db_path)
    yield conn
    conn.close()
