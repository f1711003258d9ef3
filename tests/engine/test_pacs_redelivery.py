"""What the PACS redelivery consumer decides from a run's history (pure), and its
delivery to a real Orthanc that was down when the worker tried."""

from __future__ import annotations

import asyncio
from pathlib import Path

import yaml

from demo.phantoms import pelvis_study
from engine.feed import feed_study
from engine.pacs_redelivery import PacsRedelivery, RedeliveryConfig, pending, result_files
from engine.registry import deployed_event
from engine.spec import load_pipeline
from engine.worker import EngineWorker, WorkerConfig
from events.catalogue import InferenceCompleted, PublishFailed, ResultPublished, Stage
from events.jetstream import EventBus
from tests.engine.conftest import SECRET, Orthanc, RunningWorker
from tests.engine.test_worker_pipelines import with_pacs
from tests.history import wait_for


def _run(keys: tuple[str, ...]) -> InferenceCompleted:
    return InferenceCompleted.new(actor="w", study_uid="1.2", pipeline="hfd", run_key="r1",
                                  model_name="m", model_version="1", runtime="cpu",
                                  runtime_reason="x", duration_s=1, inference_s=1,
                                  result_keys=keys)


def _failed(attempt: int, will_retry: bool = True) -> PublishFailed:
    return PublishFailed.new(actor="w", study_uid="1.2", run_key="r1",
                             destination="pacs:PACS", error="down", attempt=attempt,
                             will_retry=will_retry, address="PACS@10.0.0.5:104")


def test_pending_is_what_failed_and_was_not_published_since() -> None:
    run = _run(("r1/seg-1.2.3.dcm", "r1/sr-1.2.4.dcm", "r1/preview.png"))
    assert [f.kind for f in result_files(run.result_keys)] == ["SEG", "SR"]
    assert pending(run, []) == []  # never failed: the worker delivered it
    (p,) = pending(run, [_failed(3)])
    assert p.address == "PACS@10.0.0.5:104" and p.attempts_so_far == 3
    assert [f.sop_instance_uid for f in p.files] == ["1.2.3", "1.2.4"]
    half = ResultPublished.new(actor="pacs-redelivery", study_uid="1.2", run_key="r1",
                               destination="pacs:PACS", kind="SEG", sop_instance_uid="1.2.3")
    (p,) = pending(run, [_failed(3), half])
    assert [f.sop_instance_uid for f in p.files] == ["1.2.4"]
    assert pending(run, [_failed(3), _failed(4, will_retry=False)]) == []  # gave up


async def test_results_reach_a_pacs_that_was_down_when_the_worker_tried(
        bus: EventBus, reference: dict, orthanc: Orthanc, tmp_path: Path) -> None:
    base = with_pacs(reference["hfd"], tmp_path, orthanc)
    data = yaml.safe_load(base.path.read_text())
    data["publishers"][1].update(retries=0)
    base.path.write_text(yaml.safe_dump(data, sort_keys=False))
    hfd = load_pipeline(base.path)
    await bus.publish(deployed_event(hfd, actor="test", stage=Stage.VALIDATION))
    config = WorkerConfig(instances_dir=tmp_path / "instances",
                          results_dir=tmp_path / "results", secret=SECRET, worker_id="w")
    study = pelvis_study(4902, images=1, size=256)
    orthanc.stop()
    redelivery = PacsRedelivery(RedeliveryConfig(results_dir=config.results_dir,
                                                 backoff_s=0.2, max_backoff_s=0.5))
    stop = asyncio.Event()
    task = asyncio.create_task(redelivery.run(bus, stop))
    try:
        async with RunningWorker(bus, EngineWorker({"hfd": hfd}, config)):
            await feed_study(bus, study.datasets, config.instances_dir, SECRET,
                             pipeline="hfd", called_ae="LM_HFD")
            # the worker gave up after one try; the consumer keeps failing while it is down
            await wait_for(bus, study.study_uid, lambda evs: sum(
                isinstance(e, PublishFailed) for e in evs) >= 3, 60)
            await asyncio.to_thread(orthanc.start)
            evs = await wait_for(bus, study.study_uid, lambda evs: any(
                isinstance(e, ResultPublished) and e.destination == "pacs:ORTHANC"
                for e in evs), 60)
            await asyncio.sleep(1.0)  # a second delivery would show up by now
            evs = [e for _, e in await bus.history(study.study_uid)]
    finally:
        stop.set()
        await task
    to_pacs = [e for e in evs if isinstance(e, ResultPublished)
               and e.destination == "pacs:ORTHANC"]
    assert len(to_pacs) == 1 and to_pacs[0].actor == "pacs-redelivery"
    assert len(orthanc.get("/instances")) == 1  # type: ignore[arg-type]
    assert sum(isinstance(e, InferenceCompleted) for e in evs) == 1
