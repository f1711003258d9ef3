"""Drill: ``kill -9`` of the projector mid-batch (moved from tests/projections).

A projector process kills itself with SIGKILL after inserting its third batch's rows and
before committing them (``tests/projections/crash_projector.py``); after a restart its
tables equal a full rebuild from the log.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from events.base import Event
from events.jetstream import BusSettings, EventBus
from projections.duckdb_store import ProjectionStore
from projections.folds import RowBatch
from projections.projector import Projector, rebuild
from tests.drills.report import record

pytestmark = [pytest.mark.server, pytest.mark.slow]

CRASH_PROJECTOR = Path(__file__).parents[1] / "projections" / "crash_projector.py"


async def test_a_projector_killed_mid_batch_resumes_without_loss_or_duplicates(
        bus: EventBus, bus_settings: BusSettings, site_events: list[Event], tmp_path: Path
) -> None:
    t0 = time.perf_counter()
    await bus.publish_many(site_events)
    db = tmp_path / "crashed.duckdb"
    batch = 1000
    proc = subprocess.run(
        [sys.executable, str(CRASH_PROJECTOR), bus_settings.servers[0],
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
    sums = crashed.checksums()
    for s in (crashed, two, rebuilt):
        s.close()
    record("kill -9 projector mid-batch",
           done=f"projector process SIGKILLed between insert and commit of batch 3 "
                f"(batches of {batch}); restarted; tables compared with a full rebuild",
           items=len(site_events), acknowledged=len(site_events), lost=0,
           duration_s=time.perf_counter() - t0,
           tables_equal_to_rebuild=len(sums), rows=sum(n for n, _ in sums.values()))
