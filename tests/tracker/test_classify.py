"""The verdict rules as a table: labelled requests with real user-agent strings."""

from __future__ import annotations

import random

import pytest

from tracker import classify, netdata
from tracker.classify import Copy, Hit, Prior, Rules
from tracker.netdata import NetworkSet, load_networks, load_patterns

APPLE_MAIL = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"
)
IOS_MAIL = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148"
GMAIL_PROXY = (
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
)
OUTLOOK_DESKTOP = "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17029; Pro)"
OUTLOOK_MSOFFICE = "Mozilla/4.0 (compatible; ms-office; MSOffice 16)"
YAHOO_PROXY = "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html"
CHROME = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36"
SAFARI = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Safari/605.1.15"
IOS_SAFARI = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1"
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0"
EDGE = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36 Edg/120.0.2210.91"
ANDROID_CHROME = "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.6099.144 Mobile Safari/537.36"
HEADLESS = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/120.0.6099.109 Safari/537.36"
PHANTOM = "Mozilla/5.0 (Unknown; Linux x86_64) AppleWebKit/538.1 (KHTML, like Gecko) PhantomJS/2.1.1 Safari/538.1"
BING_PREVIEW = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) BingPreview/1.0b"
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
BARRACUDA = "Mozilla/5.0 (compatible; Barracuda Sentinel (EE))"

T0 = 1_700_000_000.0  # delivery time
SAFE = 600.0  # ten minutes after delivery: outside the machine window
HOME = "203.0.113.7"  # a reader's home address (TEST-NET-3)
OFFICE = "198.51.100.20"

RULES = Rules(
    sender_networks=NetworkSet(["192.0.2.0/24"]),
    apple=load_networks("apple-relay"),
    microsoft=load_networks("microsoft-eop"),
    scanners=load_networks("scanner-networks"),
    scanner_user_agents=load_patterns(),
    machine_window_seconds=5.0,
)


def prior(i, kind, dt, ip, position=None, verdict="human", reason="human"):
    return Prior(
        id=i, kind=kind, at=T0 + dt, ip=ip, verdict=verdict, reason=reason, position=position
    )


# (label, kind, method, user agent, headers, ip, seconds after delivery, position,
#  link count, earlier hits, expected verdict, expected reason, expected relabelled ids)
CASES = [
    (
        "apple mail open at home",
        "open",
        "GET",
        APPLE_MAIL,
        {},
        HOME,
        SAFE,
        None,
        3,
        [],
        "human",
        "human",
        (),
    ),
    ("ios mail open", "open", "GET", IOS_MAIL, {}, HOME, SAFE, None, 3, [], "human", "human", ()),
    ("chrome click", "click", "GET", CHROME, {}, HOME, SAFE, 0, 3, [], "human", "human", ()),
    ("safari click", "click", "GET", SAFARI, {}, HOME, SAFE, 1, 3, [], "human", "human", ()),
    ("firefox click", "click", "GET", FIREFOX, {}, HOME, SAFE, 2, 3, [], "human", "human", ()),
    ("edge click", "click", "GET", EDGE, {}, OFFICE, SAFE, 0, 3, [], "human", "human", ()),
    (
        "android chrome click",
        "click",
        "GET",
        ANDROID_CHROME,
        {},
        HOME,
        SAFE,
        0,
        3,
        [],
        "human",
        "human",
        (),
    ),
    (
        "ios safari click",
        "click",
        "GET",
        IOS_SAFARI,
        {},
        HOME,
        SAFE,
        0,
        3,
        [],
        "human",
        "human",
        (),
    ),
    (
        "gmail image proxy open",
        "open",
        "GET",
        GMAIL_PROXY,
        {},
        "66.249.84.1",
        SAFE,
        None,
        3,
        [],
        "human",
        "google_image_proxy",
        (),
    ),
    (
        "gmail prefetch at delivery",
        "open",
        "GET",
        GMAIL_PROXY,
        {},
        "66.249.84.1",
        1.0,
        None,
        3,
        [],
        "machine",
        "gmail_prefetch",
        (),
    ),
    (
        "outlook desktop open",
        "open",
        "GET",
        OUTLOOK_DESKTOP,
        {},
        OFFICE,
        SAFE,
        None,
        3,
        [],
        "human",
        "outlook_image_proxy",
        (),
    ),
    (
        "outlook ms-office open",
        "open",
        "GET",
        OUTLOOK_MSOFFICE,
        {},
        OFFICE,
        SAFE,
        None,
        3,
        [],
        "human",
        "outlook_image_proxy",
        (),
    ),
    (
        "outlook proxy from eop range",
        "open",
        "GET",
        OUTLOOK_MSOFFICE,
        {},
        "40.107.1.2",
        SAFE,
        None,
        3,
        [],
        "human",
        "outlook_image_proxy",
        (),
    ),
    (
        "yahoo image proxy",
        "open",
        "GET",
        YAHOO_PROXY,
        {},
        "98.136.1.1",
        SAFE,
        None,
        3,
        [],
        "human",
        "yahoo_image_proxy",
        (),
    ),
    (
        "sender's own office",
        "open",
        "GET",
        APPLE_MAIL,
        {},
        "192.0.2.44",
        SAFE,
        None,
        3,
        [],
        "self",
        "self_network",
        (),
    ),
    (
        "sender's own click even at delivery",
        "click",
        "GET",
        CHROME,
        {},
        "192.0.2.1",
        0.5,
        0,
        3,
        [],
        "self",
        "self_network",
        (),
    ),
    (
        "HEAD open",
        "open",
        "HEAD",
        CHROME,
        {},
        HOME,
        SAFE,
        None,
        3,
        [],
        "machine",
        "head_request",
        (),
    ),
    (
        "HEAD click (link checker)",
        "click",
        "HEAD",
        CHROME,
        {},
        HOME,
        SAFE,
        0,
        3,
        [],
        "machine",
        "head_request",
        (),
    ),
    (
        "Sec-Purpose prefetch",
        "click",
        "GET",
        CHROME,
        {"sec-purpose": "prefetch"},
        HOME,
        SAFE,
        0,
        3,
        [],
        "machine",
        "prefetch_header",
        (),
    ),
    (
        "Sec-Purpose prefetch;prerender",
        "click",
        "GET",
        CHROME,
        {"sec-purpose": "prefetch;prerender"},
        HOME,
        SAFE,
        0,
        3,
        [],
        "machine",
        "prefetch_header",
        (),
    ),
    (
        "Purpose prefetch",
        "open",
        "GET",
        FIREFOX,
        {"purpose": "prefetch"},
        HOME,
        SAFE,
        None,
        3,
        [],
        "machine",
        "prefetch_header",
        (),
    ),
    (
        "X-Moz prefetch",
        "click",
        "GET",
        FIREFOX,
        {"x-moz": "prefetch"},
        HOME,
        SAFE,
        0,
        3,
        [],
        "machine",
        "prefetch_header",
        (),
    ),
    (
        "honeypot link",
        "honeypot",
        "GET",
        CHROME,
        {},
        HOME,
        SAFE,
        None,
        3,
        [],
        "machine",
        "honeypot",
        (),
    ),
    (
        "honeypot re-labels same client",
        "honeypot",
        "GET",
        CHROME,
        {},
        HOME,
        SAFE,
        None,
        3,
        [prior(7, "click", SAFE - 1, HOME, 0)],
        "machine",
        "honeypot",
        (7,),
    ),
    (
        "click after honeypot, same client",
        "click",
        "GET",
        CHROME,
        {},
        HOME,
        SAFE,
        1,
        3,
        [prior(8, "click", SAFE - 3, HOME, None, "machine", "honeypot")],
        "machine",
        "honeypot_client",
        (),
    ),
    (
        "empty user agent",
        "open",
        "GET",
        "",
        {},
        HOME,
        SAFE,
        None,
        3,
        [],
        "machine",
        "empty_user_agent",
        (),
    ),
    (
        "blank user agent",
        "click",
        "GET",
        "   ",
        {},
        HOME,
        SAFE,
        0,
        3,
        [],
        "machine",
        "empty_user_agent",
        (),
    ),
    (
        "apple MPP bare Mozilla/5.0",
        "open",
        "GET",
        "Mozilla/5.0",
        {},
        HOME,
        SAFE,
        None,
        3,
        [],
        "machine",
        "apple_mpp_user_agent",
        (),
    ),
    (
        "apple MPP from 17/8",
        "open",
        "GET",
        APPLE_MAIL,
        {},
        "17.58.100.1",
        SAFE,
        None,
        3,
        [],
        "machine",
        "apple_relay_network",
        (),
    ),
    (
        "apple relay IPv6",
        "open",
        "GET",
        IOS_MAIL,
        {},
        "2620:149:a:1::5",
        SAFE,
        None,
        3,
        [],
        "machine",
        "apple_relay_network",
        (),
    ),
    (
        "private relay click is a person",
        "click",
        "GET",
        IOS_SAFARI,
        {},
        "17.58.100.1",
        SAFE,
        0,
        3,
        [],
        "human",
        "human",
        (),
    ),
    (
        "safe links 40.107/16",
        "click",
        "GET",
        CHROME,
        {},
        "40.107.22.83",
        SAFE,
        0,
        3,
        [],
        "machine",
        "microsoft_defender_network",
        (),
    ),
    (
        "safe links 52.100/14",
        "click",
        "GET",
        EDGE,
        {},
        "52.101.4.9",
        SAFE,
        0,
        3,
        [],
        "machine",
        "microsoft_defender_network",
        (),
    ),
    (
        "EOP 104.47/17",
        "open",
        "GET",
        CHROME,
        {},
        "104.47.58.1",
        SAFE,
        None,
        3,
        [],
        "machine",
        "microsoft_defender_network",
        (),
    ),
    (
        "EOP 40.92/15 upper half",
        "click",
        "GET",
        CHROME,
        {},
        "40.93.255.254",
        SAFE,
        0,
        3,
        [],
        "machine",
        "microsoft_defender_network",
        (),
    ),
    (
        "EOP IPv6",
        "click",
        "GET",
        CHROME,
        {},
        "2a01:111:f400:7e1b::1",
        SAFE,
        0,
        3,
        [],
        "machine",
        "microsoft_defender_network",
        (),
    ),
    (
        "just outside 40.92/15",
        "click",
        "GET",
        CHROME,
        {},
        "40.94.0.1",
        SAFE,
        0,
        3,
        [],
        "human",
        "human",
        (),
    ),
    (
        "proofpoint network",
        "click",
        "GET",
        CHROME,
        {},
        "148.163.150.3",
        SAFE,
        0,
        3,
        [],
        "machine",
        "scanner_network",
        (),
    ),
    (
        "mimecast network",
        "click",
        "GET",
        FIREFOX,
        {},
        "205.139.110.20",
        SAFE,
        0,
        3,
        [],
        "machine",
        "scanner_network",
        (),
    ),
    (
        "HeadlessChrome",
        "click",
        "GET",
        HEADLESS,
        {},
        HOME,
        SAFE,
        0,
        3,
        [],
        "machine",
        "headless_browser",
        (),
    ),
    (
        "PhantomJS",
        "open",
        "GET",
        PHANTOM,
        {},
        HOME,
        SAFE,
        None,
        3,
        [],
        "machine",
        "headless_browser",
        (),
    ),
    (
        "python-requests",
        "click",
        "GET",
        "python-requests/2.31.0",
        {},
        HOME,
        SAFE,
        0,
        3,
        [],
        "machine",
        "http_library",
        (),
    ),
    ("curl", "click", "GET", "curl/8.5.0", {}, HOME, SAFE, 0, 3, [], "machine", "http_library", ()),
    (
        "Go-http-client",
        "open",
        "GET",
        "Go-http-client/1.1",
        {},
        HOME,
        SAFE,
        None,
        3,
        [],
        "machine",
        "http_library",
        (),
    ),
    (
        "okhttp",
        "click",
        "GET",
        "okhttp/4.12.0",
        {},
        HOME,
        SAFE,
        0,
        3,
        [],
        "machine",
        "http_library",
        (),
    ),
    (
        "Googlebot",
        "click",
        "GET",
        GOOGLEBOT,
        {},
        HOME,
        SAFE,
        0,
        3,
        [],
        "machine",
        "scanner_user_agent",
        (),
    ),
    (
        "BingPreview (Outlook link preview)",
        "click",
        "GET",
        BING_PREVIEW,
        {},
        HOME,
        SAFE,
        0,
        3,
        [],
        "machine",
        "scanner_user_agent",
        (),
    ),
    (
        "Barracuda Sentinel (shipped list)",
        "click",
        "GET",
        BARRACUDA,
        {},
        HOME,
        SAFE,
        0,
        3,
        [],
        "machine",
        "scanner_user_agent",
        (),
    ),
    (
        "click 2 s after delivery",
        "click",
        "GET",
        CHROME,
        {},
        HOME,
        2.0,
        0,
        3,
        [],
        "machine",
        "delivery_window",
        (),
    ),
    (
        "open 4.9 s after delivery",
        "open",
        "GET",
        APPLE_MAIL,
        {},
        HOME,
        4.9,
        None,
        3,
        [],
        "machine",
        "delivery_window",
        (),
    ),
    (
        "open 5.1 s after delivery",
        "open",
        "GET",
        APPLE_MAIL,
        {},
        HOME,
        5.1,
        None,
        3,
        [],
        "human",
        "human",
        (),
    ),
    (
        "all 3 links within 2 s",
        "click",
        "GET",
        CHROME,
        {},
        HOME,
        SAFE,
        2,
        3,
        [prior(1, "click", SAFE - 1.5, HOME, 0), prior(2, "click", SAFE - 0.7, HOME, 1)],
        "machine",
        "link_burst",
        (1, 2),
    ),
    (
        "both links of 2 within 1 s",
        "click",
        "GET",
        CHROME,
        {},
        HOME,
        SAFE,
        1,
        2,
        [prior(3, "click", SAFE - 1, HOME, 0)],
        "machine",
        "link_burst",
        (3,),
    ),
    (
        "same link twice is no burst",
        "click",
        "GET",
        CHROME,
        {},
        HOME,
        SAFE,
        0,
        2,
        [prior(4, "click", SAFE - 1, HOME, 0)],
        "human",
        "human",
        (),
    ),
    (
        "second link 5 s later is a person",
        "click",
        "GET",
        CHROME,
        {},
        HOME,
        SAFE,
        1,
        2,
        [prior(5, "click", SAFE - 5, HOME, 0)],
        "human",
        "human",
        (),
    ),
    (
        "3 of 10 links within 2 s",
        "click",
        "GET",
        CHROME,
        {},
        HOME,
        SAFE,
        7,
        10,
        [
            prior(11, "click", SAFE - 1, HOME, 3),
            prior(12, "click", SAFE - 0.5, HOME, 5, "machine", "delivery_window"),
        ],
        "machine",
        "link_burst",
        (11,),
    ),
    (
        "3 addresses within 30 s",
        "open",
        "GET",
        CHROME,
        {},
        "203.0.113.9",
        SAFE,
        None,
        3,
        [prior(21, "open", SAFE - 20, HOME), prior(22, "open", SAFE - 10, OFFICE)],
        "machine",
        "address_burst",
        (21, 22),
    ),
    (
        "2 addresses within 30 s is fine",
        "open",
        "GET",
        CHROME,
        {},
        OFFICE,
        SAFE,
        None,
        3,
        [prior(23, "open", SAFE - 20, HOME)],
        "human",
        "human",
        (),
    ),
    (
        "3 addresses over 2 minutes is fine",
        "open",
        "GET",
        CHROME,
        {},
        "203.0.113.9",
        SAFE,
        None,
        3,
        [prior(24, "open", SAFE - 100, HOME), prior(25, "open", SAFE - 60, OFFICE)],
        "human",
        "human",
        (),
    ),
    (
        "gmail proxy addresses are no burst",
        "open",
        "GET",
        CHROME,
        {},
        HOME,
        SAFE,
        None,
        3,
        [
            prior(26, "open", SAFE - 20, "66.249.84.1", reason="google_image_proxy"),
            prior(27, "open", SAFE - 10, "66.249.84.2", reason="google_image_proxy"),
        ],
        "human",
        "human",
        (),
    ),
]


def test_table_is_big_enough_and_covers_every_rule():
    assert len(CASES) >= 40
    assert {c[11] for c in CASES} == set(classify.REASONS)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_verdict(case):
    (_, kind, method, ua, headers, ip, after, position, links, recent, verdict, reason, relabel) = (
        case
    )
    hit = Hit(
        kind=kind,
        method=method,
        user_agent=ua,
        ip=ip,
        at=T0 + after,
        headers=headers,
        position=position,
    )
    copy = Copy(delivered_at=T0, link_count=links)
    got = classify.classify(hit, copy, recent, RULES)
    assert (got.verdict, got.reason) == (verdict, reason)
    assert got.verdict == classify.REASONS[got.reason][0]
    assert set(got.relabel) == set(relabel)


PROXY_REASONS = ("google_image_proxy", "outlook_image_proxy", "yahoo_image_proxy")


def plain_burst_rules(hit: Hit, links: int, recent: list[Prior]) -> tuple[str, set]:
    """The burst rules as the README states them, over the earlier hits themselves: the
    oracle for the writer's way of keeping them (for hits no earlier rule decides)."""
    human = {p.id for p in recent if p.verdict == "human" and p.id is not None}
    window = RULES.address_burst_seconds
    if any(p.reason == "honeypot" and p.ip == hit.ip and hit.at - p.at <= window for p in recent):
        return "honeypot_client", set()
    if hit.kind == "click":
        start = hit.at - RULES.link_burst_seconds
        burst = [
            p for p in recent if p.kind == "click" and p.position is not None and p.at >= start
        ]
        positions = {p.position for p in burst} | {hit.position}
        if len(positions) >= 2 and (len(positions) >= links or len(positions) >= 3):
            return "link_burst", {p.id for p in burst} & human
    start = hit.at - window
    burst = [
        p
        for p in recent
        if p.at >= start and p.ip and p.verdict != "self" and p.reason not in PROXY_REASONS
    ]
    if len({p.ip for p in burst} | {hit.ip}) >= RULES.address_burst_count:
        return "address_burst", {p.id for p in burst} & human
    return "human", set()


def test_seen_kept_as_the_writer_keeps_it_gives_the_burst_rules_verdicts():
    """Random copies' histories (addresses, proxies, self hits, honeypot hits, hits older
    than the window, hits re-labelled to the honeypot later), given as the writer gives
    them (every kept hit in time order, a Seen updated hit by hit): the verdict is what
    the burst rules give over the hits in the window themselves."""
    rng = random.Random(21)
    ips = ["198.51.100.1", "198.51.100.2", "198.51.100.3", "198.51.100.4", None, ""]
    reasons = [("human", "human")] * 4 + [
        ("machine", "google_image_proxy"),
        ("self", "self_network"),
        ("machine", "honeypot"),
        ("machine", "link_burst"),
    ]
    decided = set()
    for _ in range(3000):
        now = T0 + 3600
        history = []
        for i in range(rng.randint(0, 12)):
            verdict, reason = rng.choice(reasons)
            at = now - rng.uniform(0, rng.choice([3, 80]))
            kind = rng.choice(["open", "click"])
            position = rng.choice([None, 0, 1])
            history.append(Prior(i, kind, at, rng.choice(ips), verdict, reason, position))
        history.sort(key=lambda p: p.at)
        seen = classify.Seen()
        for p in history:
            seen.add(p)
        if history and rng.random() < 0.3:  # a later honeypot hit re-labels one of them
            i = rng.randrange(len(history))
            history[i] = history[i]._replace(verdict="machine", reason="honeypot")
            seen.add(history[i])
        recent = [p for p in history if p.at >= now - RULES.lookback_seconds]
        hit = Hit(
            kind=rng.choice(["open", "click"]),
            method="GET",
            user_agent=CHROME,
            ip=rng.choice(ips[:4]),
            at=now,
            position=rng.choice([0, 1, 2]),
        )
        got = classify.classify(hit, Copy(delivered_at=T0, link_count=3), history, RULES, seen)
        want = plain_burst_rules(hit, 3, recent)
        assert (got.reason, set(got.relabel)) == want, (hit, history)
        decided.add(got.reason)
    assert decided == {"human", "address_burst", "honeypot_client", "link_burst"}


def test_network_set_handles_big_lists_and_bad_input():
    nets = NetworkSet([f"10.{i // 256}.{i % 256}.0/24" for i in range(60000)] + ["2001:db8::/32"])
    assert "10.100.7.9" in nets and "10.234.95.255" in nets and "10.234.96.0" not in nets
    assert "2001:db8:1::1" in nets and "2001:db9::1" not in nets
    assert "::ffff:10.0.0.1" in nets  # IPv4-mapped IPv6 from a dual-stack socket
    assert "not-an-ip" not in nets and "" not in nets


def test_network_set_answers_again_as_it_answered_first(monkeypatch):
    """Its answers are kept per address (and start over when many are kept): asked again,
    an address gets the answer a fresh lookup gives."""
    monkeypatch.setattr(netdata, "SEEN_KEPT", 50)
    nets = NetworkSet(["10.0.0.0/16", "2001:db8::/32"])
    rng = random.Random(5)
    addresses = [f"10.0.{rng.randint(0, 1)}.{rng.randint(0, 3)}" for _ in range(40)]
    addresses += [f"10.{rng.randint(0, 1)}.0.{i}" for i in range(60)] + ["2001:db8::1", "x"]
    for _ in range(3):
        for ip in addresses:
            assert (ip in nets) == nets._lookup(ip), ip
    assert len(nets._seen) <= 50
