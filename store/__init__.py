"""The SQLite store: schema, migrations and every query mailtally runs.

Nothing outside this package writes SQL. Functions take a ``sqlite_utils.Database``
first, so that a PostgreSQL backend could replace them one module at a time.
"""

from store import addresses
from store.db import StoreError, connect, now_iso, to_iso

__all__ = ["StoreError", "addresses", "connect", "now_iso", "to_iso"]
