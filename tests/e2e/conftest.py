"""Fixtures of the end-to-end suite: the real software around mailtally, set up by the suite.

Session-wide: the Debian packages (installed if missing), a private Postfix on a free
127.0.0.1 port, headless Chromium and a page server. Per module: a fresh mailtally
installation running as ``mailtally run``. Every fixture stops what it started, also when a
test fails (pytest runs the code after ``yield`` in any case).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import debian
from tests.e2e.browser import CHROMIUM, CHROMIUM_ARGS, PageServer
from tests.e2e.net import free_port
from tests.e2e.postfix import Postfix
from tests.e2e.system import Mailtally


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The first e2e test pays for the apt install (Chromium is large on a slow mirror):
    give it more than the suite's 300 s per-test timeout; every other test keeps 300 s."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.timeout(1500))
            return


@pytest.fixture(scope="session")
def debian_packages() -> None:
    """postfix, swaks (+ Net::SSLeay for STARTTLS), chromium, chromium-driver."""
    debian.install()


@pytest.fixture(scope="session")
def postfix(debian_packages: None) -> Iterator[Postfix]:
    """A private Postfix: catch-all Maildir, 451 for tempfail@…, 550 for reject@…."""
    server = Postfix(free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pages() -> Iterator[PageServer]:
    """Landing pages and saved delivered copies, served on 127.0.0.1."""
    server = PageServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def browser(debian_packages: None):
    """Debian's headless Chromium through Playwright (never ``playwright install``)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def start_mailtally(directory: Path, postfix: Postfix, **overrides: dict) -> Mailtally:
    """A fresh mailtally whose upstream is the suite's Postfix, running."""
    system = Mailtally(directory, postfix.port, **overrides)
    system.start()
    return system


@pytest.fixture(scope="module")
def mailtally(tmp_path_factory: pytest.TempPathFactory, postfix: Postfix) -> Iterator[Mailtally]:
    """``mailtally run`` on a fresh data directory, stopped (SIGTERM) after the module."""
    system = start_mailtally(tmp_path_factory.mktemp("mailtally"), postfix)
    try:
        yield system
    finally:
        system.stop()
