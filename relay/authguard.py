"""AUTH defences of the submission server: failure limits and a cache of verified passwords.

scrypt is deliberately slow (tens of ms of CPU), which is what makes a stolen hash costly to
crack, but it also makes AUTH the most expensive thing a client can ask for:

- ``FailureLimiter`` counts failed AUTHs per client IP and per user name in a sliding
  window (``relay.auth_max_failures`` within ``relay.auth_window_seconds``). Past the limit
  AUTH is answered 454 without running scrypt, so guessing is slow and cannot burn the CPU.
- ``VerifiedCache`` remembers *successful* checks for a short time, so a mail client that
  opens a connection per message does not pay scrypt every time. The key is an HMAC (with a
  per-process random key) of the login, the password and the stored hash: the cache holds
  no password, and a changed password (a new stored hash) can never hit an old entry.
  Failures are never cached.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict, deque

LIMITED_REPLY = "454 4.7.0 Too many failed authentication attempts, try later"


class FailureLimiter:
    """Sliding-window count of failed AUTHs per client IP and per user name."""

    def __init__(self, max_failures: int, window: float, max_keys: int = 100_000) -> None:
        self.max_failures = max_failures
        self.window = window
        self.max_keys = max_keys
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _keys(ip: str | None, login: str | None) -> list[str]:
        keys = []
        if ip:
            keys.append("ip:" + ip)
        if login:
            keys.append("user:" + login.strip().lower())
        return keys

    def _recent(self, key: str, now: float) -> int:
        times = self._failures.get(key)
        if not times:
            return 0
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
            return 0
        return len(times)

    def blocked(self, ip: str | None, login: str | None) -> bool:
        """True when the address or the user name has reached the failure limit."""
        if self.max_failures <= 0:
            return False
        now = time.monotonic()
        with self._lock:
            return any(self._recent(k, now) >= self.max_failures for k in self._keys(ip, login))

    def failed(self, ip: str | None, login: str | None) -> None:
        """Count one failed check against the address and the user name."""
        now = time.monotonic()
        with self._lock:
            if len(self._failures) >= self.max_keys:
                self._prune(now)
            for key in self._keys(ip, login):
                self._failures.setdefault(key, deque()).append(now)

    def _prune(self, now: float) -> None:
        for key in list(self._failures):
            self._recent(key, now)
        while len(self._failures) >= self.max_keys:  # still full: forget the oldest keys
            self._failures.pop(next(iter(self._failures)))


class VerifiedCache:
    """Successful (login, password, stored hash) checks, remembered for ``ttl`` seconds."""

    def __init__(self, ttl: float = 120.0, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def _digest(self, login: str, password: str, stored_hash: str) -> bytes:
        msg = "\0".join((login.strip().lower(), password, stored_hash)).encode(
            "utf-8", "surrogatepass"
        )
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    def hit(self, login: str, password: str, stored_hash: str | None) -> bool:
        """True when this exact login/password was verified against this hash recently."""
        if not stored_hash:
            return False
        key = self._digest(login, password, stored_hash)
        now = time.monotonic()
        with self._lock:
            expires = self._entries.get(key)
            if expires is None:
                return False
            if expires <= now:
                del self._entries[key]
                return False
            return True

    def remember(self, login: str, password: str, stored_hash: str) -> None:
        key = self._digest(login, password, stored_hash)
        with self._lock:
            self._entries[key] = time.monotonic() + self.ttl
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
