"""The projector against a real nats-server: catch-up, live follow, rebuild equals live,
and a projector killed with SIGKILL between insert and commit loses nothing and
applies nothing twice."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from events.base import Event
from events.jetstream import BusSettings, EventBus
from projections.duckdb_store import ProjectionStore
from projections.folds import RowBatch
from projections.projector import Projector, rebuild

pytestmark = pytest.mark.server

HERE = Path(__file__).parent


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


@pytest.mark.slow
async def test_a_projector_killed_mid_batch_resumes_without_loss_or_duplicates(
        bus: EventBus, bus_settings: BusSettings, site_events: list[Event], tmp_path: Path
) -> None:
    await bus.publish_many(site_events)
    db = tmp_path / "crashed.duckdb"
    batch = 1000
    proc = subprocess.run(
        [sys.executable, str(HERE / "crash_projector.py"), bus_settings.servers[0],
         bus_settings.stream, str(db), str(batch), "3"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == -9, proc.stderr  # SIGKILL, mid-batch
    assert "killing myself in batch 3" in proc.stdout
    crashed = ProjectionStore(db)
    # batches 1 and 2 committed, batch 3's inserted rows vanished with the process
    assert crashed.checkpoint() == 2 * batch
    two = ProjectionStore(":memory:")
    partial = RowBatch()
    async for seq, item, _ in bus.read(to_sequence=2 * batch):
        partial.add(seq, item)
    two.apply(partial)
    assert crashed.checksums() == two.checksums()
    # restart: it resumes at the checkpoint and finishes
    await Projector(crashed, batch_size=batch).catch_up(bus)
    assert crashed.checkpoint() == len(site_events)
    rebuilt = ProjectionStore(tmp_path / "rebuilt.duckdb")
    await rebuild(bus, rebuilt)
    assert crashed.checksums() == rebuilt.checksums()
    for s in (crashed, two, rebuilt):
        s.close()
