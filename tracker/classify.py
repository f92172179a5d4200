"""Human, machine or self: the verdict on one hit, with the reason code of the rule.

A pure function over a description of the request, the copy it hit, the copy's recent
hits and the rule data (networks, user-agent lists). No I/O, no clock: the batch writer
gathers the inputs, so the rules can be tested as a table. The first rule that applies
decides; burst rules also name earlier hits that must be re-labelled as machines.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

import crawleruseragents

from tracker.netdata import NetworkSet

HUMAN, MACHINE, SELF = "human", "machine", "self"

# Reason codes, in rule order: the README's table is generated from the same wording.
REASONS: dict[str, tuple[str, str]] = {
    "self_network": (SELF, "client address in tracker.sender_networks (the users' own)"),
    "head_request": (MACHINE, "HEAD request: a link checker, never a person"),
    "prefetch_header": (MACHINE, "Sec-Purpose / Purpose / X-Moz / X-Purpose says prefetch"),
    "honeypot": (MACHINE, "the hidden honeypot link no person can see was followed"),
    "honeypot_client": (MACHINE, "same client followed this copy's honeypot link (30 s)"),
    "empty_user_agent": (MACHINE, "no User-Agent header"),
    "gmail_prefetch": (MACHINE, "GoogleImageProxy fetch within the delivery window"),
    "google_image_proxy": (HUMAN, "Gmail's image proxy fetching for a person opening the mail"),
    "outlook_image_proxy": (HUMAN, "Outlook client or Outlook's image proxy opening the mail"),
    "yahoo_image_proxy": (HUMAN, "Yahoo Mail's image proxy fetching for a reader"),
    "apple_mpp_user_agent": (MACHINE, "bare `Mozilla/5.0`: Apple Mail Privacy Protection"),
    "apple_relay_network": (MACHINE, "open from Apple's relay egress addresses (MPP prefetch)"),
    "microsoft_defender_network": (MACHINE, "Microsoft Defender Safe Links / EOP ranges"),
    "scanner_network": (MACHINE, "a mail security gateway's network (Proofpoint, Mimecast...)"),
    "headless_browser": (MACHINE, "headless or automated browser (HeadlessChrome, PhantomJS...)"),
    "http_library": (MACHINE, "HTTP library or command-line client (curl, python-requests...)"),
    "scanner_user_agent": (MACHINE, "crawler/scanner user agent (crawler-user-agents list)"),
    "delivery_window": (MACHINE, "within tracker.machine_window_seconds after delivery"),
    "link_burst": (MACHINE, "all links of the copy (2+, or 3+ different) within ~2 s"),
    "address_burst": (MACHINE, "3 or more client addresses on one copy within 30 s"),
    "human": (HUMAN, "none of the rules above applied"),
}

AGENT_CACHE_SIZE = 4096
AGENT_CACHE_CHARS = 512

_PREFETCH = re.compile(r"prefetch|prerender|preview", re.I)
_HEADLESS = re.compile(
    r"HeadlessChrome|PhantomJS|SlimerJS|Puppeteer|Playwright|Selenium|webdriver|"
    r"Electron/.*Headless|HtmlUnit|jsdom",
    re.I,
)
_LIBRARY = re.compile(
    r"^(curl|Wget|python-requests|python-urllib|Python-urllib|aiohttp|httpx|Go-http-client|"
    r"okhttp|Java/|Apache-HttpClient|libwww-perl|node-fetch|axios|undici|Ruby|"
    r"PycURL|Dart/|reqwest|HTTPie|PostmanRuntime|Faraday|GuzzleHttp|lua-resty-http)"
    r"|\b(python-requests|Go-http-client|okhttp|Apache-HttpClient|libcurl)\b",
    re.I,
)
_GOOGLE_PROXY = re.compile(r"GoogleImageProxy", re.I)
_OUTLOOK = re.compile(
    r"OutlookImageProxy|ms-office|MSOffice|Microsoft Outlook|Outlook-iOS|Outlook-Android|"
    r"OneOutlook|Outlook-Express",
    re.I,
)
_YAHOO_PROXY = re.compile(r"YahooMailProxy", re.I)


class Hit(NamedTuple):
    """One request as the tracker saw it (named tuples here: one of each is made per hit)."""

    kind: str  # "open", "click" or "honeypot"
    method: str
    user_agent: str
    ip: str
    at: float  # seconds since the epoch
    headers: Mapping[str, str] = MappingProxyType({})  # lower-case names
    position: int | None = None


@dataclass(frozen=True)
class Copy:
    """What the rules need to know about the copy that was hit."""

    delivered_at: float | None = None
    link_count: int = 0


class Prior(NamedTuple):
    """An earlier hit of the same copy (within the burst window). A named tuple: the writer
    makes one per earlier hit per hit, and a frozen dataclass costs several times more."""

    id: int | None
    kind: str  # "open" or "click"
    at: float
    ip: str | None
    verdict: str
    reason: str
    position: int | None = None


class Verdict(NamedTuple):
    verdict: str
    reason: str
    relabel: tuple[int, ...] = ()  # earlier hits that are machines after all


# The verdict of each rule when it re-labels nothing (the usual case), made once.
_PLAIN = {reason: Verdict(verdict, reason) for reason, (verdict, _) in REASONS.items()}


class Rules:
    """The data the rules use: networks, user-agent lists and the configured windows."""

    def __init__(
        self,
        *,
        sender_networks: NetworkSet | None = None,
        apple: NetworkSet | None = None,
        microsoft: NetworkSet | None = None,
        scanners: NetworkSet | None = None,
        scanner_user_agents: Sequence[str] = (),
        machine_window_seconds: float = 5.0,
        link_burst_seconds: float = 2.0,
        address_burst_seconds: float = 30.0,
        address_burst_count: int = 3,
    ) -> None:
        self.sender_networks = sender_networks or NetworkSet()
        self.apple = apple or NetworkSet()
        self.microsoft = microsoft or NetworkSet()
        self.scanners = scanners or NetworkSet()
        self.scanner_ua = (
            re.compile("|".join(f"(?:{p})" for p in scanner_user_agents), re.I)
            if scanner_user_agents
            else None
        )
        # Per-agent verdicts, cached (agents longer than AGENT_CACHE_CHARS are not kept).
        self._agents = functools.lru_cache(maxsize=AGENT_CACHE_SIZE)(
            functools.partial(_agent_verdicts, rules=self)
        )
        self.window = machine_window_seconds
        self.link_burst_seconds = link_burst_seconds
        self.address_burst_seconds = address_burst_seconds
        self.address_burst_count = address_burst_count

    def agent(self, ua: str) -> tuple[str | None, str | None]:
        """:func:`_agent_verdicts` of ``ua``, from the cache when it has been seen."""
        if len(ua) > AGENT_CACHE_CHARS:
            return _agent_verdicts(ua, self)
        return self._agents(ua)

    @property
    def lookback_seconds(self) -> float:
        """How far back the writer must fetch a copy's hits for the burst rules."""
        return max(self.link_burst_seconds, self.address_burst_seconds)


def _is_crawler(ua: str, rules: Rules) -> bool:
    if rules.scanner_ua is not None and rules.scanner_ua.search(ua):
        return True
    return crawleruseragents.is_crawler(ua)


def _agent_verdicts(ua: str, rules: Rules) -> tuple[str | None, str | None]:
    """What the user agent alone says: (image proxy reason, headless/library/crawler reason).

    The crawler list is some 1,500 regular expressions (about 1 ms per user agent), and
    mail clients send few distinct user agents, so :class:`Rules` caches this per agent.
    """
    if _HEADLESS.search(ua):
        agent = "headless_browser"
    elif _LIBRARY.search(ua):
        agent = "http_library"
    elif _is_crawler(ua, rules):
        agent = "scanner_user_agent"
    else:
        agent = None
    return _image_proxy(ua), agent


def _image_proxy(ua: str) -> str | None:
    if _GOOGLE_PROXY.search(ua):
        return "google_image_proxy"
    if _OUTLOOK.search(ua):
        return "outlook_image_proxy"
    if _YAHOO_PROXY.search(ua):
        return "yahoo_image_proxy"
    return None


def _prefetch(headers: Mapping[str, str]) -> bool:
    for name in ("sec-purpose", "purpose", "x-moz", "x-purpose"):
        if _PREFETCH.search(headers.get(name, "")):
            return True
    return False


def _verdict(reason: str, relabel: Sequence[int] = ()) -> Verdict:
    if not relabel:
        return _PLAIN[reason]
    return Verdict(REASONS[reason][0], reason, tuple(relabel))


class Seen:
    """Where a copy's earlier hits came from, for the two rules that ask about every earlier
    hit: per client address, when it last made a hit the address-burst rule counts and
    when it last fooled the honeypot. The writer keeps one per copy, updated as hits are
    added, so that a hit on a copy hit hundreds of times within the window does not look
    at each of them (a fifth of the writer's time under the tracker bench's load).
    :func:`classify` makes one from the earlier hits when it is given none."""

    __slots__ = ("addresses", "honeypots")

    def __init__(self, priors: Sequence[Prior] = ()) -> None:
        self.addresses: dict[str, float] = {}
        self.honeypots: dict[str | None, float] = {}
        for p in priors:
            self.add(p)

    def add(self, p: Prior) -> None:
        """Count an earlier hit."""
        if p.ip and _distinct_client(p):
            if self.addresses.get(p.ip, -math.inf) < p.at:
                self.addresses[p.ip] = p.at
        if p.reason == "honeypot" and self.honeypots.get(p.ip, -math.inf) < p.at:
            self.honeypots[p.ip] = p.at


def classify(
    hit: Hit, copy: Copy, recent: Sequence[Prior], rules: Rules, seen: Seen | None = None
) -> Verdict:
    """The verdict on ``hit``; ``recent`` are the copy's earlier hits (those within
    :attr:`Rules.lookback_seconds` of it at least; every rule looks at their times) and
    ``seen`` a :class:`Seen` of them. The writer keeps both per copy, ``recent`` in time
    order; without ``seen`` they are made here."""
    if seen is None:
        recent = sorted(recent, key=_at)
        seen = Seen(recent)
    ua = hit.user_agent.strip()
    if hit.ip in rules.sender_networks:
        return _verdict("self_network")
    if hit.method.upper() == "HEAD":
        return _verdict("head_request")
    if _prefetch(hit.headers):
        return _verdict("prefetch_header")
    if hit.kind == "honeypot":
        window = hit.at - rules.address_burst_seconds
        fooled = [p.id for p in recent if p.ip == hit.ip and p.at >= window and p.id is not None]
        return _verdict("honeypot", relabel=[i for i in fooled if _human(recent, i)])
    fooled_at = seen.honeypots.get(hit.ip)
    if fooled_at is not None and hit.at - fooled_at <= rules.address_burst_seconds:
        return _verdict("honeypot_client")
    if not ua:
        return _verdict("empty_user_agent")
    since_delivery = hit.at - copy.delivered_at if copy.delivered_at is not None else None
    in_window = since_delivery is not None and since_delivery < rules.window
    proxy, agent = rules.agent(ua)
    if hit.kind != "open":
        proxy = None
    if proxy == "google_image_proxy" and in_window:
        return _verdict("gmail_prefetch")
    if proxy:
        return _verdict(proxy)
    if ua == "Mozilla/5.0":
        return _verdict("apple_mpp_user_agent")
    if hit.kind == "open" and hit.ip in rules.apple:
        return _verdict("apple_relay_network")
    if hit.ip in rules.microsoft:
        return _verdict("microsoft_defender_network")
    if hit.ip in rules.scanners:
        return _verdict("scanner_network")
    if agent:
        return _verdict(agent)
    if in_window:
        return _verdict("delivery_window")
    if hit.kind == "click" and hit.position is not None:
        start = hit.at - rules.link_burst_seconds
        burst = []
        for p in reversed(recent):  # in time order: only the last few are in the window
            if p.at < start:
                break
            if p.kind == "click" and p.position is not None:
                burst.append(p)
        burst.reverse()
        positions = {p.position for p in burst} | {hit.position}
        if len(positions) >= 2 and (len(positions) >= copy.link_count or len(positions) >= 3):
            return _verdict("link_burst", [p.id for p in burst if _counts(p)])
    start = hit.at - rules.address_burst_seconds
    # The distinct client addresses first: the common case is no burst, and it is decided
    # without building the list of the burst's hits.
    addresses = {ip for ip, at in seen.addresses.items() if at >= start}
    addresses.add(hit.ip)
    if len(addresses) >= rules.address_burst_count:
        burst = [p for p in recent if p.at >= start and p.ip and _distinct_client(p)]
        return _verdict("address_burst", [p.id for p in burst if _counts(p)])
    return _verdict("human")


def _counts(p: Prior) -> bool:
    """An earlier hit a burst re-labels: one still counted as human."""
    return p.id is not None and p.verdict == HUMAN


def _human(recent: Sequence[Prior], event_id: int) -> bool:
    return any(p.id == event_id and p.verdict == HUMAN for p in recent)


_PROXY_REASONS = frozenset({"google_image_proxy", "outlook_image_proxy", "yahoo_image_proxy"})


def _at(p: Prior) -> float:
    return p.at


def _distinct_client(p: Prior) -> bool:
    """Image proxies fetch from changing addresses for one reader: not a burst sign."""
    return p.reason not in _PROXY_REASONS and p.verdict != SELF
