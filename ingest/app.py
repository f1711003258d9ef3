"""Ingest as running parts: the SCP (with its store, index and rules) and the detector.

``IngestApp`` is what ``lastmile up`` runs (through ``lastmile.services_ingest``) and what
the tests and the benchmark start on free ports: the same code path in all three.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from events.instance_store import InstanceStore
from events.jetstream import EventBus
from ingest.deployments import DeploymentFollower
from ingest.dicom_scp import ScpConfig, StorageScp
from ingest.jetstream import CompletionDetector, ThreadPublisher, fold_index
from ingest.receiver import InstanceReceiver, ReceiverConfig
from ingest.rules_file import RulesFile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestOptions:
    instances_dir: Path
    scp: ScpConfig = field(default_factory=ScpConfig)
    rules_path: Path | None = None
    max_instance_bytes: int = 2048 * 2**20
    min_free_bytes: int = 1024 * 2**20
    rules_poll_s: float = 1.0
    publish_timeout_s: float = 10.0  # a sender's wait for the log before a failure status
    #: the completion service's persisted up-time (None: next to ``instances_dir``)
    uptime_path: Path | None = None

    @property
    def uptime_file(self) -> Path:
        return self.uptime_path or self.instances_dir.parent / "completion-uptime.json"


@dataclass
class ScpRunner:
    """The SCP, bound to a bus: store + index (folded from the log) + receiver + listener."""

    options: IngestOptions
    secret: bytes
    rules: RulesFile
    port: int | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    receiver: InstanceReceiver | None = None
    storage_scp: StorageScp | None = None  # while running (its guard's counts, for tests)

    async def run(self, bus: EventBus, stop: asyncio.Event) -> None:
        store = InstanceStore(self.options.instances_dir,
                              min_free_bytes=self.options.min_free_bytes)
        cleaned = store.clean_tmp()
        if cleaned:
            log.warning("removed %d partial files left by an interrupted write", cleaned)
        index = await fold_index(bus)
        # the pipelines deployed in the log: their AE titles are ours from the start,
        # and from the moment a later deployment is recorded (``poll`` below, and before
        # any called AE title is refused)
        follower = DeploymentFollower(bus, self.rules)
        await follower.poll()
        follower.attach(asyncio.get_running_loop())
        publisher = ThreadPublisher(bus, asyncio.get_running_loop(),
                                    timeout_s=self.options.publish_timeout_s)
        self.receiver = InstanceReceiver(
            store=store, publish=publisher, secret=self.secret, rules=self.rules,
            config=ReceiverConfig(general_ae=self.options.scp.general_ae,
                                  max_instance_bytes=self.options.max_instance_bytes),
            index=index,
        )
        scp = self.storage_scp = StorageScp(self.options.scp, self.receiver, self.rules,
                                            publisher)
        self.port = await asyncio.to_thread(scp.start)
        self.started.set()
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), self.options.rules_poll_s)
                except TimeoutError:
                    await asyncio.to_thread(self.rules.poll)
                    try:
                        await follower.poll()
                    except Exception as exc:  # noqa: BLE001 - the log is an edge; retry
                        log.warning("deployed pipelines not re-read (the log: %s)",
                                    type(exc).__name__)
        finally:
            # handlers may be waiting on this loop for acks: stop from a thread
            await asyncio.to_thread(scp.stop)
            self.started.clear()


@dataclass
class IngestApp:
    """SCP and completion detector together, sharing the rules. They share nothing else:
    the detector reads association facts from the log, as it would from other receivers."""

    options: IngestOptions
    secret: bytes
    rules: RulesFile
    detector_durable: str = "ingest-completion"

    def __post_init__(self) -> None:
        self.detector: CompletionDetector | None = None
        self.scp = ScpRunner(self.options, self.secret, self.rules)

    async def run_detector(self, bus: EventBus, stop: asyncio.Event) -> None:
        self.detector = CompletionDetector(
            bus, self.rules, durable=self.detector_durable,
            uptime_path=self.options.uptime_file, instances_dir=self.options.instances_dir)
        await self.detector.run(stop)

    async def run(self, bus: EventBus, stop: asyncio.Event) -> None:
        await asyncio.gather(self.run_detector(bus, stop), self.scp.run(bus, stop))
