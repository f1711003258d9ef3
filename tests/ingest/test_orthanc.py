"""Orthanc as the PACS: a clinician sends a study to a pipeline from PACS (REST
``POST /modalities/{id}/store``), and it becomes stored + completed events."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pydicom
import pytest

from bench.ingest import ct_instances
from bench.peers import Orthanc, orthanc_binary
from events.catalogue import CompletionReason, InstanceStored, StudyCompleted
from events.jetstream import EventBus
from events.nats_server import free_port
from tests.ingest.conftest import StartIngest, wait_for_events

pytestmark = [
    pytest.mark.server,
    pytest.mark.slow,
    pytest.mark.skipif(orthanc_binary() is None, reason="Debian orthanc is not installed"),
]


async def test_orthanc_pushes_a_study_to_a_pipeline_ae(
        start_ingest: StartIngest, bus: EventBus, tmp_path: Path) -> None:
    r = await start_ingest()
    files = ct_instances(tmp_path / "study", 6, series_per_study=2)
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    pacs = Orthanc(tmp_path / "orthanc", free_port(), free_port(),
                   modalities={"lastmile-lts": ("LM_LTS", r.port)})
    with pacs:
        uploaded = [await asyncio.to_thread(pacs.upload, f) for f in files]
        orthanc_study = uploaded[0]["ParentStudy"]
        job = await asyncio.to_thread(pacs.push, "lastmile-lts", [orthanc_study])
        assert job is not None
    stored = await wait_for_events(bus, study_uid, "ingest.instance.stored", 6)
    assert {e.calling_ae for e in stored if isinstance(e, InstanceStored)} == {"ORTHANC"}
    (done,) = await wait_for_events(bus, study_uid, "ingest.study.completed", timeout=10)
    assert isinstance(done, StudyCompleted)
    assert (done.pipeline, done.series_count, done.instance_count) == ("lts", 2, 6)
    assert done.reason is CompletionReason.WHOLE_STUDY_RELEASED
    # the pixel data that left the PACS is the pixel data on our disk
    sent = {pydicom.dcmread(f).SOPInstanceUID: hashlib.sha256(pydicom.dcmread(f).PixelData)
            .hexdigest() for f in files}
    for ev in stored:
        assert isinstance(ev, InstanceStored)
        kept = pydicom.dcmread(r.instances_dir / ev.store_key)
        assert hashlib.sha256(kept.PixelData).hexdigest() == sent[ev.sop_instance_uid]
        assert hashlib.sha256((r.instances_dir / ev.store_key).read_bytes()).hexdigest() \
            == ev.sha256
