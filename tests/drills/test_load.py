"""Drill: load. 50 studies sent by 4 concurrent dcmtk senders to the HFD AE title.

Everything runs as at a site: nats-server (fsync always, the embedded default),
`lastmile up` running ingest and one engine worker in its own process, a real Orthanc as
the PACS the results go to, and four storescu "modalities" each sending its studies one
association per study. Every study must complete with one InferenceCompleted and its
SR in Orthanc; the drill reports throughput and turnaround (last instance stored ->
result published in the PACS), both read from the event log's own timestamps.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest

from demo.phantoms import PhantomStudy, pelvis_study
from engine.registry import deployed_event
from events.base import Event
from events.catalogue import (
    InferenceCompleted,
    InstanceStored,
    ResultPublished,
    Stage,
    StudyCompleted,
)
from events.jetstream import BusSettings, EventBus
from events.nats_server import EmbeddedNats, free_port
from events.subjects import type_filter
from tests.drills.procs import Sent, clean_env, lastmile_up, percentile, storescu
from tests.drills.report import record
from tests.engine.conftest import Orthanc
from tests.engine.test_worker_pipelines import with_pacs

pytestmark = [
    pytest.mark.server, pytest.mark.slow,
    pytest.mark.skipif(shutil.which("storescu") is None, reason="Debian dcmtk not installed"),
]

STUDIES, SENDERS = 50, 4


async def _count(bus: EventBus, type_name: str) -> int:
    return len([1 async for _ in bus.read(filter_subject=type_filter(type_name))])


async def _sender(port: int, studies: list[tuple[PhantomStudy, list[Path]]], name: str
                  ) -> list[Sent]:
    """One modality: its studies one after the other, one association each."""
    out = []
    for _, files in studies:
        sent = await storescu(port, "LM_HFD", files, calling=name)
        assert sent.returncode == 0, sent.output[-2000:]
        out.append(sent)
    return out


def _at(value: datetime) -> float:
    return value.timestamp()


async def test_fifty_studies_from_four_senders_all_complete(
        tmp_path: Path, reference: dict, orthanc: Orthanc) -> None:
    t0 = time.perf_counter()
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    hfd = with_pacs(reference["hfd"], pipelines, orthanc)  # writes pipelines/hfd.yaml
    studies = [pelvis_study(5000 + i, images=2, size=512) for i in range(STUDIES)]
    written = [(s, s.write(tmp_path / "send" / str(i))) for i, s in enumerate(studies)]
    sent_bytes = sum(f.stat().st_size for _, files in written for f in files)
    nats_port, dicom_port = free_port(), free_port()
    server = EmbeddedNats(tmp_path / "nats", port=nats_port, sync="always").start()
    env = clean_env(state_dir=str(tmp_path / "state"), nats_url=server.url,
                    dicom_port=str(dicom_port), services='["ingest", "engine"]',
                    pipelines_dir=str(pipelines), dicom_min_free_mb="0")
    bus = await EventBus.connect(BusSettings(servers=(server.url,)))
    try:
        await bus.publish(deployed_event(hfd, actor="drill", stage=Stage.VALIDATION))
        with lastmile_up(env, tmp_path / "up.log", wait_port=dicom_port):
            t_send = time.perf_counter()
            per_sender = await asyncio.wait_for(asyncio.gather(*[
                _sender(dicom_port, written[k::SENDERS], f"MODALITY{k}")
                for k in range(SENDERS)]), 240)
            send_s = time.perf_counter() - t_send
            deadline = time.monotonic() + 180
            while await _count(bus, "engine.inference.completed") < STUDIES:
                assert time.monotonic() < deadline, "not every study completed in 180 s"
                await asyncio.sleep(0.5)
            await asyncio.sleep(1.0)  # a late duplicate would show up now
            events = [ev async for _, ev, _ in bus.read() if isinstance(ev, Event)]
    finally:
        await bus.close()
        server.stop()

    acked = sum(len(s.succeeded) for sents in per_sender for s in sents)
    instances = sum(len(files) for _, files in written)
    assert acked == instances
    completed = Counter(e.study_uid for e in events if isinstance(e, InferenceCompleted))
    assert set(completed) == {s.study_uid for s in studies}
    assert set(completed.values()) == {1}
    in_pacs = [e for e in events
               if isinstance(e, ResultPublished) and e.destination == "pacs:ORTHANC"]
    assert Counter(e.study_uid for e in in_pacs) == Counter(
        {s.study_uid: 1 for s in studies})  # one SR per study, in the PACS
    assert len(orthanc.get("/instances")) == STUDIES  # type: ignore[arg-type]
    stored = [e for e in events if isinstance(e, InstanceStored)]
    assert len(stored) == instances

    last_instance: dict[str, float] = {}
    for e in stored:
        assert e.study_uid is not None
        last_instance[e.study_uid] = max(last_instance.get(e.study_uid, 0.0),
                                         _at(e.recorded_at))
    turnaround = [_at(p.recorded_at) - last_instance[p.study_uid or ""] for p in in_pacs]
    completed_at = {e.study_uid: _at(e.recorded_at) for e in events
                    if isinstance(e, StudyCompleted)}
    completion = [completed_at[u] - t for u, t in last_instance.items()]
    after_completion = [_at(p.recorded_at) - completed_at[p.study_uid] for p in in_pacs]
    first = min(_at(e.recorded_at) for e in stored)
    last = max(_at(p.recorded_at) for p in in_pacs)
    lost = instances - len({e.sop_instance_uid for e in stored})
    record("load: 50 studies, 4 concurrent dcmtk senders",
           done=f"{STUDIES} HFD studies (2 CR images of 512², {sent_bytes / 2**20:.0f} MB) "
                f"sent by {SENDERS} storescu in parallel, one association per study, to "
                "`lastmile up` (ingest + 1 worker); SR to Orthanc",
           items=instances, acknowledged=acked, lost=lost,
           duration_s=time.perf_counter() - t0,
           studies_per_min=round(STUDIES / (last - first) * 60, 1),
           ingest_mb_s=round(sent_bytes / 2**20 / send_s, 1),
           turnaround_p50_s=round(percentile(turnaround, 50), 2),
           turnaround_p90_s=round(percentile(turnaround, 90), 2),
           of_which_completion_p50_s=round(percentile(completion, 50), 2),
           completed_to_published_p50_s=round(percentile(after_completion, 50), 2))
