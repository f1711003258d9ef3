"""The projector against a real nats-server: catch-up, live follow, rebuild equals live.

The SIGKILL drill (a projector killed between insert and commit) lives with the other
reliability drills in tests/drills/test_projector_kill.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from events.base import Event
from events.jetstream import EventBus
from projections.duckdb_store import ProjectionStore
from projections.projector import Projector, rebuild

pytestmark = pytest.mark.server


async def _wait_for(store: ProjectionStore, seq: int, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while store.checkpoint() < seq:
        assert loop.time() < end, f"projector stuck at {store.checkpoint()} < {seq}"
        await asyncio.sleep(0.02)


async def test_live_projection_equals_a_rebuild_after_a_mixed_run(
        bus: EventBus, site_events: list[Event], tmp_path: Path) -> None:
    half = len(site_events) // 2
    await bus.publish_many(site_events[:half])
    live = ProjectionStore(tmp_path / "live.duckdb", keep_open=False)
    projector = Projector(live, batch_size=700, idle_s=0.05)
    stop = asyncio.Event()
    follower = asyncio.create_task(projector.follow(bus, stop))
    try:
        await _wait_for(live, half)
        # the rest arrives while the projector follows, in uneven bursts, with re-publishes
        rest = site_events[half:]
        for i in range(0, len(rest), 613):
            await bus.publish_many(rest[i:i + 613])
            await bus.publish_many(rest[max(0, i - 50):i])  # duplicates: dropped by id
        last = await bus.last_sequence()
        assert last == len(site_events)
        await _wait_for(live, last)
    finally:
        stop.set()
        await follower
    rebuilt = ProjectionStore(tmp_path / "rebuilt.duckdb")
    assert await rebuild(bus, rebuilt) == len(site_events)
    assert live.checksums() == rebuilt.checksums()
    assert live.counts()["instances"] > 1000
    # rebuilding in place gives the same again
    assert await rebuild(bus, rebuilt) == len(site_events)
    assert rebuilt.checksums() == live.checksums()
    rebuilt.close()
    live.close()
