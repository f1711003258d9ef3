"""Drills: ``kill -9`` of nats-server, under the event log alone and during DICOM ingest.

The ingest drill runs everything as it runs at a site: nats-server (fsync always),
`lastmile up` running the ingest services in its own process, dcmtk storescu as the
modality. The server is killed while a study arrives; the sender is told Failure for the
instance that could not be recorded and halts (storescu's default); after the server
restarts on the same store, the modality re-sends the whole study.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import time
from collections import Counter
from pathlib import Path

import nats.errors
import pydicom
import pytest

from bench.ingest import ct_instances
from events.base import Event
from events.catalogue import InstanceDuplicated, InstanceStored
from events.errors import PublishError
from events.jetstream import BusSettings, EventBus
from events.nats_server import EmbeddedNats, free_port
from tests.drills.procs import clean_env, lastmile_up, storescu
from tests.drills.report import record
from tests.events.test_jetstream import requested

pytestmark = [pytest.mark.server, pytest.mark.slow]

needs_dcmtk = pytest.mark.skipif(shutil.which("storescu") is None,
                                 reason="Debian dcmtk is not installed (make setup)")


# moved from tests/events/test_jetstream.py (the event log's own kill -9 drill)
async def test_kill_9_mid_publish_loses_no_acknowledged_event(tmp_path: Path) -> None:
    """With fsync always: every event whose publish was acked survives kill -9."""
    t0 = time.perf_counter()
    port = free_port()
    server = EmbeddedNats(tmp_path / "nats", port=port, sync="always").start()
    bus = await EventBus.connect(BusSettings(servers=(server.url,), publish_retry_s=0.5,
                                             publish_timeout_s=0.5))
    acked: list[str] = []

    async def publisher() -> None:
        for i in range(100_000):
            event = requested(i)
            try:
                await bus.publish(event)
            except PublishError:
                return
            acked.append(event.event_id)

    task = asyncio.create_task(publisher())
    while len(acked) < 300:
        await asyncio.sleep(0.01)
    server.kill()
    await asyncio.wait_for(task, timeout=30)
    await bus.close()
    assert len(acked) >= 300

    server = EmbeddedNats(tmp_path / "nats", port=port, sync="always").start()
    try:
        bus = await EventBus.connect(BusSettings(servers=(server.url,)))
        stored = {ev.event_id async for _, ev, _ in bus.read() if isinstance(ev, Event)}
        missing = [i for i in acked if i not in stored]
        assert missing == [], f"{len(missing)} acknowledged events lost"
        await bus.close()
    finally:
        server.stop()
    record("kill -9 nats-server mid-publish",
           done="publisher awaiting each ack; nats-server (fsync always) killed after 300 "
                "acks, restarted on the same store",
           items=len(stored), acknowledged=len(acked), lost=len(missing),
           duration_s=time.perf_counter() - t0)


def _store_files(instances: Path) -> dict[str, Path]:
    """Every file in the instance store (its key -> path), leftovers of writes included."""
    return {p.relative_to(instances).as_posix(): p
            for p in instances.rglob("*") if p.is_file()}


def _dataset_bytes(path: Path) -> bytes:
    """The data set as sent on the wire: the Part 10 file without preamble and meta."""
    with pydicom.dcmread(path) as ds:
        start = ds.file_meta.get("FileMetaInformationGroupLength", 0)
    raw = path.read_bytes()
    return raw[132 + 12 + int(start):]


async def _stored(bus: EventBus, study: str, timeout_s: float = 20.0) -> list[Event]:
    """The study's history; retried while the client reconnects to a restarted server."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return [ev for _, ev in await bus.history(study)]
        except (nats.errors.Error, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@needs_dcmtk
async def test_kill_9_nats_during_dicom_ingest_loses_no_acknowledged_instance(
        tmp_path: Path) -> None:
    t0 = time.perf_counter()
    files = ct_instances(tmp_path / "study", 120, seed=7)  # 0.5 MB each, one study
    sent_by_sop = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f
                   for f in files}
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    state, nats_port, dicom_port = tmp_path / "state", free_port(), free_port()
    server = EmbeddedNats(tmp_path / "nats", port=nats_port, sync="always").start()
    env = clean_env(state_dir=str(state), nats_url=server.url, dicom_port=str(dicom_port),
                    services='["ingest"]', dicom_publish_timeout_s="2", dicom_min_free_mb="0")
    watcher = await EventBus.connect(BusSettings(servers=(server.url,)))
    try:
        with lastmile_up(env, tmp_path / "up.log", wait_port=dicom_port):
            sending = asyncio.create_task(storescu(dicom_port, "LM_LTS", files))
            deadline = time.monotonic() + 60
            while (await watcher.last_sequence()) < 20:  # a few instances in: kill
                assert time.monotonic() < deadline and not sending.done(), "nothing stored"
                await asyncio.sleep(0.01)
            server.kill()
            killed_at = time.perf_counter()
            first = await asyncio.wait_for(sending, 90)
            told_s = time.perf_counter() - killed_at
            # the sender was told: a failure status, storescu halts and exits non-zero
            assert first.returncode != 0, first.output[-2000:]
            assert first.failed, first.output[-2000:]
            assert len(first.succeeded) < len(files)
            acked_first = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                           for f in first.succeeded}

            server = EmbeddedNats(tmp_path / "nats", port=nats_port, sync="always").start()
            # before anything is re-sent: every acknowledged instance is in the log
            after_restart = {e.sop_instance_uid for e in await _stored(watcher, study)
                             if isinstance(e, InstanceStored)}
            lost = acked_first - after_restart
            assert lost == set(), f"{len(lost)} acknowledged instances lost"

            # the modality re-sends the whole study (as it would after a failure)
            resends = 0
            while resends < 5:
                resends += 1
                again = await storescu(dicom_port, "LM_LTS", files)
                if again.returncode == 0:
                    break
                await asyncio.sleep(1.0)  # the receiver is still reconnecting
            assert again.returncode == 0, again.output[-2000:]
            assert len(again.succeeded) == len(files)
            recovered_s = time.perf_counter() - killed_at
            events = await _stored(watcher, study)
    finally:
        await watcher.close()
        server.stop()

    stored = [e for e in events if isinstance(e, InstanceStored)]
    per_sop = Counter(e.sop_instance_uid for e in stored)
    assert set(per_sop) == set(sent_by_sop)
    assert max(per_sop.values()) == 1  # exactly one `instance stored` per instance
    duplicates = [e for e in events if isinstance(e, InstanceDuplicated)]
    assert {d.sop_instance_uid for d in duplicates} >= acked_first
    # exactly one file per instance, its bytes are what was sent, nothing else in the store
    instances = state / "instances"
    on_disk = _store_files(instances)
    assert sorted(on_disk) == sorted(e.store_key for e in stored)  # no orphans, no tmp
    for e in stored:
        data = on_disk[e.store_key].read_bytes()
        assert hashlib.sha256(data).hexdigest() == e.sha256
        assert _dataset_bytes(on_disk[e.store_key]) == _dataset_bytes(
            sent_by_sop[e.sop_instance_uid])
    record("kill -9 nats-server during DICOM ingest",
           done=f"storescu sending {len(files)} CT instances to `lastmile up` (ingest); "
                "nats-server killed mid-study and restarted; the whole study re-sent",
           items=len(files), acknowledged=len(acked_first), lost=len(lost),
           duration_s=time.perf_counter() - t0,
           failed_statuses=len(first.failed), resent_as_duplicates=len(duplicates),
           resends=resends, kill_to_failure_status_s=round(told_s, 2),
           kill_to_recovered_s=round(recovered_s, 2))
