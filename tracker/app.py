"""The tracker's HTTP endpoints: pixel, click redirect, honeypot, live feed, health.

A request never touches the database: the token carries the copy and the target URL, and
the hit goes on the batch writer's queue. The response does not wait for the disk: a
queued hit is as safe as a committed one for every way the tracker stops on purpose (the
writer drains its queue on SIGTERM, and spools what it cannot write). Only when the writer
is far behind (``BatchWriter.backlog_limit`` hits) does a response wait, at most
``write_wait_seconds``, for its commit: back-pressure that bounds the queue. So pixels and
redirects keep working while the database is locked, and a click still redirects after
its email was erased.

The endpoints are served by aiohttp's low-level server (``web.Server``) with a handful of
prefix tests for routing (:func:`route`), not by ``web.Application``: the application's
router, match info and middleware chain cost about a third of the HTTP side's CPU per
request under load (measured with wrk: ~85-95 against ~50-65 us).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import time
import urllib.parse

from aiohttp import web

import config
from tracker import notify
from tracker.netdata import NetworkSet
from tracker.tokens import Signer
from tracker.writer import public_notice
from tracker.writer_process import WriterProcess

GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00"
    b"\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
NO_CACHE = "no-cache, no-store, must-revalidate, max-age=0"
PIXEL_HEADERS = {
    "Content-Type": "image/gif",
    "Cache-Control": NO_CACHE,
    "Pragma": "no-cache",
    "Expires": "0",
}
NOT_FOUND_PAGE = (
    "<!doctype html><html><head><meta charset=utf-8><title>Link not found</title></head>"
    "<body><h1>Link not found</h1><p>This link is not valid. If you typed or copied it, "
    "please check that it is complete.</p></body></html>"
)
HONEYPOT_PAGE = "<!doctype html><html><head><title>-</title></head><body></body></html>"
PREFETCH_HEADERS = ("sec-purpose", "purpose", "x-moz", "x-purpose")
FEED_HEARTBEAT = 15.0

# What each endpoint answers to; others get 405 (as aiohttp's router answers).
READ_METHODS = ("GET", "HEAD")
FEED_METHODS = ("GET",)


def route(path: str) -> tuple[str, str]:
    """The endpoint for a (decoded) request path and its argument: ("pixel", tail),
    ("click", token), ("healthz", ""), ("feed", ""), or ("", "") for nothing."""
    if path.startswith("/o/"):
        return "pixel", path[3:]
    if path.startswith("/c/"):
        token = path[3:]
        return ("click", token) if token and "/" not in token else ("", "")
    if path == "/healthz":
        return "healthz", ""
    if path == "/feed":
        return "feed", ""
    return "", ""


class ClientAddress:
    """The client's address: the socket peer, or X-Forwarded-For from a trusted proxy."""

    def __init__(self, trusted_proxies: list[str]) -> None:
        self.trusted = NetworkSet(trusted_proxies)
        self.any_trusted = bool(trusted_proxies)

    def __call__(self, request: web.Request) -> str:
        peer = request.remote or ""
        if not self.any_trusted or peer not in self.trusted:
            return peer
        # Walk the chain from the right: the first address not ours is the client.
        chain = [
            a.strip() for h in request.headers.getall("X-Forwarded-For", []) for a in h.split(",")
        ]
        client = peer
        for addr in reversed([a for a in chain if a]):
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                break  # garbage in the header: trust nothing left of it
            client = addr
            if addr not in self.trusted:
                break
        return client


def _location(url: str) -> str | None:
    """The URL as a Location header value: exactly as stored, except that characters a
    header cannot carry (non-ASCII) are percent-encoded. Only http(s) targets."""
    if not url.lower().startswith(("http://", "https://")):
        return None
    if any(c in url for c in "\r\n\0"):
        return None
    if url.isascii():
        return url
    return urllib.parse.quote(url, safe="".join(chr(i) for i in range(0x21, 0x7F)))


def make_server(settings: config.Settings, writer: WriterProcess, feed: notify.Feed) -> web.Server:
    signer = Signer(settings.tracker.secrets)
    client_address = ClientAddress(settings.tracker.trusted_proxies)
    wait = settings.tracker.write_wait_seconds

    async def record(request: web.BaseRequest, kind: str, token, url: str = "") -> None:
        headers = request.headers
        prefetch = {h: headers[h] for h in PREFETCH_HEADERS if h in headers}
        hit = (  # PendingHit's fields, as a plain tuple (what goes to the writer process)
            kind,
            token.delivery_id,
            token.position if kind == "click" else None,
            url,
            request.method,
            headers.get("User-Agent", ""),
            client_address(request),
            time.time(),
            prefetch,
        )
        if not writer.behind:
            writer.enqueue(hit)
            return
        fut = writer.submit(hit)
        try:  # back-pressure: wait for the commit, but a locked disk never blocks a reply
            await asyncio.wait_for(asyncio.shield(fut), wait)
        except TimeoutError:
            pass

    async def pixel(request: web.BaseRequest, tail: str) -> web.Response:
        token = signer.verify(tail[:-4] if tail.endswith(".gif") else tail)
        if token is not None and token.kind == "open":
            await record(request, "open", token)
        return web.Response(body=GIF, headers=PIXEL_HEADERS)

    async def click(request: web.BaseRequest, token_text: str) -> web.Response:
        token = signer.verify(token_text)
        if token is not None and token.kind == "honeypot":
            await record(request, "honeypot", token)
            return web.Response(
                text=HONEYPOT_PAGE,
                content_type="text/html",
                headers={"Cache-Control": NO_CACHE, "X-Robots-Tag": "noindex"},
            )
        location = _location(token.url) if token is not None and token.kind == "click" else None
        if location is None:
            return web.Response(
                status=404,
                text=NOT_FOUND_PAGE,
                content_type="text/html",
                headers={"Cache-Control": NO_CACHE},
            )
        await record(request, "click", token, token.url)
        return web.Response(
            status=302,
            headers={
                "Location": location,
                "Cache-Control": NO_CACHE,
                "Referrer-Policy": "no-referrer",
            },
        )

    async def healthz(request: web.BaseRequest, _: str) -> web.Response:
        ok = writer.alive
        return web.json_response(
            {"status": "ok" if ok else "writer stopped", "queued": writer.pending},
            status=200 if ok else 503,
        )

    async def feed_handler(request: web.BaseRequest, _: str) -> web.StreamResponse:
        expected = settings.tracker.feed_token
        given = request.headers.get("Authorization", "")
        given = given[7:] if given.lower().startswith("bearer ") else ""
        if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
            return web.json_response({"error": "feed token required"}, status=401)
        user = request.query.get("user") or None
        all_hits = request.query.get("all_hits", "") in ("1", "true", "yes")
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        q = feed.subscribe()
        try:
            await resp.write(b": connected\n\n")
            while True:
                try:
                    notice = await asyncio.wait_for(q.get(), FEED_HEARTBEAT)
                except TimeoutError:
                    await resp.write(b": ping\n\n")
                    continue
                if notice.get("type") == "shutdown":
                    break
                if notify.wanted(notice, user, all_hits):
                    data = json.dumps(public_notice(notice), ensure_ascii=False)
                    await resp.write(f"event: {notice['type']}\ndata: {data}\n\n".encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            feed.unsubscribe(q)
        return resp

    endpoints = {
        "pixel": (pixel, READ_METHODS),
        "click": (click, READ_METHODS),
        "healthz": (healthz, READ_METHODS),
        "feed": (feed_handler, FEED_METHODS),
    }

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        """Route, and whatever goes wrong, a pixel is still a GIF and nothing else is a
        traceback."""
        name, arg = route(request.path)
        try:
            if not name:
                return not_found()
            handler, methods = endpoints[name]
            if request.method not in methods:
                return web.Response(
                    status=405, text="405: Method Not Allowed", headers={"Allow": ",".join(methods)}
                )
            return await handler(request, arg)
        except Exception:
            if name == "pixel":
                return web.Response(body=GIF, headers=PIXEL_HEADERS)
            return not_found()

    return web.Server(handle, access_log=None)


def not_found() -> web.Response:
    """The plain page for a bad token or an unrouted path (nothing of the request in it)."""
    return web.Response(status=404, text=NOT_FOUND_PAGE, content_type="text/html")
