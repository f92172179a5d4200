"""The services' event loop: uvloop unless asked for plain asyncio, and the suite's servers
run on the same loop as production."""

from __future__ import annotations

import asyncio

import uvloop

import cli


def test_services_run_on_uvloop_unless_asked_for_asyncio(monkeypatch):
    loop = cli.new_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    monkeypatch.setenv("MAILTALLY_EVENT_LOOP", "asyncio")
    loop = cli.new_event_loop()
    try:
        assert isinstance(loop, asyncio.AbstractEventLoop)
        assert not isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


async def test_the_suite_runs_on_the_production_loop():
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
