"""Emails as stored: the dedup key shared by relay and ingest."""

from __future__ import annotations

import hashlib
import re

import sqlite_utils

from store.sql import row

_ANGLE = re.compile(r"<([^<>]*)>")


def normalize_message_id(message_id: str | None) -> str | None:
    """``<Abc@Example.COM>`` → ``Abc@example.com``: brackets, spaces and domain case ignored."""
    if not message_id:
        return None
    text = message_id.strip()
    found = _ANGLE.search(text)
    if found:
        text = found.group(1)
    text = "".join(text.split())
    if not text:
        return None
    local, at, domain = text.rpartition("@")
    return f"{local}@{domain.lower()}" if at else text


def message_key(message_id: str | None, content: bytes) -> str:
    """The unique key of an email: its normalised Message-ID, else a hash of its content."""
    normalized = normalize_message_id(message_id)
    if normalized:
        return "mid:" + normalized
    return "sha256:" + hashlib.sha256(content).hexdigest()


def find_email(db: sqlite_utils.Database, key: str) -> dict | None:
    """The stored email with this key, or None."""
    return row(db, "SELECT * FROM emails WHERE message_key = ?", [key])
