"""Drill: free disk space falls below the receiver's threshold, then returns.

Real disk, real sender: the threshold is set just below the free space the instance
store's file system has now, and a ballast file (``posix_fallocate``, which reserves
real blocks) takes the free space under it. storescu must be refused with Out of
Resources (PS3.4 B.2.3, A7xx) with nothing stored; once the ballast is removed the same
study is accepted. The margins are in GiB, so other writers on the machine do not flip
the outcome.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from demo.phantoms import pelvis_study
from events.base import Event
from events.catalogue import InstanceRejected, InstanceStored
from events.jetstream import EventBus
from events.subjects import type_filter
from ingest.statuses import StoreStatus
from tests.drills.procs import storescu
from tests.drills.report import record
from tests.ingest.conftest import StartIngest, needs_dcmtk, wait_for_events

pytestmark = [pytest.mark.server, needs_dcmtk]

GiB = 2**30


def _ballast(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


async def test_disk_below_threshold_refuses_then_recovers(
        start_ingest: StartIngest, bus: EventBus, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    instances = tmp_path / "instances"
    instances.mkdir()
    free = shutil.disk_usage(instances).free
    if free < 4 * GiB:
        pytest.skip(f"needs 4 GiB free on {instances} for the ballast")
    threshold = free - GiB
    r = await start_ingest(instances_dir=instances, min_free_bytes=threshold)
    before, during = pelvis_study(4901, images=2, size=256), pelvis_study(4902, images=2,
                                                                          size=256)
    first = await storescu(r.port, "LM_HFD", before.write(tmp_path / "before"))
    assert first.returncode == 0, first.output[-2000:]

    ballast = tmp_path / "ballast"
    _ballast(ballast, 2 * GiB)  # free space now ~1 GiB under the threshold
    try:
        files = during.write(tmp_path / "during")
        refused = await storescu(r.port, "LM_HFD", files)
        assert refused.returncode != 0 and refused.failed and not refused.succeeded
        assert "Received Store Response (Refused: OutOfResources)" in refused.output
        (rejected,) = await wait_for_events(bus, None, "ingest.instance.rejected",
                                            subject=type_filter("ingest.instance.rejected"))
        assert isinstance(rejected, InstanceRejected)
        assert rejected.status_name == StoreStatus.REFUSED_OUT_OF_RESOURCES.name
        assert "LASTMILE_DICOM_MIN_FREE_MB" in rejected.reason
        assert not [e for _, e in await bus.history(during.study_uid)
                    if isinstance(e, InstanceStored)]
    finally:
        ballast.unlink()

    recovered = await storescu(r.port, "LM_HFD", files)  # the modality retries
    assert recovered.returncode == 0, recovered.output[-2000:]
    evs: list[Event] = await wait_for_events(bus, during.study_uid, "ingest.instance.stored",
                                             len(files))
    assert sorted(e.sop_instance_uid for e in evs if isinstance(e, InstanceStored)) == \
        sorted(str(d.SOPInstanceUID) for d in during.datasets)
    stored = list(instances.rglob("*.dcm"))
    assert len(stored) == len(before.datasets) + len(files)  # nothing from the refusal
    record("disk below the free-space threshold",
           done="threshold set 1 GiB under the free space, a 2 GiB fallocate ballast "
                "added: storescu refused; ballast removed: the same study re-sent",
           items=len(before.datasets) + len(files),
           acknowledged=len(first.succeeded) + len(recovered.succeeded), lost=0,
           duration_s=time.perf_counter() - t0,
           refused_status=f"{StoreStatus.REFUSED_OUT_OF_RESOURCES.name} (0xA700)",
           files_in_store=len(stored))
