"""Network lists for the verdict rules: shipped data files, local updates, fast lookup.

Lists ship in ``tracker/data/`` with their source and licence in a header; ``mailtally
tracker-data update`` installs a fresher copy under ``{data_dir}/tracker-data/`` which then
takes precedence. Nothing is fetched at runtime. Apple's full egress list has hundreds of
thousands of prefixes, so lookups use merged integer ranges and bisection, not a scan.
"""

from __future__ import annotations

import bisect
import datetime as dt
import ipaddress
import json
import os
import socket
import urllib.request
from collections.abc import Iterable
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"

NETWORK_LISTS = {
    "apple-relay": "apple_relay.txt",
    "microsoft-eop": "microsoft_eop.txt",
    "scanner-networks": "scanner_networks.txt",
}
SOURCES = {
    "apple-relay": "https://mask-api.icloud.com/egress-ip-ranges.csv",
    "microsoft-eop": "https://endpoints.office.com/endpoints/worldwide?clientrequestid="
    "b10c5ed1-bad1-445f-b386-b919946339a7",
    "scanner-networks": "",
}


SEEN_KEPT = 65_536  # addresses whose answer a NetworkSet keeps (then starts over)


class NetworkSet:
    """A set of IPv4/IPv6 networks answering ``ip in set`` in O(log n)."""

    def __init__(self, networks: Iterable[str] = ()) -> None:
        spans: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for text in networks:
            net = ipaddress.ip_network(text, strict=False)
            spans[net.version].append((int(net.network_address), int(net.broadcast_address)))
        self._starts: dict[int, list[int]] = {}
        self._ends: dict[int, list[int]] = {}
        self.size = 0
        for version, items in spans.items():
            merged: list[list[int]] = []
            for start, end in sorted(items):
                if merged and start <= merged[-1][1] + 1:
                    merged[-1][1] = max(merged[-1][1], end)
                else:
                    merged.append([start, end])
            self._starts[version] = [s for s, _ in merged]
            self._ends[version] = [e for _, e in merged]
            self.size += len(items)
        # Answers by address text: a hit is looked up in several sets, and most come from a
        # few addresses (mail providers' proxies, offices); the sets never change.
        self._seen: dict[object, bool] = {}

    def __contains__(self, ip: object) -> bool:
        if not self.size:
            return False
        seen = self._seen
        answer = seen.get(ip)
        if answer is None:
            answer = self._lookup(ip)
            if len(seen) >= SEEN_KEPT:
                seen.clear()
            seen[ip] = answer
        return answer

    def _lookup(self, ip: object) -> bool:
        found = _address(str(ip))
        if found is None:
            return False
        version, value = found
        starts = self._starts[version]
        i = bisect.bisect_right(starts, value) - 1
        return i >= 0 and value <= self._ends[version][i]

    def __len__(self) -> int:
        return self.size


_MAPPED = b"\0" * 10 + b"\xff\xff"


def _address(text: str) -> tuple[int, int] | None:
    """(version, integer) of an address; IPv4-mapped IPv6 counts as IPv4.

    ``inet_pton`` takes about a microsecond where ``ipaddress.ip_address`` takes 15 and
    every hit is looked up in several sets; anything it refuses (a scope id, garbage) goes
    the slow way.
    """
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text))
    except OSError:
        pass
    try:
        packed = socket.inet_pton(socket.AF_INET6, text)
    except OSError:
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            return None
        if addr.version == 6 and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return addr.version, int(addr)
    if packed[:12] == _MAPPED:
        return 4, int.from_bytes(packed[12:])
    return 6, int.from_bytes(packed)


def parse_networks(text: str) -> list[str]:
    """Networks from a data file: one per line (first CSV column), ``#`` comments, or the
    Microsoft 365 endpoints JSON (the Exchange set that receives mail on port 25: EOP)."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        out = []
        for entry in json.loads(stripped):
            ports = str(entry.get("tcpPorts", "")).split(",")
            if entry.get("serviceArea") == "Exchange" and "25" in ports:
                out += [str(ipaddress.ip_network(n, strict=False)) for n in entry.get("ips", [])]
        return out
    out = []
    for line in text.splitlines():
        field = line.split("#", 1)[0].split(",", 1)[0].strip()
        if not field:
            continue
        try:
            out.append(str(ipaddress.ip_network(field, strict=False)))
        except ValueError:
            continue  # a CSV header or a malformed row
    return out


def list_path(name: str, data_dir: Path | None) -> Path:
    """The file in use for a list: a local update if there is one, else the shipped file."""
    if data_dir is not None:
        local = Path(data_dir) / "tracker-data" / NETWORK_LISTS[name]
        if local.is_file():
            return local
    return DATA_DIR / NETWORK_LISTS[name]


def load_networks(name: str, data_dir: Path | None = None) -> NetworkSet:
    return NetworkSet(parse_networks(list_path(name, data_dir).read_text(encoding="utf-8")))


def load_patterns(filename: str = "scanner_user_agents.txt") -> list[str]:
    """Regular expressions from a shipped data file (comments and blank lines skipped)."""
    text = (DATA_DIR / filename).read_text(encoding="utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def update(name: str, data_dir: Path, source: str | None = None, timeout: float = 60.0) -> dict:
    """Fetch (URL) or read (file) a list, check it, and install it under ``data_dir``.

    Refuses an empty result so that a broken download never disables a rule.
    """
    if name not in NETWORK_LISTS:
        raise ValueError(f"unknown list {name!r}: expected one of {', '.join(NETWORK_LISTS)}")
    source = source or SOURCES[name]
    if not source:
        raise ValueError(f"{name} has no public machine-readable source: pass --source FILE")
    if source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source, timeout=timeout) as response:  # noqa: S310
            text = response.read().decode("utf-8", "replace")
    else:
        text = Path(source).read_text(encoding="utf-8")
    networks = parse_networks(text)
    if not networks:
        raise ValueError(f"no networks found in {source}")
    target = Path(data_dir) / "tracker-data" / NETWORK_LISTS[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# {name}: installed by `mailtally tracker-data update` on "
        f"{dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}\n# Source: {source}\n"
    )
    tmp = target.with_suffix(".tmp")
    tmp.write_text(header + "\n".join(networks) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return {"list": name, "networks": len(networks), "path": str(target), "source": source}


def describe(data_dir: Path | None) -> list[dict]:
    """Which file each list comes from and how many networks it has."""
    return [
        {
            "list": name,
            "networks": len(load_networks(name, data_dir)),
            "path": str(list_path(name, data_dir)),
        }
        for name in NETWORK_LISTS
    ]
