"""The inbound SMTP listener: only the two logging addresses, spooled before 250.

DATA is streamed straight into the spool file as the lines arrive (``IngestSMTP.smtp_DATA``)
instead of letting aiosmtpd gather the message in memory: aiosmtpd keeps every line as its
own bytearray and then joins them, which peaks at about 4x the message (270 MB for a 68 MB
mail with a 50 MB attachment). Streamed, the listener holds at most one line and one write
chunk per connection, whatever the message weighs.
"""

from __future__ import annotations

import asyncio
import logging

from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

import config
from ingest import spool
from store import addresses

log = logging.getLogger("mailtally.ingest")
GONE = "connection gone"
READ_CHUNK = 64 * 1024


class Handler:
    """aiosmtpd handler: RCPT filter (550 5.1.1) and durable DATA (fsync before 250)."""

    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings
        self.root = spool.spool_dir(settings)
        self.accepted = {
            addresses.normalize(a)
            for a in (settings.ingest.bcc_address, settings.ingest.forward_address)
            if a
        }

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options
    ) -> str:
        if addresses.normalize(address) not in self.accepted:
            return f"550 5.1.1 <{address}>: not a logging address of this server"
        if address not in envelope.rcpt_tos:
            envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    def receive(self, session: Session, envelope: Envelope) -> spool.Receiving:
        """A spool entry to stream this message's DATA into."""
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        return spool.Receiving(
            self.root, envelope.mail_from or "", list(envelope.rcpt_tos), {"peer": peer}
        )

    async def accept(self, receiving: spool.Receiving) -> str:
        """Make the received message durable, then (only then) answer 250."""
        try:
            await asyncio.to_thread(receiving.commit)
        except OSError as exc:
            log.error("ingest: cannot spool a message: %s", exc)
            return f"451 4.3.0 cannot spool the message now ({exc.strerror or exc}); try again"
        return "250 2.0.0 Accepted for logging"


class IngestSMTP(SMTP):
    """aiosmtpd with DATA streamed to the spool, and DATA lines up to 2 MiB: real-world mail
    breaks the 1000-octet rule and must be logged or explained, not refused (commands keep
    their own small limits)."""

    line_length_limit = 2 * 1024 * 1024

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA (same replies: 503/501, 354, 552 over SIZE, 500 for a line over
        the limit), but the message goes to the spool file as it arrives, dot-unstuffed."""
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
        handler: Handler = self.event_handler
        receiving = handler.receive(self.session, self.envelope)
        committed = False
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            status = await self._receive_data(receiving)
            if status == GONE:
                return
            if status is None:
                # From here the commit owns the file (it cleans up itself on failure): a
                # client gone during the fsync must not close the fd under the thread.
                committed = True
                status = await handler.accept(receiving)
            self._set_post_data_state()
            await self.push(status)
        finally:
            if not committed:
                receiving.abort()

    async def _receive_data(self, receiving: spool.Receiving) -> str | None:
        """Read DATA up to the lone dot into ``receiving``; an error reply, or None if whole.

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
                # Only the first line in buf can be long: the others lie inside one chunk.
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
                receiving.write(buf[:cut].replace(b"\r\n.", b"\r\n")[2:])
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


def smtp_factory(settings: config.Settings, handler: Handler):
    """Protocol factory for ``loop.create_server`` (hostname given: no DNS look-up).

    ``ingest.smtp_timeout_seconds`` bounds how long a client may stay silent between
    commands and how long one DATA transfer may take, so slow or stuck clients are dropped.
    """
    hostname = settings.general.domain or "localhost"
    timeout = settings.ingest.smtp_timeout_seconds

    def factory() -> SMTP:
        return IngestSMTP(
            handler,
            hostname=hostname,
            ident="mailtally ingest",
            data_size_limit=settings.ingest.max_message_size,
            decode_data=False,
            enable_SMTPUTF8=True,
            timeout=timeout,
        )

    return factory
