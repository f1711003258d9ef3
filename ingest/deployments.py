"""The deployed pipelines, followed from the log, for the receiver and completion.

``lastmile pipelines deploy | stage | retire`` record events; this follower folds them
(``events.deployments.fold_pipelines``, the same fold the engine worker uses) into the
``RulesFile`` in force, so a deployed pipeline's AE title is accepted and a retired
one's refused without a restart. It asks the stream how many pipeline events there are
(one STREAM.INFO request) and reads them again only when that number changed.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from events.base import Event
from events.deployments import PIPELINE_EVENTS, fold_pipelines
from events.jetstream import EventBus
from ingest.rules_file import RulesFile

log = logging.getLogger(__name__)


@dataclass
class DeploymentFollower:
    """Keeps ``rules`` in step with the log's pipeline events."""

    bus: EventBus
    rules: RulesFile
    _count: int = field(default=-1, init=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)

    async def poll(self) -> bool:
        """Read the pipeline events again if their number changed; True when the rules
        in force changed."""
        async with self._lock:
            count = await self.bus.subject_count(PIPELINE_EVENTS)
            if count == self._count:
                return False
            events = [ev async for _, ev, _ in self.bus.read(filter_subject=PIPELINE_EVENTS)
                      if isinstance(ev, Event)]
            self._count = count
            return self.rules.set_deployed(fold_pipelines(events))

    def attach(self, loop: asyncio.AbstractEventLoop, timeout_s: float = 5.0) -> None:
        """Let the receiver's threads ask for a poll before refusing a called AE title."""
        def refresh() -> None:
            asyncio.run_coroutine_threadsafe(self.poll(), loop).result(timeout_s)
        self.rules.refresh = refresh
