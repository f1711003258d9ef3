"""The projector: follows the event log in order and folds it into the read model.

It reads with ``EventBus.read(from_sequence=checkpoint + 1)`` (an ordered,
ack-free read of the stream), folds each entry into a ``RowBatch`` and hands full
batches to the store, which commits rows and checkpoint together. The next
batch is folded while the previous one is being written (DuckDB releases the GIL
while it inserts). When the log has nothing new it waits ``idle_s`` and looks
again, so the lag under live load is about one idle period plus one batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

from events.base import Event
from events.errors import CodecError
from events.jetstream import EventBus
from projections.duckdb_store import ProjectionStore
from projections.folds import RowBatch

log = logging.getLogger(__name__)


@dataclass
class ProjectorStats:
    """What a projector has done: for `lastmile bench projections` and the logs."""

    events: int = 0
    batches: int = 0
    fold_s: float = 0.0  # time spent folding events into rows
    write_s: float = 0.0  # time spent converting to Arrow and committing
    read_s: float = 0.0  # wall time of the reads (includes folding, not writing)
    commits: list[tuple[int, float]] = field(default_factory=list)  # (last seq, wall time)
    keep_commits: bool = False


CommitHook = Callable[[int, float], None]


@dataclass
class Projector:
    store: ProjectionStore
    batch_size: int = 5000
    fetch: int = 1000
    idle_s: float = 0.2
    threaded_writes: bool = True  # write on a thread so the event loop stays responsive
    stats: ProjectorStats = field(default_factory=ProjectorStats)
    on_commit: CommitHook | None = None

    def _write(self, batch: RowBatch) -> None:
        t0 = time.perf_counter()
        self.store.apply(batch)
        now = time.perf_counter()
        self.stats.write_s += now - t0
        self.stats.batches += 1
        if batch.last is not None:
            wall = time.time()
            if self.stats.keep_commits:
                self.stats.commits.append((batch.last, wall))
            if self.on_commit is not None:
                self.on_commit(batch.last, wall)

    async def catch_up(self, bus: EventBus, *, stop: asyncio.Event | None = None) -> int:
        """Fold everything up to the end of the log as it is now; return entries folded."""
        start = self.store.checkpoint() + 1
        batch = RowBatch()
        writing: asyncio.Task[None] | None = None
        folded = 0
        perf = time.perf_counter
        t_read = perf()
        fold_s = 0.0
        # read() is an async generator: close it (and its consumer) even when we stop early
        entries = cast(AsyncGenerator[tuple[int, Event | CodecError, Any], None],
                       bus.read(from_sequence=start, batch=self.fetch))
        async with contextlib.aclosing(entries):
            async for seq, item, _ in entries:
                t0 = perf()
                batch.add(seq, item)
                fold_s += perf() - t0
                folded += 1
                if batch.events >= self.batch_size:
                    if writing is not None:
                        await writing
                    if self.threaded_writes:
                        writing = asyncio.create_task(asyncio.to_thread(self._write, batch))
                    else:
                        self._write(batch)
                    batch = RowBatch()
                    if stop is not None and stop.is_set():
                        break
        if writing is not None:
            await writing
        self.stats.read_s += perf() - t_read
        if batch.events:
            if self.threaded_writes:
                await asyncio.to_thread(self._write, batch)
            else:
                self._write(batch)
        self.stats.fold_s += fold_s
        self.stats.events += folded
        return folded

    async def follow(self, bus: EventBus, stop: asyncio.Event) -> None:
        """Follow the log live until ``stop`` is set."""
        log.info("projector: following from sequence %d", self.store.checkpoint() + 1)
        while not stop.is_set():
            n = await self.catch_up(bus, stop=stop)
            if n == 0:
                try:
                    await asyncio.wait_for(stop.wait(), timeout=self.idle_s)
                except TimeoutError:
                    pass


async def rebuild(bus: EventBus, store: ProjectionStore, *, batch_size: int = 20_000) -> int:
    """Drop every table and fold the whole log again from sequence 1."""
    store.reset()
    return await Projector(store, batch_size=batch_size).catch_up(bus)
