"""Waiting on a study's history in the real event log (shared by the suites)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from events.base import Event
from events.jetstream import EventBus


async def wait_for(bus: EventBus, study_uid: str, done: Callable[[list[Event]], bool],
                   timeout_s: float = 60.0, poll_s: float = 0.1) -> list[Event]:
    """Poll the study's history until ``done(events)`` or the timeout."""
    deadline = time.monotonic() + timeout_s
    events: list[Event] = []
    while time.monotonic() < deadline:
        events = [ev for _, ev in await bus.history(study_uid)]
        if done(events):
            return events
        await asyncio.sleep(poll_s)
    raise AssertionError(f"timed out; history: {[e.type_name() for e in events]}")
