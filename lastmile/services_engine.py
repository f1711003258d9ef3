"""The engine's services for `lastmile up`: the worker, the edit recomputer and the PACS
redelivery (``services_for`` in lastmile/services.py starts them)."""

from __future__ import annotations

import asyncio
import importlib
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from engine.spec import REFERENCE_DIR, discover
from events.jetstream import EventBus
from lastmile.runtime import Service
from lastmile.settings import Settings

if TYPE_CHECKING:  # the worker pulls in highdicom, scipy and ONNX Runtime: not for --help
    from engine.worker import WorkerConfig


def pipeline_dirs(settings: Settings) -> list[Path]:
    """Reference pipelines first; the site's ``pipelines_dir`` overrides by name."""
    return [REFERENCE_DIR, settings.pipelines_dir]


def worker_config(settings: Settings) -> WorkerConfig:
    from engine.pacs import parse_address
    from engine.pacs_priors import PriorSource
    from engine.worker import WorkerConfig

    priors = None
    if settings.priors_pacs:  # validated by Settings: AE@host:port
        priors = PriorSource(parse_address(settings.priors_pacs),
                             move_destination=settings.priors_move_destination,
                             retries=settings.priors_retries,
                             timeout_s=settings.priors_timeout_s)
    return WorkerConfig(
        instances_dir=settings.instances_dir,
        results_dir=settings.results_dir,
        secret=settings.secret(),
        worker_id=settings.worker_id or f"{socket.gethostname()}:{os.getpid()}",
        priors=priors,
    )


class EngineWorkerService(Service):
    """`lastmile up`'s engine worker: loads the pipeline files, then consumes."""

    name = "engine-worker"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def run(self, bus: EventBus, stop: asyncio.Event) -> None:
        # in a thread: the worker's imports (torch, MONAI, highdicom, ONNX Runtime) and
        # parsing pipeline files with MONAI operators (each transform is dry-run) take
        # seconds; on the event loop they stall the other services' NATS requests in this
        # process into timeouts (seen: `lastmile demo` exiting with "nats: timeout")
        pipelines = await asyncio.to_thread(discover, pipeline_dirs(self.settings))
        await asyncio.to_thread(importlib.import_module, "engine.worker")
        from engine.worker import EngineWorker

        worker = EngineWorker(pipelines, worker_config(self.settings))
        await worker.run(bus, stop)


class EditRecomputeService(Service):
    """`lastmile up`'s recomputation after a clinician's edit: volumes and Dice of each
    corrected SEG against the AI's (``engine.edits``, durable consumer ``engine-edits``)."""

    name = "engine-edits"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def run(self, bus: EventBus, stop: asyncio.Event) -> None:
        await asyncio.to_thread(importlib.import_module, "engine.edits")  # off the loop
        from engine.edits import EditConfig, EditRecomputer

        config = EditConfig(
            instances_dir=self.settings.instances_dir,
            results_dir=self.settings.results_dir,
            worker_id=self.settings.worker_id or f"{socket.gethostname()}:{os.getpid()}",
        )
        await EditRecomputer(config).run(bus, stop)


class PacsRedeliveryService(Service):
    """`lastmile up`'s retry from the log of results a PACS did not take
    (``engine.pacs_redelivery``, durable consumer ``pacs-redelivery``)."""

    name = "pacs-redelivery"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def run(self, bus: EventBus, stop: asyncio.Event) -> None:
        from engine.pacs_redelivery import PacsRedelivery, RedeliveryConfig

        await PacsRedelivery(RedeliveryConfig(results_dir=self.settings.results_dir)
                             ).run(bus, stop)


def engine_services(settings: Settings) -> list[Service]:
    return [EngineWorkerService(settings), EditRecomputeService(settings),
            PacsRedeliveryService(settings)]




