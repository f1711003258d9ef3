"""The ingest parts that talk to JetStream: publishing from SCP threads, folding the
log at start, and the study-completion detector service.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from events.base import Event, utcnow
from events.catalogue import InstanceStored
from events.errors import CodecError, PublishError
from events.jetstream import Delivery, EventBus
from events.subjects import PREFIX, type_filter
from ingest.completion import CompletionTracker
from ingest.receiver import InstanceIndex
from ingest.rules import RuleSet
from ingest.uptime import Uptime, UptimeFile

log = logging.getLogger(__name__)

#: every ingest event, across studies: what the completion fold reads at start
INGEST_EVENTS = f"{PREFIX}.*.ingest.>"
COMPLETION_INPUTS = tuple(type_filter(t) for t in (
    "ingest.instance.stored", "ingest.instance.duplicated", "ingest.route.matched",
    "ingest.study.completed", "ingest.study.amended", "ingest.association.released",
    "ingest.association.aborted",
))


@dataclass
class ThreadPublisher:
    """Publish from a non-async thread (pynetdicom's) on the bus's loop; wait for the acks.

    Events are published in order, each acknowledged before the next, so a routing
    decision is in the log before the instance it routed. ``timeout_s`` bounds how long a
    DICOM sender waits for its answer while the log is unreachable: it then gets a failure
    status and resends later, well inside the DIMSE timeouts modalities use (30-60 s).
    """

    bus: EventBus
    loop: asyncio.AbstractEventLoop
    timeout_s: float = 10.0

    async def _publish(self, events: Sequence[Event]) -> None:
        deadline = self.loop.time() + self.timeout_s
        for ev in events:
            await self.bus.publish(ev, retry_s=max(0.1, deadline - self.loop.time()))

    def start(self, events: Sequence[Event]) -> Callable[[], None]:
        """Begin publishing on the loop; the returned call waits for the acks. The
        receiver fsyncs the instance's file in between, on its own thread."""
        future = asyncio.run_coroutine_threadsafe(self._publish(events), self.loop)

        def wait() -> None:
            try:
                future.result(self.timeout_s + 5)
            except TimeoutError:
                future.cancel()
                raise PublishError(
                    f"JetStream did not acknowledge within {self.timeout_s:.0f}s") from None
        return wait

    def __call__(self, events: Sequence[Event]) -> None:
        self.start(events)()


async def fold_index(bus: EventBus) -> InstanceIndex:
    """Which SOP Instances (and which bytes of each) the log says are stored."""
    index = InstanceIndex()
    n = 0
    async for _seq, ev, _msg in bus.read(filter_subject=type_filter("ingest.instance.stored")):
        if isinstance(ev, InstanceStored):
            index.observe(ev)
            n += 1
    log.info("instance index rebuilt from %d stored events (%d SOP instances)", n, len(index))
    return index


def pixel_data_differ(instances_dir: Path) -> Callable[[str, str], bool]:
    """Whether two stored versions of one SOP Instance differ in Pixel Data (7FE0,0010):
    a re-sent instance whose header alone changed needs no re-run. Unreadable files count
    as changed (re-running is the safe side)."""

    def differ(old_key: str, new_key: str) -> bool:
        try:
            old = pydicom.dcmread(instances_dir / old_key, specific_tags=["PixelData"])
            new = pydicom.dcmread(instances_dir / new_key, specific_tags=["PixelData"])
        except (OSError, InvalidDicomError, ValueError):
            return True
        return bool(old.get("PixelData") != new.get("PixelData"))

    return differ


@dataclass
class CompletionDetector:
    """Decides when studies are complete: one durable consumer of the log.

    Start: fold every ingest event up to the current end of the log (state as it was),
    then follow new events through a durable consumer (skipping what the fold saw), and
    tick: what is due gets published and folded back in. Its evidence (instances,
    re-sends, associations released or aborted) comes only from the log, so it does not
    matter which receiver process, or how many, recorded it. Quiet periods are measured
    in this service's up-time, persisted in ``uptime_path`` (None: in memory only).
    """

    bus: EventBus
    rules: Callable[[], RuleSet]
    durable: str = "ingest-completion"
    tick_s: float = 0.1
    #: the consumer collects instances for this long between fetches: completion waits
    #: for a quiet period of seconds anyway, and a fetch per instance slows the SCP
    linger_s: float = 0.2
    uptime_path: Path | None = None
    instances_dir: Path | None = None  # to tell a changed Pixel Data from a new header
    tracker: CompletionTracker | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    def __post_init__(self) -> None:
        self._uptime_file = UptimeFile(self.uptime_path) if self.uptime_path else None
        self.uptime: Uptime = self._uptime_file.clock if self._uptime_file else Uptime()

    async def rebuild(self) -> int:
        now = utcnow()
        if self._uptime_file is not None:
            self._uptime_file.start(now)
        else:
            self.uptime.start(now)
        tracker = CompletionTracker(
            self.rules(), clock=self.uptime,
            **({"pixels_changed": pixel_data_differ(self.instances_dir)}
               if self.instances_dir else {}))
        last = await self.bus.last_sequence()
        n = 0
        async for _seq, ev, _msg in self.bus.read(filter_subject=INGEST_EVENTS,
                                                  to_sequence=last):
            if not isinstance(ev, CodecError):
                tracker.observe(ev)
                n += 1
        self.tracker = tracker
        log.info("completion state rebuilt from %d ingest events (%d studies pending, "
                 "%.0f s of up-time so far)", n, tracker.pending(), self.uptime.total())
        return last

    async def run(self, stop: asyncio.Event) -> None:
        last = await self.rebuild()
        tracker = self.tracker
        assert tracker is not None

        async def handle(event: Event, delivery: Delivery) -> None:
            if delivery.sequence > last:
                tracker.observe(event)

        consumer = asyncio.create_task(self.bus.consume(
            self.durable, handle, filter_subjects=COMPLETION_INPUTS, stop=stop,
            idle_timeout_s=0.5, batch=200, linger_s=self.linger_s))
        self.ready.set()
        try:
            while not stop.is_set():
                await self.tick()
                try:
                    await asyncio.wait_for(stop.wait(), self.tick_s)
                except TimeoutError:
                    pass
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)

    async def tick(self) -> int:
        tracker = self.tracker
        assert tracker is not None
        tracker.rules = self.rules()
        now = utcnow()
        if self._uptime_file is not None:
            self._uptime_file.advance(now)
        else:
            self.uptime.advance(now)
        decided = tracker.due(now)
        for ev in decided:
            await self.bus.publish(ev)
            tracker.observe(ev)
            log.info("%s %s for %s (%s%s)", ev.type_name(), ev.study_uid, ev.pipeline,
                     getattr(ev, "reason", None) or "amended",
                     ", partial" if getattr(ev, "partial", False) else "")
        return len(decided)
