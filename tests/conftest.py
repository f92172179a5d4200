"""Suite-wide: the event loop production runs on, and the end-to-end tests run last.

Their session-scoped Playwright (sync API) keeps an event loop running in the main thread
until the session ends, which would break every asyncio test scheduled after it.
"""

from __future__ import annotations

import asyncio

import pytest

import cli


class _ProductionLoop(asyncio.DefaultEventLoopPolicy):
    """Every asyncio test runs on the loop ``mailtally run`` uses (``cli.new_event_loop``:
    uvloop), so the servers are tested as they run."""

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return cli.new_event_loop()


@pytest.fixture(scope="session")
def event_loop_policy() -> asyncio.AbstractEventLoopPolicy:
    return _ProductionLoop()


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    items.sort(key=lambda item: "/tests/e2e/" in str(item.path).replace("\\", "/"))
