"""Run a projector that kills itself (SIGKILL) after inserting the rows of its Nth batch
and before committing them: the crash drill of test_projector.py.

usage: python crash_projector.py NATS_URL STREAM DB_PATH BATCH_SIZE CRASH_AT_BATCH
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from events.jetstream import BusSettings, EventBus
from projections.duckdb_store import ProjectionStore
from projections.projector import Projector


class KilledMidBatch(ProjectionStore):
    crash_at = 0
    seen = 0

    def _before_commit(self, con: object) -> None:
        self.seen += 1
        if self.seen == self.crash_at:
            sys.stdout.write(f"killing myself in batch {self.seen}\n")
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


async def main(url: str, stream: str, db: str, batch: int, crash_at: int) -> None:
    bus = await EventBus.connect(BusSettings(servers=(url,), stream=stream))
    store = KilledMidBatch(db)
    store.crash_at = crash_at
    await Projector(store, batch_size=batch, threaded_writes=False).catch_up(bus)
    await bus.close()


if __name__ == "__main__":
    url, stream, db, batch, crash_at = sys.argv[1:6]
    asyncio.run(main(url, stream, db, int(batch), int(crash_at)))
