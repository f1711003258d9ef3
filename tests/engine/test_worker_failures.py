"""Bad input ends in a clear failed/skipped event and never blocks the queue; redelivery
and several workers never publish a second result. (The drill with a model that always
raises lives in tests/drills/test_poison.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import yaml

from demo.phantoms import abdomen_ct_study, brain_mr_study, pelvis_study
from engine.feed import completed_event, feed_study, stored_events
from engine.registry import deployed_event
from engine.spec import load_pipeline
from engine.worker import EngineWorker, WorkerConfig
from events.catalogue import (
    CompletionReason,
    InferenceCompleted,
    InferenceFailed,
    InferenceSkipped,
    NotRunReason,
    ResultPublished,
    Stage,
    StudyNotRun,
)
from events.jetstream import EventBus
from tests.engine.conftest import SECRET, RunningWorker, has, wait_for

pytestmark = [pytest.mark.server, pytest.mark.slow]


def _flair(study):  # type: ignore[no-untyped-def]
    return [d for d in study.datasets if d.SeriesDescription == "AX T2 FLAIR"]


async def test_bad_series_fail_clearly_and_the_next_study_still_runs(
    bus: EventBus, reference: dict, worker_config: WorkerConfig
) -> None:
    bts = reference["bts"]
    await bus.publish(deployed_event(bts, actor="test", stage=Stage.VALIDATION))
    missing = brain_mr_study(501)
    flair = _flair(missing)
    del flair[20]
    unreadable = brain_mr_study(502)
    bad = _flair(unreadable)
    bad[10].PixelData = bad[10].PixelData[:999]
    wrong_geometry = brain_mr_study(503)
    wg = _flair(wrong_geometry)
    wg[3].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    good = brain_mr_study(504)
    async with RunningWorker(bus, EngineWorker({"bts": bts}, worker_config)):
        for datasets in (flair, bad, wg):
            await feed_study(bus, datasets, worker_config.instances_dir, SECRET,
                             pipeline="bts", called_ae="LM_BTS")
        await feed_study(bus, good.datasets, worker_config.instances_dir, SECRET,
                         pipeline="bts", called_ae="LM_BTS")
        await wait_for(bus, good.study_uid, has("engine.inference.completed"))
        failures = {}
        for study in (missing, unreadable, wrong_geometry):
            evs = await wait_for(bus, study.study_uid, has("engine.inference.failed"))
            (failed,) = [e for e in evs if isinstance(e, InferenceFailed)]
            assert failed.final and failed.attempt == 1  # bad data: not retried
            assert not any(isinstance(e, InferenceCompleted | ResultPublished) for e in evs)
            failures[study.study_uid] = failed
    assert failures[missing.study_uid].operator == "load_volume"
    assert "missing or misplaced slice" in failures[missing.study_uid].error
    assert failures[unreadable.study_uid].operator == "load_volume"
    assert "cannot be decoded" in failures[unreadable.study_uid].error
    assert "orientation" in failures[wrong_geometry.study_uid].error


async def test_no_matching_series_is_skipped_with_each_reason(
    bus: EventBus, reference: dict, worker_config: WorkerConfig
) -> None:
    bts = reference["bts"]
    await bus.publish(deployed_event(bts, actor="test", stage=Stage.VALIDATION))
    ct = abdomen_ct_study(601)  # a CT sent to the brain MR pipeline
    async with RunningWorker(bus, EngineWorker({"bts": bts}, worker_config)):
        await feed_study(bus, ct.datasets, worker_config.instances_dir, SECRET,
                         pipeline="bts", called_ae="LM_BTS")
        evs = await wait_for(bus, ct.study_uid, has("engine.inference.skipped"))
    skipped = next(e for e in evs if isinstance(e, InferenceSkipped))
    assert skipped.reason == "no series matched the selection rules"
    assert len(skipped.rejected_series) == 1
    assert "modality CT not in ['MR']" in skipped.rejected_series[0]


async def test_redelivered_trigger_never_publishes_a_second_result(
    bus: EventBus, reference: dict, worker_config: WorkerConfig
) -> None:
    hfd = reference["hfd"]
    await bus.publish(deployed_event(hfd, actor="test", stage=Stage.VALIDATION))
    study = pelvis_study(801, images=2, size=256)
    worker = EngineWorker({"hfd": hfd}, worker_config)
    async with RunningWorker(bus, worker):
        stored, done = await feed_study(bus, study.datasets, worker_config.instances_dir,
                                        SECRET, pipeline="hfd", called_ae="LM_HFD")
        await wait_for(bus, study.study_uid, has("engine.inference.completed"))
        # the same study completed again (a forced completion: a different event id)
        again = completed_event(stored, pipeline="hfd", reason=CompletionReason.FORCED)
        assert done is not None and again.event_id != done.event_id
        await bus.publish(again)
        for _ in range(100):
            if any(o.status == "duplicate" for o in worker.outcomes):
                break
            await asyncio.sleep(0.1)
    evs = [e for _, e in await bus.history(study.study_uid)]
    assert sum(isinstance(e, InferenceCompleted) for e in evs) == 1
    assert sum(isinstance(e, ResultPublished) for e in evs) == 1
    assert [o.status for o in worker.outcomes] == ["completed", "duplicate"]


async def test_two_workers_share_the_queue_and_each_study_runs_once(
    bus: EventBus, reference: dict, worker_config: WorkerConfig
) -> None:
    hfd = reference["hfd"]
    await bus.publish(deployed_event(hfd, actor="test", stage=Stage.VALIDATION))
    studies = [pelvis_study(900 + i, images=1, size=256) for i in range(6)]
    # the production ack wait (60 s), not the fixture's 10 s: two workers in one process
    # share one event loop, and on a loaded host (load ~20 on 2 cores) a heartbeat can
    # come later than 10 s; the run is then redelivered to the other worker by design
    config = WorkerConfig(**{**worker_config.__dict__, "ack_wait_s": 60.0})
    w1 = EngineWorker({"hfd": hfd}, config)
    w2 = EngineWorker({"hfd": hfd}, WorkerConfig(**{**config.__dict__,
                                                    "worker_id": "second"}))
    async with RunningWorker(bus, w1), RunningWorker(bus, w2):
        for s in studies:
            stored = stored_events(s.datasets, worker_config.instances_dir, SECRET,
                                   called_ae="LM_HFD")
            await bus.publish_many(stored)
            await bus.publish(completed_event(stored, pipeline="hfd"))
        for s in studies:
            await wait_for(bus, s.study_uid, has("engine.inference.completed"))
    runs = [o for o in w1.outcomes + w2.outcomes if o.status == "completed"]
    assert sorted(o.study_uid for o in runs) == sorted(s.study_uid for s in studies)
    for s in studies:
        evs = [e for _, e in await bus.history(s.study_uid)]
        assert sum(isinstance(e, InferenceCompleted) for e in evs) == 1
    assert np.all([w.loads <= 1 for w in (w1, w2)])


async def test_a_stored_file_gone_missing_fails_in_read_instances(
    bus: EventBus, reference: dict, worker_config: WorkerConfig
) -> None:
    hfd = reference["hfd"]
    await bus.publish(deployed_event(hfd, actor="test", stage=Stage.VALIDATION))
    study = pelvis_study(1201, images=2, size=256)
    stored = stored_events(study.datasets, worker_config.instances_dir, SECRET,
                           called_ae="LM_HFD")
    (worker_config.instances_dir / stored[1].store_key).unlink()
    async with RunningWorker(bus, EngineWorker({"hfd": hfd}, worker_config)):
        await bus.publish_many(stored)
        await bus.publish(completed_event(stored, pipeline="hfd"))
        evs = await wait_for(bus, study.study_uid, has("engine.inference.failed"))
    failed = next(e for e in evs if isinstance(e, InferenceFailed))
    assert failed.operator == "read_instances" and failed.final
    assert "missing from the store" in failed.error


async def test_pipeline_pinned_to_tensorrt_on_a_cpu_host_fails_naming_the_runtime(
    bus: EventBus, reference: dict, worker_config: WorkerConfig, tmp_path: Path
) -> None:
    base = reference["hfd"]
    data = yaml.safe_load(base.path.read_text())
    data["runtime"] = "tensorrt"
    data["model"].update(path=str(base.model_path), card=str(base.card_path))
    path = tmp_path / "hfd.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    pinned = load_pipeline(path)
    await bus.publish(deployed_event(pinned, actor="test", stage=Stage.VALIDATION))
    study = pelvis_study(1301, images=1, size=256)
    async with RunningWorker(bus, EngineWorker({"hfd": pinned}, worker_config)):
        await feed_study(bus, study.datasets, worker_config.instances_dir, SECRET,
                         pipeline="hfd", called_ae="LM_HFD")
        evs = await wait_for(bus, study.study_uid, has("system.delivery.failed"))
    failed = [e for e in evs if isinstance(e, InferenceFailed)]
    assert {f.operator for f in failed} == {"select_runtime"}
    assert "tensorrt requested but unavailable" in failed[0].error
    assert [f.final for f in failed] == [False, True]  # another (GPU) worker may take it


async def test_not_run_before_deployment_runs_when_completed_again_after(
    bus: EventBus, reference: dict, worker_config: WorkerConfig
) -> None:
    hfd = reference["hfd"]
    study = pelvis_study(1401, images=1, size=256)
    worker = EngineWorker({"hfd": hfd}, worker_config)
    async with RunningWorker(bus, worker):
        stored, _ = await feed_study(bus, study.datasets, worker_config.instances_dir, SECRET,
                                     pipeline="hfd", called_ae="LM_HFD")
        evs = await wait_for(bus, study.study_uid, has("engine.study.not_run"))
        not_run = next(e for e in evs if isinstance(e, StudyNotRun))
        assert not_run.reason_code == NotRunReason.NOT_DEPLOYED
        assert "not deployed" in not_run.reason and not_run.pipeline == "hfd"
        await bus.publish(deployed_event(hfd, actor="test", stage=Stage.STAGING))
        await bus.publish(completed_event(stored, pipeline="hfd",
                                          reason=CompletionReason.FORCED))
        await wait_for(bus, study.study_uid, has("engine.inference.completed"))
    assert [o.status for o in worker.outcomes] == ["not_run", "completed"]
