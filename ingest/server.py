"""The inbound SMTP listener: only the two logging addresses, spooled before 250."""

from __future__ import annotations

import asyncio

from aiosmtpd.smtp import SMTP, Envelope, Session

import config
from ingest import spool
from store import addresses


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

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or envelope.content or b""
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        try:
            await asyncio.to_thread(
                spool.write,
                self.root,
                envelope.mail_from or "",
                list(envelope.rcpt_tos),
                data,
                {"peer": peer},
            )
        except OSError as exc:
            return f"451 4.3.0 cannot spool the message now ({exc.strerror or exc}); try again"
        return "250 2.0.0 Accepted for logging"


class IngestSMTP(SMTP):
    """aiosmtpd with DATA lines up to 2 MiB: real-world mail breaks the 1000-octet rule and
    must be logged or explained, not refused (commands keep their own small limits)."""

    line_length_limit = 2 * 1024 * 1024


def smtp_factory(settings: config.Settings, handler: Handler):
    """Protocol factory for ``loop.create_server`` (hostname given: no DNS look-up)."""
    hostname = settings.general.domain or "localhost"

    def factory() -> SMTP:
        return IngestSMTP(
            handler,
            hostname=hostname,
            ident="mailtally ingest",
            data_size_limit=settings.ingest.max_message_size,
            decode_data=False,
            enable_SMTPUTF8=True,
            timeout=300,
        )

    return factory
