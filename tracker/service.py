"""The tracker as a service for ``mailtally run`` / ``mailtally tracker``."""

from __future__ import annotations

import asyncio
import resource

from aiohttp import web

import config
from tracker import classify, netdata
from tracker.app import make_server
from tracker.notify import Feed, WebhookSender
from tracker.writer_process import WriterProcess

# Open connections the tracker is ready for: every slow or idle client holds a descriptor,
# and the usual soft limit (1,024 under systemd and most shells) is far too few.
WANTED_FILES = 65_536


def raise_file_limit(wanted: int = WANTED_FILES) -> int:
    """Raise this process' soft RLIMIT_NOFILE towards ``wanted`` (never above the hard
    limit, never lower); the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def build_rules(settings: config.Settings) -> classify.Rules:
    """Verdict rules from the settings and the network/user-agent data files."""
    data_dir = settings.data_dir
    return classify.Rules(
        sender_networks=netdata.NetworkSet(settings.tracker.sender_networks),
        apple=netdata.load_networks("apple-relay", data_dir),
        microsoft=netdata.load_networks("microsoft-eop", data_dir),
        scanners=netdata.load_networks("scanner-networks", data_dir),
        scanner_user_agents=netdata.load_patterns(),
        machine_window_seconds=settings.tracker.machine_window_seconds,
    )


class TrackerService:
    """HTTP server + batch writer + webhook sender, stopped in the order that loses nothing."""

    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings
        self.host, self.port = config.parse_hostport("tracker.listen", settings.tracker.listen)

    async def start(self) -> None:
        raise_file_limit()
        loop = asyncio.get_running_loop()
        self.feed = Feed(loop)
        self.writer = WriterProcess(
            self.settings, self.feed.publish, lambda: bool(self.feed.subscribers)
        )
        await self.writer.start()
        self.webhooks = WebhookSender(self.settings, self.feed.wake_webhooks)
        await self.webhooks.start()
        self.runner = web.ServerRunner(
            make_server(self.settings, self.writer, self.feed), shutdown_timeout=5.0
        )
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, backlog=1024)
        try:
            await site.start()
        except BaseException:
            await self.runner.cleanup()
            await self.writer.close()
            await self.webhooks.stop()
            raise
        sockets = getattr(site._server, "sockets", None) or []  # noqa: SLF001
        if sockets:
            self.port = sockets[0].getsockname()[1]

    def banner(self) -> list[str]:
        return [
            f"tracker  http://{self.host}:{self.port}  (public URL {self.settings.tracker.base_url})"
        ]

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish, write every queued hit, then
        let the webhook sender go (its queue is in the database, nothing is lost)."""
        for q in list(self.feed.subscribers):
            q.put_nowait({"type": "shutdown"})
        await self.runner.cleanup()
        await self.writer.close()
        await self.webhooks.stop()


async def start(settings: config.Settings) -> TrackerService:
    service = TrackerService(settings)
    await service.start()
    return service
