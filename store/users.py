"""Users, their relay passwords and their addresses (personal inbox, alias, team inbox)."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets

import sqlite_utils

from store.addresses import is_valid, normalize
from store.db import StoreError, now_iso
from store.sql import row, rows, transaction

KINDS = ("personal", "alias", "team")
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


def hash_password(password: str) -> str:
    """scrypt hash in a self-describing form ``scrypt$n$r$p$salt$hash``."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    b64 = base64.b64encode
    return "scrypt${n}${r}${p}$".format(**_SCRYPT) + f"{b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str | None) -> bool:
    """Constant-time check of a password against a stored scrypt hash."""
    if not stored:
        return False
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        computed = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=32,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(computed, base64.b64decode(digest))


def _checked(address: str) -> str:
    addr = normalize(address)
    if not is_valid(addr):
        raise StoreError(f"invalid email address: {address!r}")
    return addr


def add_user(db: sqlite_utils.Database, email: str, name: str, password: str | None) -> dict:
    """Create a user; the account email must be unique."""
    addr = _checked(email)
    with transaction(db):
        if row(db, "SELECT id FROM users WHERE email = ?", [addr]):
            raise StoreError(f"user already exists: {addr}")
        db.execute(
            "INSERT INTO users (email, name, password_hash, created_at) VALUES (?, ?, ?, ?)",
            [addr, name, hash_password(password) if password else None, now_iso()],
        )
    return get_user(db, addr)


def find_user(db: sqlite_utils.Database, email: str) -> dict | None:
    """The user whose account email is ``email``, or None."""
    return row(db, "SELECT * FROM users WHERE email = ?", [normalize(email)])


def get_user(db: sqlite_utils.Database, email: str) -> dict:
    """The user with this account email, or StoreError."""
    user = find_user(db, email)
    if user is None:
        raise StoreError(f"unknown user: {normalize(email)}")
    return user


def user_by_id(db: sqlite_utils.Database, user_id: int) -> dict | None:
    return row(db, "SELECT * FROM users WHERE id = ?", [user_id])


def list_users(db: sqlite_utils.Database) -> list[dict]:
    """Every user with their address count and tracking defaults."""
    return rows(
        db,
        """SELECT u.id, u.email, u.name, u.track_opens, u.track_clicks, u.log_sent,
                  u.password_hash IS NOT NULL AS has_password, u.created_at,
                  (SELECT COUNT(*) FROM user_addresses a WHERE a.user_id = u.id) AS addresses
           FROM users u ORDER BY u.email""",
    )


def remove_user(db: sqlite_utils.Database, email: str) -> None:
    """Delete a user and their addresses; their emails stay, unattributed."""
    user = get_user(db, email)
    with transaction(db):
        db.execute("DELETE FROM users WHERE id = ?", [user["id"]])


def set_password(db: sqlite_utils.Database, email: str, password: str) -> None:
    user = get_user(db, email)
    with transaction(db):
        db.execute(
            "UPDATE users SET password_hash = ? WHERE id = ?",
            [hash_password(password), user["id"]],
        )


def authenticate(db: sqlite_utils.Database, login: str, password: str) -> dict | None:
    """The user whose account email is ``login`` if the password matches, else None."""
    return check_password(find_user(db, login), password)


def check_password(user: dict | None, password: str) -> dict | None:
    """``user`` (a row found by :func:`find_user`) if the password is theirs, else None."""
    if user is None:
        # Spend the same time as a real check so that user names cannot be probed.
        verify_password(password, _dummy_hash())
        return None
    return user if verify_password(password, user["password_hash"]) else None


@functools.cache
def _dummy_hash() -> str:
    """A throwaway hash, made on first use so that CLI start-up does not pay for scrypt."""
    return hash_password(secrets.token_hex(8))


def set_defaults(
    db: sqlite_utils.Database,
    email: str,
    opens: bool | None = None,
    clicks: bool | None = None,
    log: bool | None = None,
) -> dict:
    """Change a user's tracking/logging defaults; unset values are kept."""
    user = get_user(db, email)
    changes = {"track_opens": opens, "track_clicks": clicks, "log_sent": log}
    changes = {k: int(v) for k, v in changes.items() if v is not None}
    if changes:
        with transaction(db):
            sets = ", ".join(f"{k} = ?" for k in changes)
            db.execute(f"UPDATE users SET {sets} WHERE id = ?", [*changes.values(), user["id"]])
    return get_user(db, email)


def add_address(db: sqlite_utils.Database, email: str, address: str, kind: str) -> dict:
    """Connect an address to a user. A team inbox can be connected by one user only."""
    if kind not in KINDS:
        raise StoreError(f"invalid kind {kind!r}: expected one of {', '.join(KINDS)}")
    user = get_user(db, email)
    addr = _checked(address)
    with transaction(db):
        existing = rows(db, "SELECT user_id, kind FROM user_addresses WHERE address = ?", [addr])
        if any(e["user_id"] == user["id"] for e in existing):
            raise StoreError(f"{addr} is already an address of {user['email']}")
        if kind == "team" and any(e["kind"] == "team" for e in existing):
            raise StoreError(f"team inbox {addr} is already connected by another user")
        db.execute(
            "INSERT INTO user_addresses (user_id, address, kind, created_at) VALUES (?, ?, ?, ?)",
            [user["id"], addr, kind, now_iso()],
        )
    return {"user": user["email"], "address": addr, "kind": kind}


def remove_address(db: sqlite_utils.Database, email: str, address: str) -> None:
    user = get_user(db, email)
    addr = normalize(address)
    with transaction(db):
        cur = db.execute(
            "DELETE FROM user_addresses WHERE user_id = ? AND address = ?", [user["id"], addr]
        )
    if cur.rowcount == 0:
        raise StoreError(f"{addr} is not an address of {user['email']}")


def addresses_of(db: sqlite_utils.Database, user_id: int) -> list[dict]:
    """A user's addresses, the account email first (kind ``account``)."""
    return rows(
        db,
        """SELECT email AS address, 'account' AS kind FROM users WHERE id = ?
           UNION ALL
           SELECT address, kind FROM (
               SELECT address, kind FROM user_addresses WHERE user_id = ? ORDER BY address)""",
        [user_id, user_id],
    )


def owners_of(db: sqlite_utils.Database, address: str) -> list[dict]:
    """Every (user_id, user email, kind) that claims ``address``: account or connected."""
    return rows(
        db,
        """SELECT id AS user_id, email AS user_email, 'account' AS kind FROM users
           WHERE email = :a
           UNION ALL
           SELECT a.user_id, u.email, a.kind FROM user_addresses a JOIN users u ON u.id = a.user_id
           WHERE a.address = :a""",
        {"a": normalize(address)},
    )


def is_user_address(db: sqlite_utils.Database, address: str) -> bool:
    """True when any user has this address (such recipients are never contacts)."""
    return bool(owners_of(db, address))
