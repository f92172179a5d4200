"""``mailtally relay`` / ``mailtally run``: the submission listeners plus the delivery worker.

The worker runs in a process of its own (``relay.delivery_process``), woken after each
group commit; spool names left without a row by a crash are queued again here, before the
listeners open.
"""

from __future__ import annotations

import asyncio

import config
import store
from relay import delivery_process, outbox, server


def _recover(settings: config.Settings) -> None:
    db = store.connect(settings.db_path, migrate=False)
    try:
        outbox.recover(settings, db)
    finally:
        db.close()


class RelayService:
    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings
        self.worker = delivery_process.DeliveryProcess(settings)
        self.handler = server.Handler(settings, on_queued=self.worker.wake)
        self.servers: list[asyncio.AbstractServer] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, _recover, self.settings)
        await self.worker.start()
        await self.handler.preparer.start()
        host, port = config.parse_hostport("relay.listen", self.settings.relay.listen)
        self.servers.append(
            await loop.create_server(server.factory(self.settings, self.handler), host, port)
        )
        if self.settings.relay.tls_listen:
            host, port = config.parse_hostport("relay.tls_listen", self.settings.relay.tls_listen)
            context = server.tls_context(self.settings)
            self.servers.append(
                await loop.create_server(
                    server.factory(self.settings, self.handler, implicit_tls=True),
                    host,
                    port,
                    ssl=context,
                )
            )

    def addresses(self) -> list[tuple[str, int]]:
        return [s.sockets[0].getsockname()[:2] for s in self.servers]

    def banner(self) -> list[str]:
        lines = []
        for (host, port), label in zip(
            self.addresses(), ("submission", "implicit TLS"), strict=False
        ):
            tls = " (STARTTLS)" if label == "submission" and self.settings.relay.tls_cert else ""
            lines.append(f"relay: {label} on {host}:{port}{tls}")
        lines.append(f"relay: delivering to {self.settings.relay.upstream}")
        return lines

    async def stop(self) -> None:
        for s in self.servers:
            s.close()
        for s in self.servers:
            try:
                await asyncio.wait_for(s.wait_closed(), 5)
            except TimeoutError:
                pass
        await self.worker.stop()
        await asyncio.get_running_loop().run_in_executor(None, self.handler.close)


async def start(settings: config.Settings) -> RelayService:
    service = RelayService(settings)
    await service.start()
    return service
