"""Shared helpers for the hardening tests: a raw SMTP line client (hostile clients must
be able to send what smtplib refuses to), and bounded waits."""

from __future__ import annotations

import asyncio


class RawSMTP:
    """A bare SMTP connection: write any bytes, read reply codes (None once closed)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> RawSMTP:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        conn = cls(reader, writer)
        assert await conn.reply() == 220
        return conn

    async def reply(self, timeout: float = 20.0) -> int | None:
        """The next reply's code (multi-line replies read whole); None if the server closed."""
        while True:
            try:
                line = await asyncio.wait_for(self.reader.readline(), timeout)
            except (ConnectionResetError, BrokenPipeError):
                return None
            if not line:
                return None
            if len(line) >= 4 and line[3:4] == b" ":
                return int(line[:3])

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        try:
            await self.writer.drain()
        except (ConnectionResetError, BrokenPipeError):
            pass

    async def cmd(self, line: str | bytes) -> int | None:
        await self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return await self.reply()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionResetError, BrokenPipeError):
            pass
