"""Suite-wide ordering: the end-to-end tests run last.

Their session-scoped Playwright (sync API) keeps an event loop running in the main thread
until the session ends, which would break every asyncio test scheduled after it.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    items.sort(key=lambda item: "/tests/e2e/" in str(item.path).replace("\\", "/"))
