"""The projector service for ``lastmile up`` (folds the log into DuckDB, raises drift
alerts), and the labels export that ``lastmile replay --to parquet`` writes beside the
events. Its settings: ``projections.config.ProjectionsConfig``."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from pathlib import Path

from events.deidentify import Deidentifier
from events.errors import CodecError
from events.jetstream import EventBus
from lastmile.runtime import Service, read_model_lock
from lastmile.settings import Settings
from projections import metrics as M
from projections.config import ProjectionsConfig
from projections.drift import alerts_for, drift_windows
from projections.duckdb_store import ProjectionStore
from projections.export import LabelExport, export_labels
from projections.projector import Projector

log = logging.getLogger("lastmile.projections")


# --------------------------------------------------------------------------- service


class ProjectorService(Service):
    """Follows the log into ``settings.duckdb_path``; raises drift alerts periodically.

    The DuckDB file is opened per batch (``keep_open=False``) so `lastmile metrics` and
    the dashboards can read it between batches.
    """

    name = "projector"

    def __init__(self, settings: Settings, config: ProjectionsConfig | None = None) -> None:
        self.settings = settings
        self.config = config or ProjectionsConfig.from_env()

    async def run(self, bus: EventBus, stop: asyncio.Event) -> None:
        with read_model_lock(self.settings):  # one writer per DuckDB file
            await self._run(bus, stop)

    async def _run(self, bus: EventBus, stop: asyncio.Event) -> None:
        store = ProjectionStore(self.settings.duckdb_path, keep_open=False)
        projector = Projector(store, batch_size=self.config.batch_size,
                              idle_s=self.config.idle_s)
        tasks = [asyncio.create_task(projector.follow(bus, stop), name="projector")]
        if self.config.drift_every_s > 0:
            tasks.append(asyncio.create_task(self._drift_loop(bus, store, stop),
                                             name="drift"))
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            store.close()

    async def _drift_loop(self, bus: EventBus, store: ProjectionStore,
                          stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.config.drift_every_s)
                return
            except TimeoutError:
                pass
            published = await check_drift(bus, store, self.config)
            if published:
                log.warning("drift: raised %d alert(s)", published)


async def check_drift(bus: EventBus, store: ProjectionStore, config: ProjectionsConfig,
                      now: datetime | None = None) -> int:
    """Compare last week with the baseline weeks; publish alerts not raised before."""
    baseline, window = drift_windows(now or datetime.now(UTC), config.drift_baseline_weeks)
    with store.connection() as con:
        rows = M.drift(con, baseline=baseline, window=window,
                       threshold=config.drift_threshold)
        raised = {eid for (eid,) in con.execute("SELECT event_id FROM drift_alerts").fetchall()}
    fresh = [a for a in alerts_for(rows, baseline=baseline, window=window)
             if a.event_id not in raised]
    for alert in fresh:
        await bus.publish(alert)
    return len(fresh)


async def export_labels_from_bus(bus: EventBus, directory: Path, *,
                                 deid: Deidentifier | None = None,
                                 study_uid: str | None = None,
                                 from_sequence: int = 1) -> LabelExport:
    """For `lastmile replay --to parquet DIR [--deidentify]`: the derived labels (reviews,
    edits) per study next to the exported events, remapped with the same key."""
    events = [(seq, ev) async for seq, ev, _ in
              bus.read(study_uid=study_uid, from_sequence=from_sequence)
              if not isinstance(ev, CodecError)]
    return export_labels(events, directory, deid)
