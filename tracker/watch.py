"""``mailtally watch``: follow the tracker's live feed and print one line per event."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import urllib.parse
from collections.abc import AsyncIterator, Callable

import aiohttp

import config

ORDINAL = {1: "st", 2: "nd", 3: "rd"}


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else ORDINAL.get(n % 10, "th")
    return f"{n}{suffix}"


def short_url(url: str | None) -> str:
    """``https://pricing.example.com/plans?x=1`` → ``pricing.example.com/plans``."""
    if not url:
        return "a link"
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    path = parts.path.rstrip("/")
    return f"{host}{path}" or url


def clock(iso: str | None) -> str:
    """Local wall-clock time of an event, ``HH:MM``."""
    try:
        return dt.datetime.fromisoformat(iso or "").astimezone().strftime("%H:%M")
    except ValueError:
        return "--:--"


def format_line(notice: dict) -> str:
    """One readable line, e.g. ``10:42  bob@acme.com opened “Proposal” (2nd open)``."""
    who = notice.get("recipient") or "Someone"
    subject = f"“{notice.get('subject') or '(no subject)'}”"
    kind = notice.get("kind")
    if notice.get("type") == "relabel":
        return (
            f"{clock(notice.get('at'))}  earlier {'inferred open' if notice.get('inferred') else kind}"
            f" by {who} on {subject} re-labelled machine ({notice.get('reason')})"
        )
    if kind == "open":
        text = f"{who} opened {subject}"
        if notice.get("inferred"):
            text += f" (inferred from {notice.get('reason', '').removeprefix('inferred_from_')})"
        elif notice.get("open_number", 0) >= 2:
            text += f" ({ordinal(notice['open_number'])} open)"
    elif kind == "click":
        target = (
            "the hidden honeypot link" if notice.get("honeypot") else short_url(notice.get("url"))
        )
        text = f"{who} clicked {target} in {subject}"
    else:
        text = f"{who} replied to {subject}"
    if notice.get("verdict") != "human":
        text += f"  [{notice.get('verdict')}: {notice.get('reason')}]"
    return f"{clock(notice.get('at'))}  {text}"


def feed_url(settings: config.Settings, user: str | None, all_hits: bool) -> str:
    host, port = config.parse_hostport("tracker.listen", settings.tracker.listen)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    query = {k: v for k, v in (("user", user), ("all_hits", "1" if all_hits else None)) if v}
    return f"http://{host}:{port}/feed" + (f"?{urllib.parse.urlencode(query)}" if query else "")


async def follow(url: str, token: str) -> AsyncIterator[dict]:
    """Yield the notices of a server-sent-events feed until it ends."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
            if resp.status == 401:
                raise PermissionError("the tracker refused the feed token (tracker.feed_token)")
            resp.raise_for_status()
            data: list[str] = []
            async for raw in resp.content:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if line.startswith("data:"):
                    data.append(line[5:].strip())
                elif not line and data:
                    yield json.loads("\n".join(data))
                    data = []


async def watch(
    settings: config.Settings,
    user: str | None,
    all_hits: bool,
    echo: Callable[[str], None],
    url: str | None = None,
) -> None:
    if not settings.tracker.feed_token:
        raise config.ConfigError("tracker.feed_token: not set, the live feed is disabled")
    async for notice in follow(
        url or feed_url(settings, user, all_hits), settings.tracker.feed_token
    ):
        echo(format_line(notice))


def run(settings: config.Settings, user: str | None, all_hits: bool, echo, url=None) -> None:
    asyncio.run(watch(settings, user, all_hits, echo, url))
