"""Drill: ``kill -9`` of an engine worker mid-inference.

Two worker processes share the durable consumer, as two GPU hosts would. The pipeline
file deploys a slow copy of the HFD model (``slow_model.py``), so inference takes
seconds; the worker that started the study is killed with SIGKILL while it computes.
JetStream redelivers the study to the other worker once the ack wait passes without a
heartbeat; the run key makes the two attempts one run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from demo.phantoms import pelvis_study
from engine.feed import feed_study
from engine.registry import deployed_event
from events.catalogue import (
    InferenceCompleted,
    InferenceStarted,
    OperatorFinished,
    ResultPublished,
    Stage,
)
from events.jetstream import BusSettings, EventBus
from tests.drills.procs import engine_worker
from tests.drills.report import record
from tests.drills.slow_model import slow_hfd_pipeline
from tests.drills.worker_proc import SECRET
from tests.engine.conftest import Orthanc
from tests.history import wait_for

pytestmark = [pytest.mark.server, pytest.mark.slow]


async def test_kill_9_worker_mid_inference_redelivers_and_publishes_once(
        bus: EventBus, bus_settings: BusSettings, orthanc: Orthanc, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    pacs = {"kind": "pacs", "ae_title": orthanc.ae_title, "host": "127.0.0.1",
            "port": orthanc.dicom_port, "retries": 2, "retry_delay_s": 0.2}
    loaded = slow_hfd_pipeline(tmp_path / "pipelines", rounds=60,
                               publishers=[{"kind": "store"}, pacs])
    await bus.publish(deployed_event(loaded, actor="drill", stage=Stage.VALIDATION))
    state = tmp_path / "state"  # shared by both workers, as a shared store would be
    url, stream = bus_settings.servers[0], bus_settings.stream
    study = pelvis_study(4701, images=2, size=256)
    with engine_worker(url, stream, loaded.path, state, "w1", tmp_path / "w1.log") as w1, \
            engine_worker(url, stream, loaded.path, state, "w2", tmp_path / "w2.log") as w2:
        procs = {"w1": w1, "w2": w2}
        await feed_study(bus, study.datasets, state / "instances", SECRET, pipeline="hfd",
                         called_ae="LM_HFD")
        evs = await wait_for(bus, study.study_uid,
                             lambda e: any(isinstance(x, InferenceStarted) for x in e), 60)
        victim = next(e for e in evs if isinstance(e, InferenceStarted)).worker_id
        await asyncio.sleep(0.5)  # reading and model loading done: computing now
        os.kill(procs[victim].pid, signal.SIGKILL)
        killed_at = time.perf_counter()
        procs[victim].wait(5)
        assert procs[victim].returncode == -signal.SIGKILL
        now = [e for _, e in await bus.history(study.study_uid)]
        assert not any(isinstance(e, InferenceCompleted | OperatorFinished) for e in now), \
            "the worker finished before it was killed: make the model slower"
        survivor = next(w for w in procs if w != victim)
        evs = await wait_for(bus, study.study_uid,
                             lambda e: any(isinstance(x, InferenceCompleted) for x in e), 120)
        redelivered_s = time.perf_counter() - killed_at
        await asyncio.sleep(1.0)  # anything late (a second result) would show up now
        evs = [e for _, e in await bus.history(study.study_uid)]

    started = [e for e in evs if isinstance(e, InferenceStarted)]
    assert [(s.attempt, s.worker_id) for s in started] == [(1, victim), (2, survivor)]
    (done,) = [e for e in evs if isinstance(e, InferenceCompleted)]
    assert done.actor == f"worker:{survivor}"
    assert len(done.findings) == 4  # the real model's findings: two hips per image
    published = Counter((e.destination, e.kind) for e in evs if isinstance(e, ResultPublished))
    assert published == {("store", "SR"): 1, ("pacs:ORTHANC", "SR"): 1}
    assert len(orthanc.get("/instances")) == 1  # type: ignore[arg-type]
    results = [p for p in (state / "results").rglob("*") if p.is_file()]
    assert sorted(p.relative_to(state / "results").as_posix() for p in results) == \
        sorted(done.result_keys)  # nothing half-written by the killed worker
    record("kill -9 engine worker mid-inference",
           done="2 worker processes on one durable consumer; the one computing a slow HFD "
                "model was killed with SIGKILL; ack wait 3 s; SR to store and Orthanc",
           items=1, acknowledged=1, lost=0, duration_s=time.perf_counter() - t0,
           inference_completed=1, results_published=sum(published.values()),
           kill_to_completed_s=round(redelivered_s, 2), inference_s=done.inference_s)
