"""Tracker: requests/s and p50/p99 for pixel and click hits against a bare aiohttp GIF endpoint,
both measured in the same run from 64 client connections."""

from __future__ import annotations

import asyncio

from common import GIF, free_port, repeated, row


async def http_baseline(quick: bool) -> dict:
    """A bare aiohttp GIF endpoint: the ceiling for any aiohttp-based tracker."""
    from aiohttp import web

    async def gif(_):
        return web.Response(body=GIF, content_type="image/gif")

    app = web.Application()
    app.router.add_get("/o/{tok}", gif)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        # the server shares this process' loop; the client runs in its own process
        return await repeated(
            3, "http", "127.0.0.1", port, 64, 2000 if quick else 20000, 5 if quick else 20, "/o/x"
        )
    finally:
        await runner.cleanup()


def run(quick: bool) -> list[dict]:
    r = asyncio.run(http_baseline(quick))
    return [
        row(
            "bare aiohttp GIF, 64 conns",
            "req/s",
            r["rate"],
            "baseline",
            p50_ms=r["p50_ms"],
            p99_ms=r["p99_ms"],
        )
    ]
