"""End to end: the real engine worker runs the HFD reference pipeline on a synthetic pelvis
exam, and the XNAT publisher takes its result to the XNAT STAND-IN (real client)."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demo.phantoms import abdomen_ct_study, pelvis_study
from engine.feed import feed_study
from engine.registry import deployed_event
from engine.spec import REFERENCE_DIR, load_pipeline
from engine.worker import EngineWorker, WorkerConfig
from engine.xnat_publisher import (
    PublisherConfig,
    XnatPublisher,
    session_label,
)
from events.catalogue import InferenceCompleted, ResultPublished, Stage
from events.jetstream import EventBus
from events.subjects import type_filter
from tests.xnat.conftest import PASSWORD, USER, of_type, wait_for
from tests.xnat.standin import XnatStandIn
from xnat_client.session import XnatAccess

pytestmark = [pytest.mark.server, pytest.mark.slow]
SECRET = b"xnat-e2e-secret-0123456789abcdef"


async def test_hfd_result_reaches_xnat_with_findings_and_boxes(
        bus: EventBus, standin: XnatStandIn, tmp_path: Path) -> None:
    hfd = load_pipeline(REFERENCE_DIR / "hfd.yaml")
    config = WorkerConfig(instances_dir=tmp_path / "instances", results_dir=tmp_path / "results",
                          secret=SECRET, worker_id="xnat-e2e", max_attempts=2, ack_wait_s=30.0,
                          heartbeat_s=1.0)
    await bus.publish(deployed_event(hfd, actor="test", stage=Stage.VALIDATION))
    study = pelvis_study(7, images=2, size=512)
    publisher = XnatPublisher(PublisherConfig(
        target=XnatAccess(url=standin.url, project="HFD", user=USER, password=PASSWORD,
                          timeout_s=10.0),
        results_dir=config.results_dir, instances_dir=config.instances_dir, backoff_s=0.05))
    stop = asyncio.Event()
    publisher.bind(bus, stop)
    worker = EngineWorker({"hfd": hfd}, config)
    tasks = [asyncio.create_task(worker.run(bus, stop)),
             asyncio.create_task(bus.consume(
                 "xnat-publisher", publisher.handle, max_attempts=3, stop=stop,
                 filter_subjects=[type_filter("engine.inference.completed")],
                 idle_timeout_s=0.2))]
    try:
        await feed_study(bus, study.datasets, config.instances_dir, SECRET, pipeline="hfd",
                         called_ae="LM_HFD")
        events = await wait_for(
            bus, study.study_uid,
            lambda evs: any(isinstance(e, ResultPublished) and e.destination.startswith("xnat:")
                            for e in evs), timeout_s=120.0)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        await asyncio.to_thread(publisher.connection.close)

    done = next(e for e in events if isinstance(e, InferenceCompleted))
    assert done.findings and done.result_keys
    session = standin.session_by_label("HFD", session_label(study.study_uid))
    assert session is not None
    assert session.xsi_type in ("xnat:crSessionData", "xnat:dxSessionData")
    subject = standin.subjects[session.subject_id or ""]
    assert subject.label == done.patient_pseudonym
    for f in done.findings:
        assert session.fields[f"lm_finding_{f.label}"] == f.classification
    files = session.resources["LM_RESULTS"].files
    assert sorted(files) == sorted(Path(k).name for k in done.result_keys)
    for k in done.result_keys:
        assert files[Path(k).name].data == (config.results_dir / k).read_bytes()
    xnat_kinds = {e.kind for e in of_type(events, "engine.result.published")
                  if e.destination.startswith("xnat:")}  # type: ignore[attr-defined]
    assert "PNG" in xnat_kinds
    png = Image.open(io.BytesIO(session.resources["LM_PREVIEW"].files["preview.png"].data))
    pixels = np.asarray(png.convert("RGB")).astype(int)
    coloured = (np.abs(pixels[..., 0] - pixels[..., 1]) > 100).sum()
    assert coloured > 0  # the boxes are drawn over the radiograph


async def test_lts_seg_reaches_xnat_and_the_ohif_roi_collection(
        bus: EventBus, standin: XnatStandIn, tmp_path: Path) -> None:
    lts = load_pipeline(REFERENCE_DIR / "lts.yaml")
    config = WorkerConfig(instances_dir=tmp_path / "instances", results_dir=tmp_path / "results",
                          secret=SECRET, worker_id="xnat-e2e", max_attempts=2, ack_wait_s=60.0,
                          heartbeat_s=1.0)
    await bus.publish(deployed_event(lts, actor="test", stage=Stage.VALIDATION))
    study = abdomen_ct_study(11)
    publisher = XnatPublisher(PublisherConfig(
        target=XnatAccess(url=standin.url, project="LTS", user=USER, password=PASSWORD,
                          timeout_s=10.0),
        results_dir=config.results_dir, instances_dir=config.instances_dir, backoff_s=0.05))
    stop = asyncio.Event()
    publisher.bind(bus, stop)
    tasks = [asyncio.create_task(EngineWorker({"lts": lts}, config).run(bus, stop)),
             asyncio.create_task(bus.consume(
                 "xnat-publisher", publisher.handle, max_attempts=3, stop=stop,
                 filter_subjects=[type_filter("engine.inference.completed")],
                 idle_timeout_s=0.2))]
    try:
        await feed_study(bus, study.datasets, config.instances_dir, SECRET, pipeline="lts",
                         called_ae="LM_LTS")
        events = await wait_for(
            bus, study.study_uid,
            lambda evs: any(isinstance(e, ResultPublished) and e.destination.startswith("xnat:")
                            for e in evs), timeout_s=240.0)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        await asyncio.to_thread(publisher.connection.close)

    done = next(e for e in events if isinstance(e, InferenceCompleted))
    session = standin.session_by_label("LTS", session_label(study.study_uid))
    assert session is not None and session.xsi_type == "xnat:ctSessionData"
    volumes = {m.label: m for m in done.measurements if m.unit == "mL"}
    assert volumes
    for label, m in volumes.items():
        assert float(session.fields[f"lm_{m.name}_{label}_ml"]) == pytest.approx(m.value,
                                                                                   rel=1e-5)
    assert session.fields["lm_blinding_hash"] == done.blinding_hash
    seg_key = next(k for k in done.result_keys if "/seg-" in k)
    roi = standin.roi[("LTS", session.id)]
    assert [c.data for c in roi.values()] == [(config.results_dir / seg_key).read_bytes()]
    png = Image.open(io.BytesIO(session.resources["LM_PREVIEW"].files["preview.png"].data))
    pixels = np.asarray(png.convert("RGB")).astype(int)
    assert (pixels[..., 0] > pixels[..., 1] + 60).sum() > 0  # the mask, in red
    assert pixels[..., 1].std() > 5  # over the CT slice it was drawn on
