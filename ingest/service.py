"""``mailtally ingest`` / ``mailtally run``: the listener plus the worker in one loop."""

from __future__ import annotations

import asyncio

import config
from ingest.server import Handler, smtp_factory
from ingest.worker import Worker


class IngestService:
    """The running ingest: where it listens and how to stop it cleanly."""

    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings
        self.worker = Worker(settings)
        self.server: asyncio.AbstractServer | None = None
        self.host = ""
        self.port = 0

    async def start(self) -> None:
        host, port = config.parse_hostport("ingest.listen", self.settings.ingest.listen)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            smtp_factory(self.settings, Handler(self.settings)), host=host, port=port
        )
        sockname = self.server.sockets[0].getsockname()
        self.host, self.port = sockname[0], sockname[1]
        await self.worker.start()

    def banner(self) -> list[str]:
        s = self.settings.ingest
        return [
            f"ingest   smtp://{self.host}:{self.port}  BCC {s.bcc_address or '-'}"
            f"  forward {s.forward_address or '-'}"
        ]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        await self.worker.stop()


async def start(settings: config.Settings) -> IngestService:
    service = IngestService(settings)
    await service.start()
    return service
