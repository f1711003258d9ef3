"""Ingest fixtures: the real SCP + completion detector on a free port, on a per-test stream,
and helpers to drive real DICOM peers (dcmtk) from async tests."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from events.base import Event
from events.jetstream import EventBus
from events.nats_server import free_port
from ingest.app import IngestApp, IngestOptions
from ingest.dicom_scp import ScpConfig
from ingest.rules_file import RulesFile

SECRET = b"test-site-secret-0123456789abcdef"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}

needs_dcmtk = pytest.mark.skipif(shutil.which("storescu") is None,
                                 reason="Debian dcmtk is not installed (make setup)")


@dataclass
class RunningIngest:
    app: IngestApp
    port: int
    instances_dir: Path
    stop: asyncio.Event
    task: asyncio.Task[None]
    bus: EventBus

    async def shutdown(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 15)


StartIngest = Callable[..., Awaitable[RunningIngest]]


@pytest.fixture
async def start_ingest(bus: EventBus, tmp_path: Path) -> AsyncIterator[StartIngest]:
    running: list[RunningIngest] = []

    async def start(rules_text: str | None = None, *, durable: str = "ingest-completion",
                    instances_dir: Path | None = None, **scp: object) -> RunningIngest:
        rules_path = None
        if rules_text is not None:
            rules_path = tmp_path / "rules.yaml"
            rules_path.write_text(rules_text)
        max_bytes = int(scp.pop("max_instance_bytes", 2048 * 2**20))  # type: ignore[call-overload]
        min_free = int(scp.pop("min_free_bytes", 0))  # type: ignore[call-overload]
        options = IngestOptions(
            instances_dir=instances_dir or tmp_path / "instances",
            scp=ScpConfig(port=free_port(), **scp),  # type: ignore[arg-type]
            rules_path=rules_path, max_instance_bytes=max_bytes, min_free_bytes=min_free,
            rules_poll_s=0.2,
        )
        app = IngestApp(options, SECRET, RulesFile.open(rules_path), detector_durable=durable)
        stop = asyncio.Event()
        task = asyncio.create_task(app.run(bus, stop))
        await asyncio.wait_for(app.scp.started.wait(), 15)
        while app.detector is None or not app.detector.ready.is_set():
            await asyncio.sleep(0.02)
        assert app.scp.port is not None
        r = RunningIngest(app, app.scp.port, options.instances_dir, stop, task, bus)
        running.append(r)
        return r

    yield start
    for r in running:
        if not r.task.done():
            await r.shutdown()


async def run_tool(*args: str, timeout: float = 60.0) -> tuple[int, str]:
    """Run a dcmtk tool without blocking the loop (the SCP publishes through it)."""
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=DCMTK_ENV)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return int(proc.returncode or 0), out.decode(errors="replace")


async def storescu(port: int, files: Sequence[Path | str], *, called: str = "LASTMILE",
                   calling: str = "MODALITY", extra: Sequence[str] = ()) -> tuple[int, str]:
    return await run_tool("storescu", "-aet", calling, "-aec", called, *extra,
                          "127.0.0.1", str(port), *[str(f) for f in files])


async def wait_for_events(
    bus: EventBus, study_uid: str | None, type_name: str, count: int = 1,
    timeout: float = 20.0, subject: str | None = None,
) -> list[Event]:
    """Poll the log until ``count`` events of ``type_name`` are there (or fail)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    found: list[Event] = []
    while loop.time() < deadline:
        if study_uid is not None:
            history = [ev for _, ev in await bus.history(study_uid)]
        else:
            history = [ev async for _, ev, _ in bus.read(filter_subject=subject)
                       if isinstance(ev, Event)]
        found = [ev for ev in history if ev.type_name() == type_name]
        if len(found) >= count:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"expected {count} {type_name} events, found {len(found)}")
