"""BTS end to end on a real nats-server: phantom study in, SEG + SR out, events recorded."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from demo.phantoms import brain_mr_study, fake_patient, sphere_volume_ml
from engine.feed import feed_study
from engine.registry import deployed_event
from engine.worker import EngineWorker, WorkerConfig
from events.catalogue import (
    InferenceCompleted,
    OperatorFinished,
    ResultPublished,
    Stage,
)
from events.jetstream import EventBus
from tests.engine.conftest import SECRET, RunningWorker, dciodvfy_errors, has, wait_for

pytestmark = [pytest.mark.server, pytest.mark.slow]


async def test_bts_study_gives_valid_seg_sr_and_correct_volume(
    bus: EventBus, reference: dict, worker_config: WorkerConfig
) -> None:
    bts = reference["bts"]
    await bus.publish(deployed_event(bts, actor="test", stage=Stage.VALIDATION))
    study = brain_mr_study(101, lesion_radius_mm=15.0)
    truth_ml = study.truth_volumes_ml()["lesion"]
    worker = EngineWorker({"bts": bts}, worker_config)
    async with RunningWorker(bus, worker):
        await feed_study(bus, study.datasets, worker_config.instances_dir, SECRET,
                         pipeline="bts", called_ae="LM_BTS")
        events = await wait_for(bus, study.study_uid, has("engine.inference.completed"))
    done = next(e for e in events if isinstance(e, InferenceCompleted))
    volume = next(m for m in done.measurements if m.name == "volume_lesion")
    # known volume: the voxelised sphere, and the analytic sphere, within 5%
    assert abs(volume.value - truth_ml) / truth_ml < 0.05
    assert abs(volume.value - sphere_volume_ml(15.0)) / sphere_volume_ml(15.0) < 0.05
    assert done.runtime == "onnxruntime-cpu" and "no GPU" in done.runtime_reason
    assert done.progression is None  # first exam of this patient
    ops = [e for e in events if isinstance(e, OperatorFinished)]
    assert [o.operator for o in sorted(ops, key=lambda o: o.index)] == [
        op.op for op in bts.spec.operators]
    assert all(o.duration_s >= 0 for o in ops)
    published = [e for e in events if isinstance(e, ResultPublished)]
    assert {p.kind for p in published} == {"SEG", "SR"}
    # the objects: valid, referencing the source series, with the model's identity
    paths = [worker_config.results_dir / k for k in done.result_keys]
    for path in paths:
        assert dciodvfy_errors(path) == [], path
    seg = pydicom.dcmread(next(p for p in paths if p.name.startswith("seg")))
    flair_uid = next(d.SeriesInstanceUID for d in study.datasets
                     if d.SeriesDescription == "AX T2 FLAIR")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == flair_uid
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == bts.spec.model.name
    assert algo.AlgorithmVersion == bts.spec.model.version
    assert bts.spec.model.sha256 in algo.AlgorithmParameters
    assert done.selected_series == (flair_uid,)
    # patient identity never reached the log
    for ev in events:
        text = repr(ev)
        assert study.patient.patient_id not in text and study.patient.name not in text


async def test_bts_longitudinal_progression_across_three_exams(
    bus: EventBus, reference: dict, worker_config: WorkerConfig
) -> None:
    bts = reference["bts"]
    await bus.publish(deployed_event(bts, actor="test", stage=Stage.VALIDATION))
    patient = fake_patient(555)
    exams = [brain_mr_study(201, patient=patient, study_date="20250101", lesion_radius_mm=12.0),
             brain_mr_study(202, patient=patient, study_date="20250601", lesion_radius_mm=12.5),
             brain_mr_study(203, patient=patient, study_date="20260101", lesion_radius_mm=16.0)]
    worker = EngineWorker({"bts": bts}, worker_config)
    results = []
    async with RunningWorker(bus, worker):
        for exam in exams:
            await feed_study(bus, exam.datasets, worker_config.instances_dir, SECRET,
                             pipeline="bts", called_ae="LM_BTS")
            evs = await wait_for(bus, exam.study_uid, has("engine.inference.completed"))
            results.append(next(e for e in evs if isinstance(e, InferenceCompleted)))
    assert worker.loads == 1  # model loaded once per process
    vols = [next(m.value for m in r.measurements if m.name == "volume_lesion") for r in results]
    last = {m.name: m.value for m in results[2].measurements}
    expected_base = (vols[2] - vols[0]) / vols[0] * 100
    expected_prior = (vols[2] - vols[1]) / vols[1] * 100
    assert abs(last["change_from_baseline_lesion"] - expected_base) < 1e-3
    assert abs(last["change_from_prior_lesion"] - expected_prior) < 1e-3
    assert results[2].progression is True  # 12 mm -> 16 mm radius: > 2x volume
    assert results[1].progression is False  # 12 -> 12.5 mm: ~13%, under 25%
    # ... and as the AI's finding, which readers' progression reads are compared with
    assert [(f.label, f.classification) for f in results[2].findings] == [
        ("lesion", "progression")]
    assert [(f.label, f.classification) for f in results[1].findings] == [("lesion", "stable")]
    assert results[0].findings == ()  # the first exam has nothing to compare with
    # the SR of the last exam carries the change measurements
    sr = pydicom.dcmread(worker_config.results_dir / next(
        k for k in results[2].result_keys if "/sr-" in k))
    text = str(sr.ContentSequence)
    assert "Percent change from baseline" in text and "Progression" in text
    assert dciodvfy_errors(Path(worker_config.results_dir / next(
        k for k in results[2].result_keys if "/sr-" in k))) == []
