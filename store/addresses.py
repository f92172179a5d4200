"""Email address normalisation and validation shared by every component."""

from __future__ import annotations

import re
from email.utils import getaddresses, parseaddr

_ADDRESS = re.compile(
    r"^[^@\s<>()\[\],;:\"]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*$"
)


def normalize(address: str) -> str:
    """Lower-cased bare address (``"Bob" <Bob@X.com>`` → ``bob@x.com``)."""
    _, bare = parseaddr(address)
    return (bare or address).strip().lower()


def is_valid(address: str) -> bool:
    """A plausible ``local@domain`` address (what a CRM would accept as a contact)."""
    return bool(_ADDRESS.match(address)) and len(address) <= 320


def domain_of(address: str) -> str:
    """The lower-cased domain part."""
    return address.rpartition("@")[2].lower()


def parse_list(*values: str | None) -> list[tuple[str, str]]:
    """(name, normalised address) pairs from header values, invalid ones dropped, order kept."""
    seen: set[str] = set()
    out = []
    for name, addr in getaddresses([v for v in values if v]):
        addr = addr.strip().lower()
        if is_valid(addr) and addr not in seen:
            seen.add(addr)
            out.append((name.strip(), addr))
    return out


def domain_covers(entry_domain: str, domain: str) -> bool:
    """``example.com`` covers ``example.com`` and ``sub.example.com``, not ``badexample.com``."""
    entry_domain, domain = entry_domain.lower().strip("."), domain.lower().strip(".")
    return domain == entry_domain or domain.endswith("." + entry_domain)
