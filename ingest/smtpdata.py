"""SMTP DATA read in chunks, for both SMTP servers.

aiosmtpd reads DATA one line at a time (a ``readuntil`` per line, each line kept as its
own bytearray, then joined): that was the largest CPU item of the ingest and the relay
under load, and it peaks at about 4x the message in memory. ``StreamedDataSMTP`` keeps
aiosmtpd's replies (503/501, 354, 552 over SIZE, 500 for a line over the limit) but reads
64 KB chunks, finds the end with one ``find`` and undoes dot-stuffing with one ``replace``
per chunk, handing the bytes to a sink as they arrive. By default the sink is memory and
the handler's ``handle_DATA`` hook runs as usual (the relay); the ingest streams straight
into its spool file instead.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from aiosmtpd.smtp import SMTP, syntax

log = logging.getLogger("mailtally.smtp")
GONE = "connection gone"
READ_CHUNK = 64 * 1024


class Sink(Protocol):
    def write(self, data: bytes) -> None: ...

    def abort(self) -> None: ...


class MemorySink:
    """The message in memory, for servers whose handler needs all of it (the relay)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def abort(self) -> None:
        self.data = bytearray()


class StreamedDataSMTP(SMTP):
    """aiosmtpd's SMTP with DATA read in chunks into a sink (see the module docstring)."""

    def open_sink(self) -> Sink:
        """Where this message's bytes go as they arrive."""
        return MemorySink()

    async def finish(self, sink: Sink) -> str:
        """The reply for a whole message: by default aiosmtpd's DATA hook on the bytes."""
        assert isinstance(sink, MemorySink) and self.envelope is not None
        self.envelope.original_content = self.envelope.content = bytes(sink.data)
        return await self._call_handler_hook("DATA")

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        assert self.line_length_limit >= READ_CHUNK, "the long-line check needs it"
        sink = self.open_sink()
        finishing = False
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            status = await self._receive_data(sink)
            if status == GONE:
                return
            if status is None:
                # From here ``finish`` owns the sink (the ingest's commit cleans up itself on
                # failure): a client gone during its fsync must not close the file under it.
                finishing = True
                status = await self.finish(sink)
            self._set_post_data_state()
            await self.push(status)
        finally:
            if not finishing:
                sink.abort()

    async def _receive_data(self, sink: Sink) -> str | None:
        """Read DATA up to the lone dot into ``sink``; an error reply, or None if whole.

        Reads chunks, not lines: the end is found with one ``find`` for CRLF.CRLF and
        dot-stuffing is undone with one ``replace`` per chunk, which costs a fraction of
        aiosmtpd's ``readuntil`` per line (the largest CPU item of the ingest under load).
        ``buf`` always starts at a line start, behind the CRLF that ended the previous
        line (a virtual one at the beginning), so a terminator or a stuffed dot that
        straddles two chunks is still seen.
        """
        limit = self.data_size_limit
        line_limit = self.line_length_limit
        reader = self._reader
        buf = bytearray(b"\r\n")
        received = 0  # message bytes (what SIZE limits), the final dot line excluded
        too_long = too_much = False
        while True:
            try:
                chunk = await reader.read(READ_CHUNK)
            except asyncio.CancelledError:
                log.info("connection lost during DATA")
                self._writer.close()
                raise
            if not chunk:
                return GONE  # the client went away before the final dot
            search_from = max(len(buf) - 4, 0)
            buf += chunk
            received += len(chunk)
            end = buf.find(b"\r\n.\r\n", search_from)
            if end >= 0:
                received -= len(buf) - (end + 2)  # the dot line and anything after it
            if limit and received > limit and not too_long:
                too_much = True
            if not (too_long or too_much):
                # Only the first line in buf can be long: the others lie inside one chunk,
                # which holds as long as line_length_limit >= READ_CHUNK (checked in smtp_DATA).
                first_break = buf.find(b"\r\n", 2)
                if (first_break if first_break >= 0 else len(buf)) - 2 > line_limit:
                    too_long = True
            if too_long or too_much:
                # Refused at the end (as aiosmtpd does); keep only what may start the end.
                if end >= 0:
                    self._push_back(buf[end + 5 :])
                    break
                del buf[:-4]
                continue
            cut = end + 2 if end >= 0 else buf.rfind(b"\r\n") + 2
            if cut > 2:
                sink.write(buf[:cut].replace(b"\r\n.", b"\r\n")[2:])
            if end >= 0:
                self._push_back(buf[end + 5 :])
                break
            del buf[: cut - 2]
        if too_long:
            return "500 Line too long (see RFC5321 4.5.3.1.6)"
        if too_much:
            return "552 Error: Too much mail data"
        return None

    def _push_back(self, rest: bytearray) -> None:
        """Bytes read past the final dot (a client pipelining its next command) go back
        to the front of the stream so the command loop sees them."""
        if rest:
            self._reader._buffer[0:0] = rest
