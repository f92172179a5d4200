"""The listener streams DATA into the spool in chunks (ingest/server.py): whatever way the
client's bytes are cut into TCP segments, the spooled message is exactly the message
(dot-stuffing undone, terminator found across chunk edges), SIZE and line limits still
answer 552/500, and a command sent right after the final dot is not lost."""

from __future__ import annotations

import asyncio
import random

import pytest

from ingest import spool
from ingest.server import Handler, smtp_factory
from tests.hardening.conftest import RawSMTP

LINES = [
    b"Subject: dots",
    b"",
    b".",
    b"..",
    b"...leading dots",
    b".\r.",
    b"trailing dot.",
    b"a bare \r inside",
    b"",
    b"x" * 5000,
    b". .",
    b"",
]


def stuffed(message: bytes) -> bytes:
    """The message as a client sends it: CRLF lines, leading dots doubled, then CRLF.CRLF."""
    lines = message.split(b"\r\n")
    return b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in lines) + b".\r\n"


@pytest.fixture
async def listener(settings):
    """Only the SMTP listener (no worker), so spooled entries stay for inspection."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        smtp_factory(settings, Handler(settings)), host="127.0.0.1", port=0
    )
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


def spooled(settings) -> list[bytes]:
    return [spool.read(p).read_bytes() for p in spool.pending(spool.spool_dir(settings))]


async def send_in_pieces(conn: RawSMTP, data: bytes, rng: random.Random) -> None:
    i = 0
    while i < len(data):
        n = rng.choice([1, 2, 3, 5, 7, 64, 1000, 70_000])
        await conn.send(data[i : i + n])
        await asyncio.sleep(0)
        i += n


async def test_spooled_bytes_are_the_message_however_the_data_is_cut(settings, listener):
    rng = random.Random(8)
    conn = await RawSMTP.connect(listener)
    assert await conn.cmd("EHLO client") == 250
    sent = []
    for n in range(12):
        lines = [rng.choice(LINES) for _ in range(rng.randint(0, 40))]
        message = b"\r\n".join([b"From: a@b.example", *lines])
        sent.append(message + b"\r\n")
        assert await conn.cmd("MAIL FROM:<a@b.example>") == 250
        assert await conn.cmd(f"RCPT TO:<{settings.ingest.bcc_address}>") == 250
        assert await conn.cmd("DATA") == 354
        await send_in_pieces(conn, stuffed(message), rng)
        assert await conn.reply() == 250, n
    # An empty message (the dot right after 354) is a message too.
    assert await conn.cmd("MAIL FROM:<a@b.example>") == 250
    assert await conn.cmd(f"RCPT TO:<{settings.ingest.bcc_address}>") == 250
    assert await conn.cmd("DATA") == 354
    assert await conn.cmd(".") == 250
    await conn.close()
    assert sorted(spooled(settings)) == sorted([*sent, b""])


async def test_command_pipelined_after_the_dot_is_answered(settings, listener):
    conn = await RawSMTP.connect(listener)
    assert await conn.cmd("EHLO client") == 250
    assert await conn.cmd("MAIL FROM:<a@b.example>") == 250
    assert await conn.cmd(f"RCPT TO:<{settings.ingest.bcc_address}>") == 250
    assert await conn.cmd("DATA") == 354
    await conn.send(b"Subject: x\r\n\r\nbody\r\n.\r\nNOOP\r\n")
    assert await conn.reply() == 250
    assert await conn.reply() == 250  # the NOOP
    assert await conn.cmd("QUIT") == 221
    await conn.close()
    assert spooled(settings) == [b"Subject: x\r\n\r\nbody\r\n"]


async def test_size_and_line_limits_refuse_and_leave_nothing(settings, listener):
    settings.ingest.max_message_size = 5_000_000
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        smtp_factory(settings, Handler(settings)), host="127.0.0.1", port=0
    )
    port = server.sockets[0].getsockname()[1]
    try:
        conn = await RawSMTP.connect(port)
        assert await conn.cmd("EHLO client") == 250
        for body, code in (
            (
                (b"y" * 80 + b"\r\n") * 75_000,  # 6.2 MB over the 5 MB SIZE
                552,
            ),
            ((b"z" * (3 * 1024 * 1024) + b"\r\n"), 500),
        ):  # one 3 MiB line over 2 MiB
            assert await conn.cmd("MAIL FROM:<a@b.example>") == 250
            assert await conn.cmd(f"RCPT TO:<{settings.ingest.bcc_address}>") == 250
            assert await conn.cmd("DATA") == 354
            await send_in_pieces(conn, body + b".\r\n", random.Random(1))
            assert await conn.reply() == code
        assert await conn.cmd("NOOP") == 250  # the session goes on
        await conn.close()
    finally:
        server.close()
        await server.wait_closed()
    assert spooled(settings) == []
    assert list((spool.spool_dir(settings) / "tmp").iterdir()) == []
