"""Completion survives restarts (no lost late series, no double completion), and a
failed publish leaves no file and tells the sender to retry."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from bench.ingest import ct_instances
from events.catalogue import (
    AssociationAborted,
    CompletionReason,
    StudyAmended,
    StudyCompleted,
)
from events.instance_store import InstanceStore, key_for, legacy_key_for
from events.jetstream import BusSettings, EventBus
from events.nats_server import EmbeddedNats, free_port
from ingest.jetstream import ThreadPublisher
from ingest.receiver import InstanceReceiver, Received
from ingest.rules import default_rules
from ingest.statuses import StoreStatus
from tests.ingest.conftest import SECRET, StartIngest, storescu, wait_for_events
from tests.ingest.test_property import LoopThread
from tests.ingest.test_store_and_dataset import dataset_bytes

pytestmark = pytest.mark.server

QUIET = """
pipelines:
  lts: {completion: {quiet_period_s: 1.5, amend_quiet_s: 0.5, rerun_on_amend: true}}
"""


async def test_late_series_after_a_restart_is_an_amendment_not_a_second_completion(
        start_ingest: StartIngest, bus: EventBus, tmp_path: Path) -> None:
    files = ct_instances(tmp_path / "study", 6, series_per_study=2)
    first = [f for f in files if pydicom.dcmread(f, stop_before_pixels=True).SeriesNumber == 1]
    late = [f for f in files if f not in first]
    study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    a = await start_ingest(QUIET)
    assert (await storescu(a.port, first, called="LM_LTS"))[0] == 0
    (done,) = await wait_for_events(bus, study, "ingest.study.completed")
    assert done.instance_count == 3  # type: ignore[attr-defined]
    await a.shutdown()

    b = await start_ingest(QUIET, instances_dir=a.instances_dir)  # same log, same durable
    assert (await storescu(b.port, late, called="LM_LTS"))[0] == 0
    (amended,) = await wait_for_events(bus, study, "ingest.study.amended")
    assert isinstance(amended, StudyAmended)
    assert amended.new_instance_count == 3 and amended.rerun is True
    await asyncio.sleep(2.0)  # past the quiet period: still one completion
    completions = [e for _, e in await bus.history(study) if isinstance(e, StudyCompleted)]
    assert len(completions) == 1


def send_then_abort(port: int, path: Path) -> int:
    """Store one instance and abort (A-ABORT from the sender)."""
    ae = AE(ae_title="ABORTER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="LM_LTS")
    status = int(assoc.send_c_store(pydicom.dcmread(path)).Status)
    assoc.abort()
    return status


HOLD = """
pipelines:
  lts: {completion: {quiet_period_s: 1.5, max_wait_s: 4}}
"""


async def test_an_aborted_study_is_held_across_a_restart_and_completes_partial_at_max_wait(
        start_ingest: StartIngest, bus: EventBus, tmp_path: Path) -> None:
    (path,) = ct_instances(tmp_path / "one", 1)
    study = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
    a = await start_ingest(HOLD)
    assert await asyncio.to_thread(send_then_abort, a.port, path) == StoreStatus.SUCCESS
    (abort,) = await wait_for_events(bus, study, "ingest.association.aborted")
    assert isinstance(abort, AssociationAborted)
    assert (abort.aborted_by, abort.instance_count, abort.calling_ae) == (
        "requestor", 1, "ABORTER")
    await asyncio.sleep(2.0)  # past the quiet period: the abort holds the study
    await a.shutdown()
    assert not [e for _, e in await bus.history(study) if isinstance(e, StudyCompleted)]
    await asyncio.sleep(3.0)  # down: this time is not up-time
    await start_ingest(HOLD, instances_dir=a.instances_dir)
    await asyncio.sleep(0.8)  # wall time since the first instance > max wait, up-time not
    assert not [e for _, e in await bus.history(study) if isinstance(e, StudyCompleted)]
    (done,) = await wait_for_events(bus, study, "ingest.study.completed", timeout=10)
    assert isinstance(done, StudyCompleted)
    assert done.reason is CompletionReason.MAX_WAIT and done.instance_count == 1
    assert done.partial
    assert any("aborted by the requestor" in e for e in done.evidence)


async def test_duplicates_are_recognised_after_a_restart(
        start_ingest: StartIngest, bus: EventBus, tmp_path: Path) -> None:
    ct = get_testdata_file("CT_small.dcm")
    a = await start_ingest()
    assert (await storescu(a.port, [ct], called="LM_LTS"))[0] == 0
    await a.shutdown()
    b = await start_ingest(instances_dir=a.instances_dir)
    assert (await storescu(b.port, [ct], called="LM_LTS"))[0] == 0
    study = pydicom.dcmread(ct, stop_before_pixels=True).StudyInstanceUID
    await wait_for_events(bus, study, "ingest.instance.duplicated")


def test_unacknowledged_event_means_failure_status_and_no_file(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "nats", port=free_port(), sync="always").start()
    lt = LoopThread()
    bus: EventBus | None = None
    try:
        bus = lt.run(EventBus.connect(BusSettings(servers=(server.url,), stream="GONE",
                                                  publish_retry_s=1.0, publish_timeout_s=0.5)))
        store = InstanceStore(tmp_path / "store")
        receiver = InstanceReceiver(store, ThreadPublisher(bus, lt.loop, timeout_s=10),
                                    SECRET, default_rules)
        ct = get_testdata_file("CT_small.dcm")
        data, ts = dataset_bytes(ct)
        header = pydicom.dcmread(ct, stop_before_pixels=True)
        server.kill()  # the log is gone
        outcome = receiver.receive(Received(
            dataset=data, transfer_syntax_uid=ts, sop_class_uid=str(header.SOPClassUID),
            sop_instance_uid=str(header.SOPInstanceUID), calling_ae="MOD", called_ae="LM_LTS"))
        assert outcome.status is StoreStatus.PROCESSING_FAILURE
        assert "did not acknowledge" in outcome.reason
        assert list((tmp_path / "store").glob("*/*.dcm")) == []
        assert store.leftovers() == []
    finally:
        if bus is not None:
            with contextlib.suppress(OSError, TimeoutError):
                lt.run(asyncio.wait_for(bus.nc.close(), 5))
        server.stop()
        lt.close()


async def test_a_file_lost_after_its_event_was_acked_is_rewritten_by_the_senders_retry(
        start_ingest: StartIngest, bus: EventBus, tmp_path: Path) -> None:
    """The file's fsync runs while the event is published; a power failure in between can
    leave the event with a short file. The sender got no Success, so it resends: the
    retry must rewrite the file (not answer 'duplicate' over a broken file)."""
    ct = get_testdata_file("CT_small.dcm")
    study = pydicom.dcmread(ct, stop_before_pixels=True).StudyInstanceUID
    a = await start_ingest()
    assert (await storescu(a.port, [ct], called="LM_LTS"))[0] == 0
    (stored,) = await wait_for_events(bus, study, "ingest.instance.stored")
    path = a.instances_dir / stored.store_key  # type: ignore[attr-defined]
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 3])  # what a power failure can leave
    assert (await storescu(a.port, [ct], called="LM_LTS"))[0] == 0
    await wait_for_events(bus, study, "ingest.instance.duplicated")
    assert path.read_bytes() == whole
    history = [e for _, e in await bus.history(study)]
    assert sum(e.type_name() == "ingest.instance.stored" for e in history) == 1


async def test_bytes_stored_by_an_older_version_in_the_two_level_layout_are_duplicates(
        start_ingest: StartIngest, bus: EventBus, tmp_path: Path) -> None:
    """Stores written before the one-level layout keep their files where their events say;
    a resend of those bytes is a duplicate, not a repair that writes a second copy."""
    ct = get_testdata_file("CT_small.dcm")
    study = pydicom.dcmread(ct, stop_before_pixels=True).StudyInstanceUID
    a = await start_ingest()
    assert (await storescu(a.port, [ct], called="LM_LTS"))[0] == 0
    (stored,) = await wait_for_events(bus, study, "ingest.instance.stored")
    sha = stored.sha256  # type: ignore[attr-defined]
    legacy = a.instances_dir / legacy_key_for(sha)
    legacy.parent.mkdir(parents=True)
    (a.instances_dir / stored.store_key).rename(legacy)  # type: ignore[attr-defined]
    assert (await storescu(a.port, [ct], called="LM_LTS"))[0] == 0
    await wait_for_events(bus, study, "ingest.instance.duplicated")
    assert not (a.instances_dir / key_for(sha)).exists()
    assert hashlib.sha256(legacy.read_bytes()).hexdigest() == sha
