"""Drills: the PACS (a real Orthanc) or the XNAT stand-in is down; results are published
when it returns, once."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path

import pytest
import yaml

from demo.phantoms import pelvis_study
from engine.feed import feed_study
from engine.pacs_redelivery import PacsRedelivery, RedeliveryConfig
from engine.registry import deployed_event
from engine.spec import load_pipeline
from engine.worker import EngineWorker, WorkerConfig
from engine.xnat_publisher import XnatPublisher
from events.catalogue import InferenceCompleted, PublishFailed, ResultPublished, Stage
from events.jetstream import EventBus
from tests.drills.report import record
from tests.engine.conftest import SECRET, Orthanc, RunningWorker
from tests.engine.test_worker_pipelines import with_pacs
from tests.history import wait_for
from tests.xnat.conftest import StudyResult, of_type
from tests.xnat.conftest import wait_for as wait_for_xnat
from tests.xnat.standin import XnatStandIn
from tests.xnat.test_publisher import config, published, running

pytestmark = [pytest.mark.server, pytest.mark.slow]

OUTAGE_S = 60.0


async def test_pacs_and_xnat_down_for_a_minute_then_results_are_published_once(
        bus: EventBus, reference: dict, orthanc: Orthanc, standin: XnatStandIn,
        study_result: StudyResult, tmp_path: Path) -> None:
    """Both peers down for the same minute: the worker's C-STORE to Orthanc retries as
    its pipeline file says (twice, quickly), then the PACS redelivery consumer retries
    from the log; the XNAT publisher (a durable consumer) likewise. Both back off from
    1 s doubling to 8 s (LASTMILE_XNAT_BACKOFF_S=1, LASTMILE_XNAT_MAX_BACKOFF_S=8)."""
    t0 = time.perf_counter()
    base = with_pacs(reference["hfd"], tmp_path, orthanc)
    data = yaml.safe_load(base.path.read_text())
    # the worker's own quick retries run out long before the minute is over
    data["publishers"][1].update(retries=2, retry_delay_s=0.5)
    base.path.write_text(yaml.safe_dump(data, sort_keys=False))
    hfd = load_pipeline(base.path)
    await bus.publish(deployed_event(hfd, actor="drill", stage=Stage.VALIDATION))
    # the worker as `lastmile up` runs it: default ack wait and heartbeat
    config_ = WorkerConfig(instances_dir=tmp_path / "instances",
                           results_dir=tmp_path / "results", secret=SECRET, worker_id="w")
    study = pelvis_study(4801, images=2, size=256)
    orthanc.stop()
    standin.stop()
    down_at = time.perf_counter()
    xnat = XnatPublisher(config(standin, study_result, backoff_s=1.0, max_backoff_s=8.0,
                                tries_per_delivery=3, max_deliveries=20))
    redelivery = PacsRedelivery(RedeliveryConfig(results_dir=config_.results_dir,
                                                 backoff_s=1.0, max_backoff_s=8.0))
    stop = asyncio.Event()
    redelivering = asyncio.create_task(redelivery.run(bus, stop))
    async with RunningWorker(bus, EngineWorker({"hfd": hfd}, config_)), \
            running(bus, xnat, max_deliveries=20):
        await feed_study(bus, study.datasets, config_.instances_dir, SECRET, pipeline="hfd",
                         called_ae="LM_HFD")
        await bus.publish_many(study_result.events())
        await asyncio.sleep(OUTAGE_S - (time.perf_counter() - down_at))
        early = [e for _, e in await bus.history(study.study_uid)]
        assert not any(isinstance(e, ResultPublished) and e.destination == "pacs:ORTHANC"
                       for e in early)
        xnat_early = [e for _, e in await bus.history(study_result.study_uid)]
        assert not any(isinstance(e, ResultPublished) for e in xnat_early)
        await asyncio.to_thread(orthanc.start)  # same ports, same storage
        standin.start()  # same port
        up_at = time.perf_counter()

        async def since_up(waiting: Awaitable[object]) -> float:
            await waiting
            return time.perf_counter() - up_at

        published_after_s, xnat_after_s = await asyncio.gather(
            since_up(wait_for(bus, study.study_uid, lambda e: any(
                isinstance(x, ResultPublished) and x.destination == "pacs:ORTHANC"
                for x in e), 120)),
            since_up(wait_for_xnat(bus, study_result.study_uid, published, 60)))
        await asyncio.sleep(1.0)
        evs = [e for _, e in await bus.history(study.study_uid)]
        xnat_evs = [e for _, e in await bus.history(study_result.study_uid)]
    stop.set()
    await redelivering
    in_pacs = [e for e in evs if isinstance(e, ResultPublished)
               and e.destination == "pacs:ORTHANC"]
    assert Counter(e.kind for e in in_pacs) == {"SR": 1}
    assert in_pacs[0].actor == "pacs-redelivery" and in_pacs[0].attempt > 3  # from the log
    pacs_failures = [e for e in evs if isinstance(e, PublishFailed)]
    assert pacs_failures and all(e.will_retry for e in pacs_failures)
    assert sum(isinstance(e, InferenceCompleted) for e in evs) == 1
    assert not [e for e in evs if e.type_name() == "system.delivery.failed"]
    assert len(orthanc.get("/instances")) == 1  # type: ignore[arg-type]
    record("PACS (Orthanc) down for a minute",
           done=f"Orthanc stopped; an HFD study run; Orthanc restarted after {OUTAGE_S:.0f} s; "
                "the worker's 2 quick retries failed, the PACS redelivery consumer retried "
                "from the log (backoff 1 s doubling to 8 s)",
           items=1, acknowledged=1, lost=0, duration_s=time.perf_counter() - t0,
           outage_s=round(up_at - down_at, 1), published_attempt=in_pacs[0].attempt,
           failures_before=len(pacs_failures),
           back_to_published_s=round(published_after_s, 1))
    to_xnat = [e for e in xnat_evs if isinstance(e, ResultPublished)]
    assert len(to_xnat) == 2 and len({e.kind for e in to_xnat}) == 2  # once per kind
    assert not of_type(xnat_evs, "system.delivery.failed")
    failures = of_type(xnat_evs, "engine.result.publish_failed")
    assert failures and all("unreachable" in e.error for e in failures)  # type: ignore[attr-defined]
    record("XNAT stand-in down for a minute",
           done=f"XNAT stand-in stopped for the same {OUTAGE_S:.0f} s; the XNAT publisher "
                "retried with backoff 1 s doubling to 8 s, then published",
           items=1, acknowledged=1, lost=0, duration_s=time.perf_counter() - t0,
           outage_s=round(up_at - down_at, 1), failures_before=len(failures),
           published=len(to_xnat), back_to_published_s=round(xnat_after_s, 1))


# moved from tests/xnat/test_publisher.py
async def test_server_down_then_back_loses_nothing(bus: EventBus, standin: XnatStandIn,
                                                   study_result: StudyResult) -> None:
    t0 = time.perf_counter()
    standin.stop()
    await bus.publish_many(study_result.events())
    async with running(bus, XnatPublisher(config(standin, study_result))):
        events = await wait_for_xnat(
            bus, study_result.study_uid,
            lambda evs: len(of_type(evs, "engine.result.publish_failed")) >= 2)
        assert all("unreachable" in e.error for e in of_type(
            events, "engine.result.publish_failed"))
        down_s = time.perf_counter() - t0
        standin.start()  # same port, back up
        events = await wait_for_xnat(bus, study_result.study_uid, published)
    record("XNAT stand-in down (brief)",
           done="XNAT stand-in stopped until the publisher had failed twice (backoff "
                "0.05-0.2 s), then started on the same port",
           items=1, acknowledged=1, lost=0, duration_s=time.perf_counter() - t0,
           outage_s=round(down_s, 1),
           failures_before=len(of_type(events, "engine.result.publish_failed")),
           published=len(of_type(events, "engine.result.published")))
