"""A late radiograph re-runs HFD; the new result supersedes the earlier one, and the
earlier one is withdrawn from the PACS (Orthanc) by an IHE IOCM rejection note that
dciodvfy accepts, sent after the new result. Real dcmtk sender, SCP, completion, worker."""

from __future__ import annotations

import asyncio
import shutil
import urllib.request
from pathlib import Path

import pydicom
import pytest

from bench.e2e import _bench_pipeline
from demo.phantoms import pelvis_study
from engine.iocm import REJECTED_FOR_QUALITY
from engine.registry import deployed_event
from engine.worker import EngineWorker, WorkerConfig
from events.catalogue import (
    InferenceCompleted,
    ResultMarkedStale,
    ResultPublished,
    ResultSuperseded,
    ResultWithdrawn,
    Stage,
    StudyAmended,
    StudyCompleted,
)
from events.jetstream import EventBus
from events.nats_server import free_port
from tests.engine.conftest import SECRET, Orthanc, RunningWorker, dciodvfy_errors, has, wait_for
from tests.engine.test_e2e_dicom import _storescu
from tests.engine.test_worker_pipelines import with_pacs

pytestmark = [
    pytest.mark.server, pytest.mark.slow,
    pytest.mark.skipif(shutil.which("storescu") is None, reason="Debian dcmtk not installed"),
]

KOS = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document Storage
RULES = "pipelines:\n  hfd: {completion: {quiet_period_s: 1.5, max_wait_s: 60}}\n"


async def test_late_radiograph_reruns_supersedes_and_withdraws_the_earlier_result(
    bus: EventBus, reference: dict, worker_config: WorkerConfig, orthanc: Orthanc,
    tmp_path: Path,
) -> None:
    from ingest.app import IngestApp, IngestOptions
    from ingest.dicom_scp import ScpConfig
    from ingest.rules_file import RulesFile

    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    options = IngestOptions(instances_dir=worker_config.instances_dir, rules_path=rules,
                            scp=ScpConfig(port=free_port()), min_free_bytes=0)
    ingest = IngestApp(options, SECRET, RulesFile.open(rules))
    hfd = with_pacs(reference["hfd"], tmp_path, orthanc)
    await bus.publish(deployed_event(hfd, actor="test", stage=Stage.VALIDATION))
    study = pelvis_study(1501, images=3, size=256)
    files = study.write(tmp_path / "send")
    stop = asyncio.Event()
    task = asyncio.create_task(ingest.run(bus, stop))
    try:
        await asyncio.wait_for(ingest.scp.started.wait(), 15)
        while ingest.detector is None or not ingest.detector.ready.is_set():
            await asyncio.sleep(0.02)
        assert ingest.scp.port is not None
        async with RunningWorker(bus, EngineWorker({"hfd": hfd}, worker_config)):
            await _storescu(ingest.scp.port, "LM_HFD", files[:2])  # one association
            first = await wait_for(bus, study.study_uid, has("engine.inference.completed"), 90)
            await _storescu(ingest.scp.port, "LM_HFD", files[2:])  # the late radiograph
            evs = await wait_for(bus, study.study_uid, has("engine.result.withdrawn"), 90)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)

    (done,) = [e for e in first if isinstance(e, StudyCompleted)]
    assert done.instance_count == 2 and not done.partial
    (amended,) = [e for e in evs if isinstance(e, StudyAmended)]
    assert amended.rerun and amended.new_instance_count == 1 and amended.instance_count == 3
    old, new = [e for e in evs if isinstance(e, InferenceCompleted)]
    late_sop = str(pydicom.dcmread(files[2], stop_before_pixels=True).SOPInstanceUID)
    assert late_sop in {f.sop_instance_uid for f in new.findings}  # the late image analysed
    assert late_sop not in {f.sop_instance_uid for f in old.findings}
    (superseded,) = [e for e in evs if isinstance(e, ResultSuperseded)]
    assert (superseded.run_key, superseded.superseded_by) == (old.run_key, new.run_key)
    (withdrawn,) = [e for e in evs if isinstance(e, ResultWithdrawn)]
    old_sent = {e.sop_instance_uid for e in evs if isinstance(e, ResultPublished)
                and e.run_key == old.run_key and e.destination.startswith("pacs:")}
    assert set(withdrawn.rejected_sop_instance_uids) == old_sent and old_sent
    assert "113001" in withdrawn.reason_code
    # the rejection note went after the new result reached the PACS
    order = [e.event_id for e in evs]
    new_sent = [e for e in evs if isinstance(e, ResultPublished) and e.run_key == new.run_key
                and e.destination.startswith("pacs:")]
    assert new_sent and max(order.index(e.event_id) for e in new_sent) < order.index(
        withdrawn.event_id)

    # the note as Orthanc stored it: a KOS titled with the IOCM reason, rejecting the old
    # result's instances, and dciodvfy-clean
    kos_ids = [i for i in orthanc.get("/instances")  # type: ignore[union-attr]
               if orthanc.get(f"/instances/{i}/simplified-tags")["SOPClassUID"] == KOS]  # type: ignore[index]
    (kos_id,) = kos_ids
    url = f"http://127.0.0.1:{orthanc.http_port}/instances/{kos_id}/file"
    with urllib.request.urlopen(url, timeout=10) as r:
        (tmp_path / "kos.dcm").write_bytes(r.read())
    kos = pydicom.dcmread(tmp_path / "kos.dcm")
    assert kos.SOPInstanceUID == withdrawn.rejection_note_uid
    title = kos.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == (
        REJECTED_FOR_QUALITY.value, REJECTED_FOR_QUALITY.scheme_designator)
    referenced = {item.ReferencedSOPInstanceUID
                  for study_item in kos.CurrentRequestedProcedureEvidenceSequence
                  for series in study_item.ReferencedSeriesSequence
                  for item in series.ReferencedSOPSequence}
    assert referenced == old_sent
    assert kos.StudyInstanceUID == study.study_uid
    assert dciodvfy_errors(tmp_path / "kos.dcm") == []


async def test_changed_pixels_mark_the_result_stale_when_the_pipeline_says_so(
    bus: EventBus, reference: dict, worker_config: WorkerConfig, tmp_path: Path,
) -> None:
    from engine.feed import completed_event, stored_events

    hfd = _bench_pipeline(reference["hfd"], tmp_path, None)  # results to the store only
    await bus.publish(deployed_event(hfd, actor="test", stage=Stage.VALIDATION))
    study = pelvis_study(1502, images=2, size=256)
    stored = stored_events(study.datasets, worker_config.instances_dir, SECRET,
                           called_ae="LM_HFD")
    await bus.publish_many([*stored, completed_event(stored, pipeline="hfd")])
    async with RunningWorker(bus, EngineWorker({"hfd": hfd}, worker_config)):
        first = await wait_for(bus, study.study_uid, has("engine.inference.completed"), 60)
        await bus.publish(StudyAmended.new(
            actor="completion", study_uid=study.study_uid, pipeline="hfd",
            new_instance_count=1, series_uids=(stored[0].series_uid,), rerun=False,
            stale=True, pixels_changed=1))
        evs = await wait_for(bus, study.study_uid, has("engine.result.marked_stale"), 60)
    (result,) = [e for e in first if isinstance(e, InferenceCompleted)]
    (stale,) = [e for e in evs if isinstance(e, ResultMarkedStale)]
    assert stale.run_key == result.run_key and stale.changed_instances == 1
    assert len([e for e in evs if isinstance(e, InferenceCompleted)]) == 1  # no re-run
