"""The inbound SMTP listener: only the two logging addresses, spooled before 250.

DATA is streamed straight into the spool file as it arrives (``ingest.smtpdata``)
instead of letting aiosmtpd gather the message in memory: aiosmtpd keeps every line as its
own bytearray and then joins them, which peaks at about 4x the message (270 MB for a 68 MB
mail with a 50 MB attachment). Streamed, the listener holds at most one line and one write
chunk per connection, whatever the message weighs.
"""

from __future__ import annotations

import asyncio
import logging

from aiosmtpd.smtp import SMTP, Envelope, Session

import config
from ingest import spool
from ingest.smtpdata import StreamedDataSMTP
from store import addresses

log = logging.getLogger("mailtally.ingest")


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


class IngestSMTP(StreamedDataSMTP):
    """aiosmtpd with DATA streamed to the spool, and DATA lines up to 2 MiB: real-world mail
    breaks the 1000-octet rule and must be logged or explained, not refused (commands keep
    their own small limits)."""

    line_length_limit = 2 * 1024 * 1024

    def open_sink(self) -> spool.Receiving:
        assert self.envelope is not None and self.session is not None
        return self.event_handler.receive(self.session, self.envelope)

    async def finish(self, sink: spool.Receiving) -> str:  # type: ignore[override]
        return await self.event_handler.accept(sink)


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
