"""The submission server (aiosmtpd): AUTH, sender checks, SIZE, durable acceptance.

AUTH PLAIN/LOGIN is offered only over TLS (STARTTLS or the implicit-TLS listener), except
to clients on loopback or ``relay.trusted_networks``; every client must authenticate
(530 otherwise), so the relay is never open. MAIL FROM must be one of the authenticated
user's addresses (553), and so must the From header (checked at DATA).

AUTH failures are limited per client address and per user name (454 past
``relay.auth_max_failures`` in ``relay.auth_window_seconds``, without running scrypt), and
successful checks are remembered briefly (``relay.authguard``). A session that sends no
complete command for ``relay.smtp_timeout_seconds`` (a DATA body counts from the DATA
command) is closed. Accepted messages are made durable by group commit (``relay.commit``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import ssl
from concurrent.futures import ThreadPoolExecutor

from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

import config
import store
from ingest.smtpdata import StreamedDataSMTP
from relay import authguard, prepare_process, submit
from relay.commit import GroupCommitter
from store import addresses
from store import users as store_users

log = logging.getLogger("mailtally.relay")


class _QuietLegacyWarning(logging.Filter):
    """aiosmtpd 1.4 warns about its own use of ``Session.login_data`` on every AUTH."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "login_data is deprecated" not in record.getMessage()


logging.getLogger("mail.log").addFilter(_QuietLegacyWarning())


class _Deferred:
    """Credentials whose check still has to run (off the event loop)."""

    def __init__(self, mechanism: str, auth_data) -> None:
        self.mechanism, self.auth_data = mechanism, auth_data


# ``<local@domain>`` with a dot-atom local part and a plain domain, followed by nothing or by
# ESMTP parameters without comments, quotes or escapes: what clients send. For these
# aiosmtpd's parser (email's header-value parser, ~80 us per MAIL or RCPT) gives exactly
# the address between the brackets and the rest without its leading blanks.
_PLAIN_PATH = re.compile(
    rf"<({submit.PLAIN_ADDRESS.pattern})>"
    r"(?:[ \t]*([!#-'*-\[\]-~][ !#-'*-\[\]-~]*))?"
)


class RelaySMTP(StreamedDataSMTP):
    """aiosmtpd's SMTP with AUTH-over-plaintext decided per client address, and DATA read
    in chunks (``ingest.smtpdata``: aiosmtpd's per-line reading was the largest CPU item).

    Lines up to 2 MiB are accepted in DATA (RFC 5321 says 1000, but real clients send
    longer ones and refusing them would lose mail); the message goes out as it came.
    """

    line_length_limit = 2 * 1024 * 1024

    def __init__(self, *args, trusted: list, implicit_tls: bool, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._trusted = trusted
        self._implicit_tls = implicit_tls

    def _getaddr(self, arg: str):  # type: ignore[override]
        """aiosmtpd's parse of a MAIL/RCPT path, without its parser for the plain case."""
        found = _PLAIN_PATH.fullmatch(arg)
        if found is None:
            return super()._getaddr(arg)
        addr = found.group(1)
        if self.local_part_limit and len(addr.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return addr, found.group(2) or ""

    # The scrypt check takes tens of milliseconds of CPU: aiosmtpd calls the authenticator
    # synchronously, so it is deferred here and run in the handler's auth thread instead of
    # stalling every other session on the event loop.
    def _authenticate(self, mechanism: str, auth_data):  # type: ignore[override]
        return _Deferred(mechanism, auth_data)

    async def _finish(self, result):
        if isinstance(result, _Deferred):
            handler = self.event_handler
            return await asyncio.get_running_loop().run_in_executor(
                handler.auth_executor,
                handler.authenticator,
                self,
                self.session,
                self.envelope,
                result.mechanism,
                result.auth_data,
            )
        return result

    async def auth_PLAIN(self, _, args):  # noqa: N802 (aiosmtpd's naming)
        return await self._finish(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _, args):  # noqa: N802
        return await self._finish(await super().auth_LOGIN(_, args))

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        trusted = False
        try:
            ip = ipaddress.ip_address(peer[0]) if peer else None
            if ip is not None and ip.version == 6 and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            trusted = ip is not None and any(ip in n for n in self._trusted)
        except (ValueError, TypeError):
            trusted = False
        self._auth_require_tls = not (trusted or self._implicit_tls)


class Handler:
    """aiosmtpd hooks; the slow work runs off the event loop.

    ``preparer``: checks, rewriting plans and rendering, in a process of its own
    (``relay.prepare_process``: most of the CPU per message, off this process's GIL);
    ``committer``: rows, copies and durable queueing of every waiting message at once;
    ``auth_executor``: scrypt.
    """

    def __init__(self, settings: config.Settings, on_queued=None) -> None:
        self.settings = settings
        self.preparer = prepare_process.PrepareProcess(settings)
        self.committer = GroupCommitter(settings, renderer=self.preparer.render)
        self.auth_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-auth")
        self.auth_db = store.connect(settings.db_path, migrate=False)  # used by auth_executor
        self.mail_db = store.connect(settings.db_path, migrate=False)  # on the event loop
        self.limiter = authguard.FailureLimiter(
            settings.relay.auth_max_failures, settings.relay.auth_window_seconds
        )
        self.verified = authguard.VerifiedCache(settings.relay.auth_cache_seconds)
        self.on_queued = on_queued

    def close(self) -> None:
        self.auth_executor.shutdown(wait=True)
        self.committer.close()
        self.preparer.close()
        self.auth_db.close()
        self.mail_db.close()

    # --- AUTH ---------------------------------------------------------------------------------

    def authenticator(self, server, session: Session, envelope: Envelope, mechanism, auth_data):
        """Check the relay password (runs in ``auth_executor``): limits, cache, then scrypt."""
        ip = session.peer[0] if isinstance(session.peer, tuple) and session.peer else None
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        try:
            login = auth_data.login.decode("utf-8")
            password = auth_data.password.decode("utf-8")
        except UnicodeDecodeError:
            self.limiter.failed(ip, None)
            return AuthResult(success=False, handled=False)
        if self.limiter.blocked(ip, login):
            log.warning("relay: AUTH for %r from %s refused: too many failures", login, ip)
            return AuthResult(success=False, handled=False, message=authguard.LIMITED_REPLY)
        user = store_users.find_user(self.auth_db, login)
        if user is not None and self.verified.hit(login, password, user["password_hash"]):
            return AuthResult(success=True, auth_data=user)
        user = store_users.check_password(user, password)  # scrypt (same time for no user)
        if user is None:
            self.limiter.failed(ip, login)
            log.info("relay: failed AUTH for %r from %s", login, session.peer)
            return AuthResult(success=False, handled=False)
        self.verified.remember(login, password, user["password_hash"])
        return AuthResult(success=True, auth_data=user)

    # --- envelope -----------------------------------------------------------------------------

    async def handle_MAIL(
        self, server, session: Session, envelope: Envelope, address, mail_options
    ):
        user = session.auth_data
        if not isinstance(user, dict):
            return "530 5.7.0 Authentication required"
        addr = submit.normalized(address)
        # One indexed read (~10 us; WAL: a reader never waits for a writer), on the event
        # loop's own connection: a hop to a thread and back cost more than the read, and
        # under load each hop waited for the GIL.
        own = submit.user_addresses(self.mail_db, user["id"])
        if addr not in own:
            return f"553 5.7.1 Sender address {addr or '<>'} is not one of your addresses"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope: Envelope, address, rcpt_options):
        if len(envelope.rcpt_tos) >= self.settings.relay.max_recipients:
            return "452 4.5.3 Too many recipients"
        if not addresses.is_valid(submit.normalized(address)):
            return "553 5.1.3 Invalid recipient address"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server, session: Session, envelope: Envelope):
        user = session.auth_data
        if not isinstance(user, dict):
            return "530 5.7.0 Authentication required"
        data = envelope.original_content or envelope.content
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        try:
            prepared = await self.preparer.prepare(
                user, envelope.mail_from, list(envelope.rcpt_tos), data
            )
        except submit.Refused as exc:
            return exc.reply
        except Exception:
            log.exception("relay: could not queue a message")
            return "451 4.3.0 Could not queue the message; try again later"
        try:  # rows, copies, spool file and outbox rows: with every other waiting message
            prepared.result.outbox_ids = await self.committer.commit(prepared)
        except Exception:
            return "451 4.3.0 Could not queue the message; try again later"
        if self.on_queued:
            self.on_queued()
        return f"250 2.0.0 OK queued as {prepared.result.email_id}"


def tls_context(settings: config.Settings) -> ssl.SSLContext | None:
    if not settings.relay.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(settings.relay.tls_cert, settings.relay.tls_key)
    return ctx


def factory(settings: config.Settings, handler: Handler, *, implicit_tls: bool = False):
    """A protocol factory for ``loop.create_server``."""
    trusted = [ipaddress.ip_network(n, strict=False) for n in settings.relay.trusted_networks]
    context = tls_context(settings)
    hostname = settings.general.domain or "localhost"

    def make() -> RelaySMTP:
        return RelaySMTP(
            handler,
            hostname=hostname,
            ident="mailtally relay",
            data_size_limit=settings.relay.max_message_size,
            timeout=settings.relay.smtp_timeout_seconds,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=None if implicit_tls else context,
            require_starttls=False,
            authenticator=handler.authenticator,
            auth_required=True,
            auth_require_tls=True,
            trusted=trusted,
            implicit_tls=implicit_tls,
        )

    return make
