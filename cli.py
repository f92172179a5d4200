"""The ``mailtally`` command: services, admin and reports.

Every command finds its configuration by ``--config``, ``$MAILTALLY_CONFIG`` or
``./mailtally-data/config.toml``, builds the settings objects and hands them to the
component it runs. Errors are one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import asyncio
import csv
import datetime
import importlib
import importlib.util
import io
import json
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import click
import sqlite_utils

import config
import store
from store import contacts as store_contacts
from store import deals as store_deals
from store import users as store_users

FORMATS = click.Choice(["table", "json", "csv"])


# --- application context --------------------------------------------------------------------


class App:
    """Lazily loaded settings and database for one CLI invocation."""

    def __init__(self, config_path: Path | None) -> None:
        self.config_path = config_path or config.default_config_path()
        self._settings: config.Settings | None = None
        self._db: sqlite_utils.Database | None = None

    @property
    def settings(self) -> config.Settings:
        if self._settings is None:
            self._settings = config.load(self.config_path)
        return self._settings

    @property
    def db(self) -> sqlite_utils.Database:
        if self._db is None:
            self._db = store.connect(self.settings.db_path, create=False)
        return self._db


pass_app = click.make_pass_decorator(App)


class Group(click.Group):
    """A click group that turns known errors into one line and a non-zero exit."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except (config.ConfigError, store.StoreError) as exc:
            fail(str(exc))
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            fail("interrupted", code=130)
        except Exception as exc:  # never a traceback for the user
            if os.environ.get("MAILTALLY_DEBUG"):
                raise
            fail(f"{type(exc).__name__}: {exc} (set MAILTALLY_DEBUG=1 for details)")


def fail(message: str, code: int = 1) -> None:
    """Print one error line and exit."""
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


# --- output ---------------------------------------------------------------------------------


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, list | dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def emit(
    rows: Sequence[dict],
    fmt: str,
    columns: Sequence[str] | None = None,
    *,
    title: str | None = None,
    empty: str = "Nothing to show.",
) -> None:
    """Print rows as a rich table, JSON (a list of objects) or CSV with a header."""
    columns = list(columns or (rows[0].keys() if rows else []))
    if fmt == "json":
        click.echo(json.dumps(list(rows), indent=2, ensure_ascii=False, default=str))
        return
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        for r in rows:
            writer.writerow([_cell(r.get(c)) for c in columns])
        click.echo(buf.getvalue(), nl=False)
        return
    if not rows:
        click.echo(empty)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False, header_style="bold")
    for i, c in enumerate(columns):
        # The first column identifies the row (an address, a name): never fold it.
        table.add_column(c.replace("_", " "), overflow="fold", no_wrap=i == 0)
    for r in rows:
        table.add_row(*[_cell(r.get(c)) for c in columns])
    Console(soft_wrap=False).print(table)


def emit_object(obj: dict, fmt: str) -> None:
    """Print one record: JSON on request, else key/value lines."""
    if fmt == "json":
        click.echo(json.dumps(obj, indent=2, ensure_ascii=False, default=str))
        return
    width = max(len(k) for k in obj) if obj else 0
    for key, value in obj.items():
        click.echo(f"{key.replace('_', ' '):<{width}}  {_cell(value)}")


def format_option(f: Callable) -> Callable:
    return click.option(
        "--format", "fmt", type=FORMATS, default="table", show_default=True, help="Output format."
    )(f)


# --- root -----------------------------------------------------------------------------------


@click.group(cls=Group)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Config file (default: $MAILTALLY_CONFIG or ./mailtally-data/config.toml).",
)
@click.version_option(package_name="mailtally")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None) -> None:
    """mailtally: self-hosted email tracking and CRM logging."""
    ctx.obj = App(config_path)


def write_new_config(directory: Path, force: bool, domain: str) -> Path:
    """Write ``DIR/config.toml`` (0600) with fresh secrets; refuse to overwrite unless forced."""
    path = directory / config.CONFIG_NAME
    if path.exists() and not force:
        raise config.ConfigError(f"{path} already exists (use --force to overwrite)")
    directory.mkdir(parents=True, exist_ok=True)
    try:
        directory.chmod(0o700)
    except OSError:
        pass
    text = config.render(config.new_config(domain))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(path, 0o600)
    return path


def initialise(directory: Path, force: bool = False, domain: str = "localhost") -> config.Settings:
    """Create config and database in ``directory``; return the loaded settings."""
    path = write_new_config(directory, force, domain)
    settings = config.load(path)
    store.connect(settings.db_path).close()
    return settings


@main.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory for config.toml and data (default: ./mailtally-data).",
)
@click.option(
    "--domain", default="localhost", show_default=True, help="Mail domain of the logging addresses."
)
@click.option("--force", is_flag=True, help="Overwrite an existing config.toml.")
@click.option("--tls", is_flag=True, help="Generate a self-signed certificate for the relay.")
@pass_app
def init(app: App, directory: Path | None, domain: str, force: bool, tls: bool) -> None:
    """Write config.toml with fresh secrets and create the database."""
    directory = directory or (
        app.config_path.parent if app.config_path else Path(config.DEFAULT_DIR)
    )
    settings = initialise(directory, force, domain)
    if tls:
        from relay import tlscert

        cert, _ = tlscert.enable_in_config(settings.config_path, domain)
        settings = config.load(settings.config_path)
        click.echo(f"Wrote a self-signed certificate {cert} (key mode 0600) for {domain}")
    click.echo(f"Wrote {settings.config_path} (mode 0600) and {settings.db_path}")
    click.echo(f"BCC logging address:        {settings.ingest.bcc_address}")
    click.echo(f"Forwarding logging address: {settings.ingest.forward_address}")


def where(settings: config.Settings) -> dict:
    """Where every part of mailtally lives and listens."""
    return {
        "config": str(settings.config_path),
        "data_dir": str(settings.data_dir),
        "database": str(settings.db_path),
        "relay": settings.relay.listen,
        "relay_tls": settings.relay.tls_listen or None,
        "ingest": settings.ingest.listen,
        "tracker": settings.tracker.listen,
        "tracker_base_url": settings.tracker.base_url,
        "upstream": settings.relay.upstream,
        "bcc_address": settings.ingest.bcc_address,
        "forward_address": settings.ingest.forward_address,
    }


@main.command()
@format_option
@pass_app
def info(app: App, fmt: str) -> None:
    """Print where everything is: listen addresses, logging addresses, data."""
    emit_object(where(app.settings), "json" if fmt == "json" else "table")


# --- services -------------------------------------------------------------------------------

SERVICES = ("relay", "ingest", "tracker")


def available_services() -> list[str]:
    """The services whose ``<name>.service`` module exists in this build."""
    return [s for s in SERVICES if importlib.util.find_spec(f"{s}.service") is not None]


async def serve(settings: config.Settings, names: Iterable[str]) -> None:
    """Start the named services, print where each listens, run until SIGINT/SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    running = []
    try:
        for name in names:
            module = importlib.import_module(f"{name}.service")
            service = await module.start(settings)
            running.append(service)
            for line in service.banner():
                click.echo(line)
        click.echo("mailtally is running; Ctrl-C to stop.")
        sys.stdout.flush()
        await stop.wait()
        click.echo("Stopping…")
    finally:
        for service in reversed(running):
            await service.stop()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The event loop the services run on: uvloop where it is installed (a dependency on
    Linux and macOS). The tracker's HTTP side spends most of its CPU in the loop and in
    aiohttp's transport calls, and uvloop's cost about half as much (bench/bench_tracker.py
    measures both servers on this loop). Plain asyncio elsewhere, or with
    ``MAILTALLY_EVENT_LOOP=asyncio``."""
    if os.environ.get("MAILTALLY_EVENT_LOOP", "").lower() != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    # The default policy's loop, not asyncio.new_event_loop(): a policy that makes its
    # loops here (the test suite's) must not be asked again.
    return asyncio.DefaultEventLoopPolicy().new_event_loop()


def run_services(app: App, names: list[str]) -> None:
    settings = app.settings
    store.connect(settings.db_path).close()  # create/upgrade before any service starts
    if not names:
        fail("no service is available in this build")
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(serve(settings, names))
    except OSError as exc:
        fail(f"cannot start: {exc.strerror or exc}")


@main.command()
@pass_app
def run(app: App) -> None:
    """Run relay, ingest and tracker in one process."""
    if (
        not app.config_path.exists()
        and app.config_path == Path(config.DEFAULT_DIR) / config.CONFIG_NAME
    ):
        click.echo(f"No configuration found: initialising ./{config.DEFAULT_DIR}")
        initialise(Path(config.DEFAULT_DIR))
    run_services(app, available_services())


def _service_command(name: str) -> None:
    @main.command(name=name, help=f"Run the {name} alone.")
    @pass_app
    def command(app: App) -> None:
        if name not in available_services():
            fail(f"the {name} is not available in this build")
        run_services(app, [name])


for _name in SERVICES:
    _service_command(_name)


# --- users ----------------------------------------------------------------------------------


def read_password(from_stdin: bool) -> str | None:
    """A password from stdin (first line), an interactive prompt, or None when neither."""
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            fail("empty password on stdin")
        return password
    if sys.stdin.isatty():
        return click.prompt("Relay password", hide_input=True, confirmation_prompt=True)
    return None


@main.group()
def users() -> None:
    """Users of the account and their addresses."""


@users.command("add")
@click.argument("email")
@click.option("--name", default="", help="Display name.")
@click.option("--password-stdin", is_flag=True, help="Read the relay password from stdin.")
@pass_app
def users_add(app: App, email: str, name: str, password_stdin: bool) -> None:
    """Add a user (prompts for the relay password when interactive)."""
    user = store_users.add_user(app.db, email, name, read_password(password_stdin))
    click.echo(f"Added user {user['email']}")


@users.command("list")
@format_option
@pass_app
def users_list(app: App, fmt: str) -> None:
    """List users and their defaults."""
    rows = store_users.list_users(app.db)
    for r in rows:
        for k in ("track_opens", "track_clicks", "log_sent", "has_password"):
            r[k] = bool(r[k])
    emit(
        rows,
        fmt,
        ["email", "name", "track_opens", "track_clicks", "log_sent", "addresses", "has_password"],
        empty="No users yet: add one with `mailtally users add EMAIL`.",
    )


@users.command("remove")
@click.argument("email")
@pass_app
def users_remove(app: App, email: str) -> None:
    """Remove a user (their logged emails stay, unattributed)."""
    store_users.remove_user(app.db, email)
    click.echo(f"Removed user {store.addresses.normalize(email)}")


@users.command("password")
@click.argument("email")
@click.option("--password-stdin", is_flag=True, help="Read the new password from stdin.")
@pass_app
def users_password(app: App, email: str, password_stdin: bool) -> None:
    """Set a user's relay password."""
    store_users.get_user(app.db, email)
    password = read_password(password_stdin)
    if password is None:
        fail("no password given (use --password-stdin or run interactively)")
    store_users.set_password(app.db, email, password)
    click.echo(f"Password set for {store.addresses.normalize(email)}")


@users.command("defaults")
@click.argument("email")
@click.option("--opens/--no-opens", default=None, help="Track opens by default.")
@click.option("--clicks/--no-clicks", default=None, help="Track clicks by default.")
@click.option("--log/--no-log", default=None, help="Log sent mail on contacts by default.")
@format_option
@pass_app
def users_defaults(
    app: App, email: str, opens: bool | None, clicks: bool | None, log: bool | None, fmt: str
) -> None:
    """Show or change a user's tracking and logging defaults."""
    user = store_users.set_defaults(app.db, email, opens, clicks, log)
    emit_object(
        {
            "user": user["email"],
            "track_opens": bool(user["track_opens"]),
            "track_clicks": bool(user["track_clicks"]),
            "log_sent": bool(user["log_sent"]),
        },
        fmt,
    )


@users.group("address")
def users_address() -> None:
    """Connect or disconnect a user's addresses."""


@users_address.command("add")
@click.argument("user")
@click.argument("address")
@click.option("--kind", type=click.Choice(store_users.KINDS), required=True)
@pass_app
def users_address_add(app: App, user: str, address: str, kind: str) -> None:
    """Connect ADDRESS to USER as personal inbox, alias or team inbox."""
    added = store_users.add_address(app.db, user, address, kind)
    click.echo(f"Added {added['kind']} address {added['address']} to {added['user']}")


@users_address.command("remove")
@click.argument("user")
@click.argument("address")
@pass_app
def users_address_remove(app: App, user: str, address: str) -> None:
    """Disconnect ADDRESS from USER."""
    store_users.remove_address(app.db, user, address)
    click.echo(
        f"Removed {store.addresses.normalize(address)} from {store.addresses.normalize(user)}"
    )


@users_address.command("list")
@click.argument("user")
@format_option
@pass_app
def users_address_list(app: App, user: str, fmt: str) -> None:
    """List USER's addresses."""
    emit(store_users.addresses_of(app.db, store_users.get_user(app.db, user)["id"]), fmt)


# --- never-log ------------------------------------------------------------------------------


@main.group("never-log")
def never_log() -> None:
    """Addresses and @domains that are never logged."""


@never_log.command("add")
@click.argument("entry")
@pass_app
def never_log_add(app: App, entry: str) -> None:
    """Add an address or @domain (covers subdomains)."""
    click.echo(f"Added {store_contacts.never_log_add(app.db, entry)} to the never-log list")


@never_log.command("remove")
@click.argument("entry")
@pass_app
def never_log_remove(app: App, entry: str) -> None:
    """Remove an entry."""
    store_contacts.never_log_remove(app.db, entry)
    click.echo(f"Removed {entry.strip().lower()} from the never-log list")


@never_log.command("list")
@format_option
@pass_app
def never_log_list(app: App, fmt: str) -> None:
    """List the never-log entries."""
    emit(
        store_contacts.never_log_list(app.db),
        fmt,
        ["entry", "created_at"],
        empty="The never-log list is empty.",
    )


# --- contacts -------------------------------------------------------------------------------


@main.group()
def contacts() -> None:
    """Contacts: list, timeline, lawful basis, GDPR erasure."""


@contacts.command("list")
@format_option
@pass_app
def contacts_list(app: App, fmt: str) -> None:
    """List contacts."""
    emit(store_contacts.list_contacts(app.db), fmt, empty="No contacts yet.")


@contacts.command("show")
@click.argument("email")
@format_option
@pass_app
def contacts_show(app: App, email: str, fmt: str) -> None:
    """A contact: company, deals, lawful basis, engagement, and its timeline (newest first)."""
    from store import reports

    detail = reports.contact_detail(app.db, email)
    if fmt == "json":
        emit_object(detail, "json")
        return
    if fmt == "csv":
        emit(detail["timeline"], "csv", ["at", "kind", "subject", "detail", "message_id"])
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    deals = ", ".join(f"{d['name']} ({d['stage']})" for d in detail["deals"]) or "-"
    company = detail["company_name"] or detail["company"] or "-"
    if detail["company"] and detail["company_name"] not in (None, detail["company"]):
        company += f" ({detail['company']})"
    head = {
        "contact": f"{detail['name']} <{detail['email']}>" if detail["name"] else detail["email"],
        "company": company,
        "deals": deals,
        "lawful basis": detail["lawful_basis"],
        "emails": f"{detail['emails']} · opens {detail['opens']} · clicks {detail['clicks']}"
        f" · replies {detail['replies']}",
    }
    for key in ("last_open_at", "last_click_at", "last_reply_at", "last_engagement_at"):
        value = detail[key]
        head[key[:-3].replace("_", " ")] = (
            f"{local_time(value)} ({relative_time(value)})" if value else "never"
        )
    width = max(len(k) for k in head)
    for key, value in head.items():
        click.echo(f"{key:<{width}}  {value}")
    click.echo("")
    if not detail["timeline"]:
        click.echo("No activity yet.")
        return
    labels = {
        "sent": "sent",
        "logged": "logged",
        "open": "opened",
        "click": "clicked",
        "reply": "replied",
    }
    table = Table(title="Timeline (newest first)", box=box.SIMPLE_HEAD, header_style="bold")
    table.add_column("When", no_wrap=True)
    table.add_column("What", no_wrap=True)
    table.add_column("Email", ratio=1, overflow="fold")
    table.add_column("Detail", ratio=1, overflow="fold")
    for t in detail["timeline"]:
        what = labels.get(t["kind"], t["kind"])
        detail_text = t["detail"]
        if t["kind"] == "click":
            detail_text = detail_text.split("://", 1)[-1]
        table.add_row(when(t["at"]), what, t["subject"] or "(no subject)", detail_text)
    Console(soft_wrap=False).print(table)


@contacts.command("basis")
@click.argument("email")
@click.option("--granted", "basis", flag_value="yes", help="A lawful basis exists.")
@click.option(
    "--revoked", "basis", flag_value="no", help="No lawful basis (privacy mode logs nothing)."
)
@click.option("--unknown", "basis", flag_value="unknown", help="Not known.")
@pass_app
def contacts_basis(app: App, email: str, basis: str | None) -> None:
    """Show or set the GDPR lawful basis of a contact."""
    if basis is None:
        click.echo(store_contacts.get_contact(app.db, email)["lawful_basis"])
        return
    contact = store_contacts.set_basis(app.db, email, basis)
    click.echo(f"Lawful basis of {contact['email']}: {contact['lawful_basis']}")


@contacts.command("forget")
@click.argument("email")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_app
def contacts_forget(app: App, email: str, yes: bool) -> None:
    """GDPR erasure: delete everything about EMAIL, keep only a one-way hash."""
    addr = store.addresses.normalize(email)
    if not store.addresses.is_valid(addr):
        fail(f"invalid email address: {email!r}")
    if not yes:
        if not sys.stdin.isatty():
            fail("refusing to erase without confirmation (use --yes)")
        click.confirm(
            f"Permanently erase {addr} and its emails, events and attachments?", abort=True
        )
    summary = store_contacts.forget(app.db, addr, app.settings.data_dir / "attachments")
    click.echo(
        f"Erased {addr}: {summary['emails_deleted']} emails deleted, "
        f"{summary['emails_scrubbed']} scrubbed, {summary['events_deleted']} events deleted"
    )


# --- deals ----------------------------------------------------------------------------------


@main.group()
def deals() -> None:
    """Deals that logged emails are filed on."""


@deals.command("add")
@click.argument("name")
@click.option("--contact", "contact_emails", multiple=True, help="Contact email (repeatable).")
@pass_app
def deals_add(app: App, name: str, contact_emails: tuple[str, ...]) -> None:
    """Create an open deal."""
    deal = store_deals.add_deal(app.db, name, list(contact_emails))
    click.echo(f"Added deal {deal['id']}: {deal['name']}")


@deals.command("link")
@click.argument("deal")
@click.argument("contact")
@pass_app
def deals_link(app: App, deal: str, contact: str) -> None:
    """Link CONTACT to DEAL (id or name)."""
    store_deals.link(app.db, deal, contact)
    click.echo(f"Linked {store.addresses.normalize(contact)} to deal {deal}")


@deals.command("close")
@click.argument("deal")
@click.option("--won", "won", flag_value=True, default=None)
@click.option("--lost", "won", flag_value=False)
@pass_app
def deals_close(app: App, deal: str, won: bool | None) -> None:
    """Close DEAL as won or lost."""
    if won is None:
        fail("say --won or --lost")
    closed = store_deals.close(app.db, deal, won)
    click.echo(f"Deal {closed['id']} closed as {closed['stage']}")


@deals.command("list")
@format_option
@pass_app
def deals_list(app: App, fmt: str) -> None:
    """List deals."""
    emit(store_deals.list_deals(app.db), fmt, empty="No deals yet.")


# --- ingest: explain and inbound log ---------------------------------------------------------


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--as",
    "as_kind",
    type=click.Choice(["auto", "bcc", "forward"]),
    default="auto",
    show_default=True,
    help="Treat it as sent to the BCC or the forwarding address (auto: from its headers).",
)
@format_option
@pass_app
def explain(app: App, file: Path, as_kind: str, fmt: str) -> None:
    """What the ingest would log for FILE.eml, and why (nothing is stored)."""
    from ingest import process

    try:
        data = file.read_bytes()
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror or exc}")
    plan = process.explain(app.settings, app.db, data, as_kind=as_kind)
    if fmt == "json":
        emit_object(plan, "json")
        return
    emit_object(process.summary(plan), "table")
    if plan["contacts"]:
        click.echo("")
        emit(
            plan["contacts"],
            fmt,
            ["address", "role", "status", "reason", "company", "deals"],
            title="Contacts",
        )
    if plan["attachments"]:
        click.echo("")
        emit(
            plan["attachments"],
            fmt,
            ["filename", "content_type", "size", "kept", "reason"],
            title="Attachments",
        )


@main.command()
@click.option("--limit", default=50, show_default=True, help="How many entries.")
@format_option
@pass_app
def inbound(app: App, limit: int, fmt: str) -> None:
    """Recent messages received by the ingest and what was decided for each."""
    from store import inbound as store_inbound

    entries = store_inbound.recent_inbound(app.db, limit)
    if fmt != "json":
        for e in entries:
            e["reasons"] = "; ".join(e["reasons"])
            e.pop("details", None)
    emit(
        entries,
        fmt,
        ["received_at", "kind", "decision", "mail_from", "user", "email_id", "reasons"],
        empty="Nothing received yet.",
    )


# --- reports --------------------------------------------------------------------------------
# Human hits only unless --all-hits; JSON times are the stored UTC ISO 8601 with offset,
# tables show local time and relative dates. The JSON shapes are documented in the README.


def local_time(value: str | None, now: datetime.datetime | None = None) -> str:
    """A stored time as a short local time ("Nov 23 14:02"), '' for None."""
    if not value:
        return ""
    moment = datetime.datetime.fromisoformat(value).astimezone()
    now = now or datetime.datetime.now().astimezone()
    if moment.year != now.year:
        return f"{moment:%Y-%m-%d %H:%M}"
    return f"{moment:%b %d %H:%M}"


def relative_time(value: str | None, now: datetime.datetime | None = None) -> str:
    """How long ago, as people say it: "just now", "5 min ago", "2 h ago", "3 d ago"."""
    if not value:
        return ""
    moment = datetime.datetime.fromisoformat(value)
    now = now or datetime.datetime.now(datetime.UTC)
    seconds = (now - moment).total_seconds()
    if seconds < 0:
        return "in the future"
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h ago"
    if seconds < 2 * 86400:
        return "yesterday"
    if seconds < 60 * 86400:
        return f"{int(seconds // 86400)} d ago"
    return f"{int(seconds // (30 * 86400))} mo ago"


def when(value: str | None) -> str:
    """Local time and how long ago, for tables."""
    return f"{local_time(value)}\n{relative_time(value)}" if value else ""


def with_progress(items: Iterable, total: int, label: str) -> Iterator:
    """Yield ``items``; once the work has taken more than a second, show a progress bar on
    stderr (a terminal; ``MAILTALLY_PROGRESS=1`` forces it, ``MAILTALLY_PROGRESS_AFTER``
    changes the delay) so that a long export is not mistaken for a hang."""
    import time

    forced = os.environ.get("MAILTALLY_PROGRESS") == "1"
    show = forced or sys.stderr.isatty()
    after = float(os.environ.get("MAILTALLY_PROGRESS_AFTER", "1"))
    start = time.monotonic()
    progress = task = None
    try:
        for i, item in enumerate(items):
            if i % 500 == 0 and show:
                if progress is None and time.monotonic() - start >= after:
                    from rich.console import Console
                    from rich.progress import Progress

                    progress = Progress(console=Console(stderr=True, force_terminal=forced or None))
                    progress.start()
                    task = progress.add_task(label, total=total)
                if progress is not None:
                    progress.update(task, completed=i)
            yield item
        if progress is not None:
            progress.update(task, completed=total)
    finally:
        if progress is not None:
            progress.stop()


def report_filter(
    since: str | None,
    until: str | None,
    user: str | None,
    contact: str | None = None,
    tracked: bool | None = None,
):
    from store import reports

    return reports.Filter(
        since=reports.parse_when(since) if since else None,
        until=reports.parse_when(until, end=True) if until else None,
        user=user,
        contact=contact,
        tracked=tracked,
    )


def period_options(f: Callable) -> Callable:
    f = click.option("--user", metavar="EMAIL", help="Only this user's emails (account email).")(f)
    f = click.option(
        "--until", metavar="DATE", help="Up to this day (YYYY-MM-DD, included) or ISO datetime."
    )(f)
    f = click.option(
        "--since", metavar="DATE", help="From this day (YYYY-MM-DD, local) or ISO datetime."
    )(f)
    return f


def all_hits_option(f: Callable) -> Callable:
    return click.option(
        "--all-hits", is_flag=True, help="Also count machine and self hits, with their reasons."
    )(f)


def _empty_message(what: str, filt) -> str:
    filtered = any(
        v is not None for v in (filt.since, filt.until, filt.user, filt.contact, filt.tracked)
    )
    return f"No {what} match these filters." if filtered else f"No {what} yet."


@main.group()
def report() -> None:
    """Reports: emails, links, users (human hits only unless --all-hits)."""


def _others_text(obj: dict) -> str:
    """ "machine 3 (apple_mpp 2, scanner_ua 1) · self 1" for --all-hits tables."""
    parts = []
    for verdict in ("machine", "self"):
        other = obj.get(verdict)
        if other and other["opens"] + other["clicks"]:
            reasons = ", ".join(f"{k} {v}" for k, v in other["reasons"].items())
            parts.append(f"{verdict} {other['opens'] + other['clicks']} ({reasons})")
    return " · ".join(parts)


def has_hits(obj: dict, all_hits: bool) -> bool:
    """Whether a recipient/Someone has hits worth a line (machine/self ones with --all-hits)."""
    verdicts = ("machine", "self") if all_hits else ()
    return bool(obj["opens"] or obj["clicks"]) or any(
        obj[v]["opens"] or obj[v]["clicks"] for v in verdicts
    )


EMAIL_CSV = [
    "message_id",
    "sent_at",
    "user",
    "source",
    "subject",
    "tracked_opens",
    "tracked_clicks",
    "untracked_reason",
    "recipient",
    "opens",
    "clicks",
    "first_open_at",
    "last_open_at",
    "inferred_open",
    "replied",
]
EMAIL_CSV_ALL = [
    "machine_opens",
    "machine_clicks",
    "machine_reasons",
    "self_opens",
    "self_clicks",
    "self_reasons",
]


def email_csv_rows(entry: dict, all_hits: bool) -> list[list]:
    """One CSV row per recipient (and one for "Someone" when it has hits)."""
    base = [
        entry["message_id"],
        entry["sent_at"],
        entry["user"],
        entry["source"],
        entry["subject"],
        entry["tracked"]["opens"],
        entry["tracked"]["clicks"],
        entry["untracked_reason"],
    ]
    people = list(entry["recipients"])
    if has_hits(entry["someone"], all_hits):
        people.append({**entry["someone"], "address": "Someone"})
    if not people:
        zero = {"opens": 0, "clicks": 0, "reasons": {}}
        people.append({"address": "", "opens": 0, "clicks": 0, "machine": zero, "self": zero})
    out = []
    for p in people:
        line = base + [
            p["address"],
            p["opens"],
            p["clicks"],
            p.get("first_open_at"),
            p.get("last_open_at"),
            p.get("inferred_open", False),
            p.get("replied", False),
        ]
        if all_hits:
            for verdict in ("machine", "self"):
                other = p[verdict]
                line += [
                    other["opens"],
                    other["clicks"],
                    "; ".join(f"{k}={v}" for k, v in other["reasons"].items()),
                ]
        out.append(["true" if v is True else "false" if v is False else _cell(v) for v in line])
    return out


def email_table(entries: list[dict], all_hits: bool) -> None:
    """Emails as a rich table that reads in 80 columns: per email a line with its totals,
    then one line per recipient (and Someone), with who replied and when they last opened."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False)
    table.add_column("Sent", no_wrap=True)
    table.add_column("Email / recipient", ratio=1, overflow="fold")
    table.add_column("Opens", justify="right", no_wrap=True)
    table.add_column("Clicks", justify="right", no_wrap=True)
    for entry in entries:
        tracked = entry["tracked"]["opens"] or entry["tracked"]["clicks"]
        title = Text(entry["subject"] or "(no subject)", style="bold")
        title.append(f"\n{entry['user'] or 'unattributed'} · {entry['source']}", style="dim")
        if not tracked:
            title.append(f"\nnot tracked: {entry['untracked_reason']}", style="italic dim")
        if all_hits and _others_text(entry):
            title.append(f"\nall hits: {_others_text(entry)}", style="dim")
        table.add_row(
            when(entry["sent_at"]),
            title,
            str(entry["opens"]) if tracked else "-",
            str(entry["clicks"]) if tracked else "-",
        )
        lines = [(r["address"], r) for r in entry["recipients"]]
        if has_hits(entry["someone"], all_hits):
            lines.append(("Someone", entry["someone"]))
        for name, r in lines:
            cell = Text("  " + name, style="italic" if name == "Someone" else "")
            if r.get("replied"):
                cell.append(" ↩ replied", style="bold")
            notes = []
            if r.get("last_open_at"):
                notes.append(f"last open {relative_time(r['last_open_at'])}")
            if all_hits and _others_text(r):
                notes.append(_others_text(r))
            if notes:
                cell.append("\n  " + " · ".join(notes), style="dim")
            opens = str(r["opens"]) + (" inferred" if r.get("inferred_open") else "")
            table.add_row("", cell, opens if tracked else "", str(r["clicks"]) if tracked else "")
        table.add_section()
    Console(soft_wrap=False).print(table)


def write_json_entries(texts: Iterable[str]) -> None:
    """A JSON array, one compact entry per line (valid JSON, fast, friendly to grep).

    Written in encoded chunks: 100,000 small text writes cost more than the query."""
    out = click.get_binary_stream("stdout")
    batch: list[str] = []
    first = True
    for text in texts:
        batch.append(text)
        if len(batch) == 2000:
            out.write((("[\n" if first else ",\n") + ",\n".join(batch)).encode())
            batch, first = [], False
    if batch:
        out.write((("[\n" if first else ",\n") + ",\n".join(batch)).encode())
        first = False
    out.write(b"[]\n" if first else b"\n]\n")
    out.flush()


@report.command("emails")
@period_options
@click.option("--contact", metavar="EMAIL", help="Only emails to or logged on this contact.")
@click.option("--tracked/--untracked", default=None, help="Only tracked / untracked emails.")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many (newest) emails.")
@all_hits_option
@format_option
@pass_app
def report_emails(
    app: App,
    since: str | None,
    until: str | None,
    user: str | None,
    contact: str | None,
    tracked: bool | None,
    limit: int | None,
    all_hits: bool,
    fmt: str,
) -> None:
    """Sent and logged emails, newest first: who opened, clicked and replied."""
    from store import reports

    filt = report_filter(since, until, user, contact, tracked)
    texts = reports.iter_email_json(app.db, filt, all_hits=all_hits, limit=limit)
    if fmt in ("json", "csv"):
        total = reports.count_emails(app.db, filt)
        total = min(total, limit) if limit else total
    if fmt == "json":
        write_json_entries(with_progress(texts, total, "Exporting emails"))
        return
    if fmt == "csv":
        out = click.get_text_stream("stdout")
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(EMAIL_CSV + (EMAIL_CSV_ALL if all_hits else []))
        for text in with_progress(texts, total, "Exporting emails"):
            writer.writerows(email_csv_rows(json.loads(text), all_hits))
        return
    entries = [json.loads(t) for t in texts]
    if not entries:
        click.echo(_empty_message("emails", filt))
        return
    email_table(entries, all_hits)


@report.command("links")
@period_options
@click.option("--contact", metavar="EMAIL", help="Only emails to this contact.")
@all_hits_option
@format_option
@pass_app
def report_links(
    app: App,
    since: str | None,
    until: str | None,
    user: str | None,
    contact: str | None,
    all_hits: bool,
    fmt: str,
) -> None:
    """Tracked links: clicks and how many different recipients clicked."""
    from store import reports

    filt = report_filter(since, until, user, contact)
    links = reports.link_report(app.db, filt, all_hits=all_hits)
    if fmt != "table":
        if fmt == "csv" and all_hits:
            for link in links:
                for verdict in ("machine", "self"):
                    other = link.pop(verdict)
                    link[f"{verdict}_clicks"] = other["clicks"]
                    link[f"{verdict}_reasons"] = "; ".join(
                        f"{k}={v}" for k, v in other["reasons"].items()
                    )
        emit(links, fmt, list(links[0]) if links else None)
        return
    if not links:
        click.echo(_empty_message("tracked links", filt))
        return
    rows = []
    for link in links:
        url = link["url"].split("://", 1)[-1]
        extra = (
            _others_text(
                {k: {"opens": 0, **v} for k, v in link.items() if k in ("machine", "self")}
            )
            if all_hits
            else ""
        )
        rows.append(
            {
                "sent": when(link["sent_at"]),
                "email": link["subject"] or "(no subject)",
                "link": url + (f"\n{extra}" if extra else ""),
                "clicks": link["clicks"],
                "people": link["unique_clicks"],
                "someone": link["someone_clicks"],
            }
        )
    compact_table(
        rows,
        {
            "sent": "Sent",
            "email": "Email",
            "link": "Link",
            "clicks": "Clicks",
            "people": "People",
            "someone": "Someone",
        },
    )


def compact_table(rows: list[dict], headers: dict[str, str]) -> None:
    """A report table that fits 80 columns: light rules, numbers right-aligned."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, collapse_padding=True)
    for i, (key, header) in enumerate(headers.items()):
        numeric = all(isinstance(r[key], int) or str(r[key]).endswith("%") for r in rows)
        widest = max(len(line) for r in rows for line in _cell(r[key]).splitlines() or [""])
        table.add_column(
            header,
            justify="right" if numeric else "left",
            overflow="fold",
            no_wrap=numeric,
            min_width=min(widest, 24) if i == 0 else None,
        )
    for r in rows:
        table.add_row(*[_cell(r[k]) for k in headers])
    Console(soft_wrap=False).print(table)


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.0f}%"


@report.command("users")
@period_options
@format_option
@pass_app
def report_users(
    app: App, since: str | None, until: str | None, user: str | None, fmt: str
) -> None:
    """Per user: sent, logged, tracked; open, click and reply rates; machine hits filtered."""
    from store import reports

    filt = report_filter(since, until, user)
    found = reports.user_report(app.db, filt)
    if fmt != "table":
        emit(found, fmt, list(found[0]) if found else None)
        return
    if not found:
        click.echo("No users yet: add one with `mailtally users add EMAIL`.")
        return
    rows = [
        {
            "user": u["user"] or u["name"],
            "sent": u["sent"],
            "logged": u["logged"],
            "tracked": u["tracked"],
            "opened": _percent(u["open_rate"]),
            "clicked": _percent(u["click_rate"]),
            "replied": _percent(u["reply_rate"]),
            "machine": u["machine_hits"],
        }
        for u in found
    ]
    compact_table(
        rows,
        {
            "user": "User",
            "sent": "Sent",
            "logged": "Logged",
            "tracked": "Tracked",
            "opened": "Open",
            "clicked": "Click",
            "replied": "Reply",
            "machine": "Machine",
        },
    )


# --- relay: outbox and preview --------------------------------------------------------------


@main.group(invoke_without_command=True)
@click.option("--all", "show_all", is_flag=True, help="Include sent entries.")
@format_option
@click.pass_context
def queue(ctx: click.Context, show_all: bool, fmt: str) -> None:
    """The relay's outbox: pending, retrying and failed entries with the last error."""
    if ctx.invoked_subcommand is not None:
        return
    from store import outbox as store_outbox

    app = ctx.find_object(App)
    statuses = ["pending", "retrying", "failed"] + (["sent"] if show_all else [])
    rows = store_outbox.listing(app.db, statuses)
    for r in rows:
        r["rcpts"] = ", ".join(r["rcpts"])
        r["mail_from"] = r["mail_from"] or "<> (report)"
    columns = ["id", "status", "created_at", "attempts", "next_attempt_at", "mail_from", "rcpts"]
    emit(rows, fmt, columns + ["last_error"], empty="The outbox is empty: nothing waiting.")


@queue.command("retry")
@click.argument("ids", nargs=-1, type=int)
@click.option("--failed", "include_failed", is_flag=True, help="Also retry failed entries.")
@pass_app
def queue_retry(app: App, ids: tuple[int, ...], include_failed: bool) -> None:
    """Make waiting entries (or the given IDS) due now; the running relay sends them."""
    from store import outbox as store_outbox

    count = store_outbox.retry_now(app.db, list(ids) or None, include_failed)
    click.echo(f"{count} entr{'y' if count == 1 else 'ies'} will be retried now")


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--user", "user_email", help="The sending user (default: the owner of From).")
@click.option(
    "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write the rewritten message."
)
@format_option
@pass_app
def preview(app: App, file: Path, user_email: str | None, output: Path | None, fmt: str) -> None:
    """What the relay would send for FILE.eml: decision, links, pixel. Nothing is sent."""
    from relay import preview as relay_preview

    report, data = relay_preview.preview(app.settings, app.db, file.read_bytes(), user_email)
    if output:
        output.write_bytes(data)
        report["output"] = str(output)
    if fmt == "json":
        emit_object(report, "json")
        return
    links = report.pop("links")
    emit_object({k: v for k, v in report.items() if k != "steps"}, "table")
    click.echo("")
    for row in links:
        row["tracked"] = "yes" if row["tracked"] else "no"
    emit(
        links,
        fmt,
        ["position", "tracked", "rule", "url", "text"],
        title="Links",
        empty="No links.",
    )


# --- tracker: live feed, webhooks, rule data ---------------------------------------------


@main.command()
@click.option("--user", "user_email", default=None, help="Only this user's emails.")
@click.option("--all-hits", is_flag=True, help="Machine and self hits too (default: human only).")
@click.option("--url", default=None, help="Feed URL (default: the tracker's listen address).")
@pass_app
def watch(app: App, user_email: str | None, all_hits: bool, url: str | None) -> None:
    """Follow opens, clicks and replies live, one line per event."""
    from tracker import watch as tracker_watch

    if user_email:
        store_users.get_user(app.db, user_email)
    click.echo("Watching for opens and clicks; Ctrl-C to stop.", err=True)
    try:
        tracker_watch.run(app.settings, user_email, all_hits, lambda line: click.echo(line), url)
    except PermissionError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot reach the tracker's live feed: {exc}")
    except KeyboardInterrupt:
        pass


@main.group()
def webhooks() -> None:
    """Per-user webhooks (global URLs are in [webhooks] of the config)."""


@webhooks.command("add")
@click.argument("user")
@click.argument("url")
@click.option("--all-hits", is_flag=True, help="Machine and self hits too.")
@pass_app
def webhooks_add(app: App, user: str, url: str, all_hits: bool) -> None:
    """Send USER's events to URL; prints the signing secret."""
    from store import webhooks as store_webhooks

    hook = store_webhooks.add_webhook(app.db, user, url, all_hits)
    click.echo(f"Added webhook {hook['url']} for {hook['user']}")
    click.echo(f"Signing secret: {hook['secret']}")


@webhooks.command("remove")
@click.argument("user")
@click.argument("url")
@pass_app
def webhooks_remove(app: App, user: str, url: str) -> None:
    """Stop sending USER's events to URL."""
    from store import webhooks as store_webhooks

    store_webhooks.remove_webhook(app.db, user, url)
    click.echo(f"Removed webhook {url}")


@webhooks.command("list")
@format_option
@pass_app
def webhooks_list(app: App, fmt: str) -> None:
    """Per-user webhooks with pending and failed deliveries."""
    from store import webhooks as store_webhooks

    emit(store_webhooks.list_webhooks(app.db), fmt, empty="No per-user webhooks.")


@main.group("tracker-data")
def tracker_data() -> None:
    """Network lists behind the verdict rules (Apple relay, Microsoft EOP, scanners)."""


@tracker_data.command("show")
@format_option
@pass_app
def tracker_data_show(app: App, fmt: str) -> None:
    """Which file each list comes from and its size."""
    from tracker import netdata

    emit(netdata.describe(app.settings.data_dir), fmt)


@tracker_data.command("update")
@click.argument("name", type=click.Choice(["apple-relay", "microsoft-eop", "scanner-networks"]))
@click.option("--source", default=None, help="URL or file (default: the list's public source).")
@pass_app
def tracker_data_update(app: App, name: str, source: str | None) -> None:
    """Install a fresh copy of a list under DATA_DIR/tracker-data (restart the tracker)."""
    from tracker import netdata

    try:
        result = netdata.update(name, app.settings.data_dir, source)
    except (ValueError, OSError) as exc:
        fail(f"{name}: {exc}")
    click.echo(f"Installed {result['networks']} networks for {name} in {result['path']}")


if __name__ == "__main__":  # pragma: no cover
    main()
