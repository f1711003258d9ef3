"""LTS and HFD end to end: real nats-server, real Orthanc as the PACS, dciodvfy on results;
stages decide who sees results."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import yaml

from demo.phantoms import abdomen_ct_study, pelvis_study
from engine.feed import feed_study
from engine.registry import deployed_event, fold_pipelines, stage_changed_event
from engine.spec import LoadedPipeline, load_pipeline
from engine.worker import EngineWorker, WorkerConfig, blinding_hash
from events.catalogue import (
    InferenceCompleted,
    InferenceSkipped,
    ResultPublished,
    Stage,
)
from events.jetstream import EventBus
from tests.engine.conftest import (
    SECRET,
    Orthanc,
    RunningWorker,
    dciodvfy_errors,
    has,
    wait_for,
)

pytestmark = [pytest.mark.server, pytest.mark.slow]


def with_pacs(loaded: LoadedPipeline, tmp: Path, orthanc: Orthanc,
              stages: tuple[str, ...] = ("validation", "clinical")) -> LoadedPipeline:
    data = yaml.safe_load(loaded.path.read_text())
    data["model"]["path"] = str(loaded.model_path)
    data["model"]["card"] = str(loaded.card_path)
    data["publishers"] = [{"kind": "store"},
                          {"kind": "pacs", "ae_title": orthanc.ae_title, "host": "127.0.0.1",
                           "port": orthanc.dicom_port, "retries": 2, "retry_delay_s": 0.2,
                           "stages": list(stages)}]
    path = tmp / f"{loaded.name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_pipeline(path)


async def test_lts_seg_and_sr_reach_orthanc_with_volumes_and_blinding_hash(
    bus: EventBus, reference: dict, worker_config: WorkerConfig, orthanc: Orthanc,
    tmp_path: Path,
) -> None:
    lts = with_pacs(reference["lts"], tmp_path, orthanc)
    await bus.publish(deployed_event(lts, actor="test", stage=Stage.VALIDATION))
    study = abdomen_ct_study(301)
    truth = study.truth_volumes_ml()
    async with RunningWorker(bus, EngineWorker({"lts": lts}, worker_config)):
        await feed_study(bus, study.datasets, worker_config.instances_dir, SECRET,
                         pipeline="lts", called_ae="LM_LTS")
        events = await wait_for(bus, study.study_uid, has("engine.inference.completed"))
    done = next(e for e in events if isinstance(e, InferenceCompleted))
    got = {m.label: m.value for m in done.measurements}
    for lobe in ("left_lobe", "right_lobe"):
        assert abs(got[lobe] - truth[lobe]) / truth[lobe] < 0.05, (lobe, got, truth)
    # blinded reading: the salted hash is in the SEG's series description and the event
    assert done.blinding_hash == blinding_hash(SECRET, done.run_key)
    seg_path = next(worker_config.results_dir / k for k in done.result_keys if "/seg-" in k)
    seg = pydicom.dcmread(seg_path)
    assert seg.SeriesDescription.endswith(done.blinding_hash)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["left_lobe", "right_lobe", "vessels"]
    for k in done.result_keys:
        assert dciodvfy_errors(worker_config.results_dir / k) == []
    # both objects are in the PACS, and the log says so
    pacs = [e for e in events if isinstance(e, ResultPublished)
            and e.destination == "pacs:ORTHANC"]
    assert {p.kind for p in pacs} == {"SEG", "SR"}
    stored = orthanc.get("/instances?expand")
    uids = {i["MainDicomTags"]["SOPInstanceUID"] for i in stored}  # type: ignore[union-attr]
    assert {p.sop_instance_uid for p in pacs} <= uids


async def test_hfd_exam_classifies_each_hip_and_sr_is_valid(
    bus: EventBus, reference: dict, worker_config: WorkerConfig
) -> None:
    hfd = reference["hfd"]
    await bus.publish(deployed_event(hfd, actor="test", stage=Stage.VALIDATION))
    study = pelvis_study(401, images=5, size=1024, classes=("fracture", "hardware"))
    async with RunningWorker(bus, EngineWorker({"hfd": hfd}, worker_config)):
        await feed_study(bus, study.datasets, worker_config.instances_dir, SECRET,
                         pipeline="hfd", called_ae="LM_HFD")
        events = await wait_for(bus, study.study_uid, has("engine.inference.completed"))
    done = next(e for e in events if isinstance(e, InferenceCompleted))
    assert len(done.findings) == 10  # two hips on each of five images
    by_image = {}
    for f in done.findings:
        by_image.setdefault(f.sop_instance_uid, {})[f.label] = f
    truth = {str(ds.SOPInstanceUID): hips for ds, hips in zip(study.datasets, study.hips,
                                                             strict=True)}
    for uid, found in by_image.items():
        right, left = truth[uid]
        assert found["right_hip"].classification == right.classification == "fracture"
        assert found["left_hip"].classification == left.classification == "hardware"
        # boxes near the truth (1024 px image; the card reports ~8 px mean error)
        for det, t in ((found["right_hip"], right), (found["left_hip"], left)):
            assert det.box is not None
            assert max(abs(a - b) for a, b in zip(det.box, t.box, strict=True)) < 60
    (sr_key,) = done.result_keys
    assert dciodvfy_errors(worker_config.results_dir / sr_key) == []


async def test_silent_stage_keeps_results_from_the_pacs_and_staging_needs_a_manual_send(
    bus: EventBus, reference: dict, worker_config: WorkerConfig, orthanc: Orthanc,
    tmp_path: Path,
) -> None:
    hfd = with_pacs(reference["hfd"], tmp_path, orthanc)
    await bus.publish(deployed_event(hfd, actor="test", stage=Stage.STAGING))
    routed = pelvis_study(402, images=1, size=512)
    by_hand = pelvis_study(403, images=1, size=512)
    silent = pelvis_study(404, images=1, size=512)
    async with RunningWorker(bus, EngineWorker({"hfd": hfd}, worker_config)):
        # staging: a live routed study (sent to the general AE) is not run...
        await feed_study(bus, routed.datasets, worker_config.instances_dir, SECRET,
                         pipeline="hfd", called_ae="LASTMILE")
        evs = await wait_for(bus, routed.study_uid, has("engine.inference.skipped"))
        skipped = next(e for e in evs if isinstance(e, InferenceSkipped))
        assert "staging" in skipped.reason and "LM_HFD" in skipped.reason
        # ...a study sent by hand to the pipeline's AE is
        await feed_study(bus, by_hand.datasets, worker_config.instances_dir, SECRET,
                         pipeline="hfd", called_ae="LM_HFD")
        await wait_for(bus, by_hand.study_uid, has("engine.inference.completed"))
        # silent: routed studies run, but results stay out of the PACS
        state = fold_pipelines([deployed_event(hfd, actor="test", stage=Stage.STAGING)])
        await bus.publish(stage_changed_event(state["hfd"], Stage.SILENT, actor="dr.governance",
                                              reason="silent trial approved by board"))
        await feed_study(bus, silent.datasets, worker_config.instances_dir, SECRET,
                         pipeline="hfd", called_ae="LASTMILE")
        evs = await wait_for(bus, silent.study_uid, has("engine.inference.completed"))
    destinations = {e.destination for e in evs if isinstance(e, ResultPublished)}
    assert destinations == {"store"}
    assert orthanc.get("/instances") == []  # staging and silent never reached clinicians


async def test_pacs_down_is_retried_then_recorded_and_results_stay_in_the_store(
    bus: EventBus, reference: dict, worker_config: WorkerConfig, tmp_path: Path,
) -> None:
    from events.catalogue import PublishFailed
    from events.nats_server import free_port

    base = reference["hfd"]
    data = yaml.safe_load(base.path.read_text())
    data["model"].update(path=str(base.model_path), card=str(base.card_path))
    data["publishers"] = [{"kind": "store"},
                          {"kind": "pacs", "ae_title": "NOBODY", "host": "127.0.0.1",
                           "port": free_port(), "retries": 1, "retry_delay_s": 0.1}]
    path = tmp_path / "hfd.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    hfd = load_pipeline(path)
    await bus.publish(deployed_event(hfd, actor="test", stage=Stage.VALIDATION))
    study = pelvis_study(1501, images=1, size=256)
    async with RunningWorker(bus, EngineWorker({"hfd": hfd}, worker_config)):
        await feed_study(bus, study.datasets, worker_config.instances_dir, SECRET,
                         pipeline="hfd", called_ae="LM_HFD")
        evs = await wait_for(bus, study.study_uid, has("engine.inference.completed"))
    failed = next(e for e in evs if isinstance(e, PublishFailed))
    assert failed.destination == "pacs:NOBODY" and failed.attempt == 2
    assert "unreachable" in failed.error and "did not answer" in failed.error
    assert "after 2 attempts" in failed.error and not failed.refused and failed.will_retry
    # handed over to the PACS redelivery consumer, with the address it needs
    port = data["publishers"][1]["port"]
    assert failed.will_retry and failed.address == f"NOBODY@127.0.0.1:{port}"
    done = next(e for e in evs if isinstance(e, InferenceCompleted))
    assert (worker_config.results_dir / done.result_keys[0]).is_file()
    assert {e.destination for e in evs if isinstance(e, ResultPublished)} == {"store"}
