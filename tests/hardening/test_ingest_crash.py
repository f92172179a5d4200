"""Crash safety of the ingest (SPEC ingest 1, 6): `mailtally ingest` is SIGKILLed at random
(seeded) moments during a burst of 500 messages from several concurrent clients and
restarted each time. Afterwards every message that got 250 is logged exactly once; a message
whose answer was lost to the kill may be absent, but is never logged twice.

(tests/ingest/test_listener.py kills once between a 250 and processing; this one kills
while messages are being received, spooled, parsed and committed in batches.)"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import aiosmtplib

import store
from ingest import spool
from tests.hardening.ingest_helpers import USER, IngestProcess, make_settings, port_of, small_mail
from tests.support import wait_for

TOTAL = 500
CLIENTS = 6
KILLS = 3


async def test_sigkill_during_a_burst_loses_nothing_and_logs_nothing_twice(tmp_path):
    settings = make_settings(tmp_path / "data")
    port, rcpt = port_of(settings), settings.ingest.bcc_address
    server = IngestProcess(settings, tmp_path / "ingest.log")
    await server.start()
    rng = random.Random(20261123)
    queue = list(range(TOTAL))
    accepted: set[int] = set()
    unanswered: set[int] = set()  # sent, but the connection died before the reply
    refused: dict[int, int] = {}
    up = asyncio.Event()
    up.set()

    async def client() -> None:
        smtp = None
        while queue:
            if smtp is None:
                await up.wait()
                smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=20)
                try:
                    await smtp.connect()
                except (OSError, aiosmtplib.SMTPException):
                    smtp = None  # down between a kill and the restart: nothing was sent
                    await asyncio.sleep(0.05)
                    continue
            i = queue.pop(0)
            try:
                await smtp.sendmail(USER, [rcpt], small_mail(f"burst-{i}"))
                accepted.add(i)
            except aiosmtplib.SMTPResponseException as exc:
                if exc.code in (421, -1):  # the server went away mid-transaction
                    unanswered.add(i)
                    smtp = None
                else:
                    refused[i] = exc.code
            except (OSError, aiosmtplib.SMTPException):
                unanswered.add(i)
                smtp = None
        if smtp is not None:
            try:
                await smtp.quit()
            except (OSError, aiosmtplib.SMTPException):
                pass

    async def killer() -> None:
        # Random moments inside the burst: after a random number of messages were sent,
        # plus a random few milliseconds (to land in receiving, spooling or filing).
        for at in sorted(rng.sample(range(40, TOTAL - 60), KILLS)):
            while TOTAL - len(queue) < at:
                await asyncio.sleep(0.002)
            await asyncio.sleep(rng.uniform(0, 0.03))
            up.clear()
            server.kill()
            await server.start()
            up.set()

    try:
        await asyncio.gather(killer(), *(client() for _ in range(CLIENTS)))
        # Drain: whatever was spooled before a kill is processed after the restart.
        db = store.connect(settings.db_path)
        try:

            def filed() -> bool:
                ids = {r[0] for r in db.execute("SELECT message_id FROM inbound_log")}
                return not spool.pending(spool.spool_dir(settings)) and all(
                    f"<burst-{i}@hardening.test>" in ids for i in accepted
                )

            await wait_for(filed, timeout=90, interval=0.1)
            emails = Counter(r[0] for r in db.execute("SELECT message_id FROM emails"))
            entries = Counter(r[0] for r in db.execute("SELECT message_id FROM inbound_log"))
            decisions = Counter(r[0] for r in db.execute("SELECT decision FROM inbound_log"))
        finally:
            db.close()
    finally:
        server.stop()

    assert server.proc.returncode is not None
    # The kills really interrupted the burst (else this test proves nothing).
    assert len(unanswered) >= KILLS, "the kills did not hit the burst"
    assert len(accepted) + len(unanswered) + len(refused) == TOTAL
    assert all(400 <= code < 500 for code in refused.values()), refused
    for i in accepted:
        mid = f"<burst-{i}@hardening.test>"
        assert emails[mid] == 1, (i, emails[mid])
        assert entries[mid] == 1, (i, entries[mid])
    # Never twice, whatever happened to the reply.
    assert max(emails.values()) == 1 and max(entries.values()) == 1
    assert set(emails) <= {f"<burst-{i}@hardening.test>" for i in accepted | unanswered}
    assert decisions.keys() == {"logged"}, decisions
    # Nothing half-written stays behind once the last start has cleaned up.
    assert list((spool.spool_dir(settings) / "tmp").iterdir()) == []
    print(
        f"\n{TOTAL} sent, {KILLS} SIGKILLs: {len(accepted)} got 250, "
        f"{len(unanswered)} unanswered ({sum(emails[f'<burst-{i}@hardening.test>'] for i in unanswered)}"
        f" of them logged anyway), {len(refused)} refused"
    )
