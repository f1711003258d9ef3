"""A superseded result leaves its XNAT case (the real ``xnat`` client against the XNAT
STAND-IN, the trigger through the real log): its SEG leaves the results resource, the
session lists what was replaced, and a superseded result arriving late is not published."""

from __future__ import annotations

import asyncio

import pytest

from engine.xnat_publisher import FIELD_SUPERSEDED, XnatPublisher, session_label
from events.catalogue import InferenceCompleted, ResultSuperseded, ResultWithdrawn
from events.jetstream import EventBus
from events.subjects import type_filter
from tests.xnat.conftest import StudyResult, build_seg, wait_for
from tests.xnat.standin import XnatStandIn
from tests.xnat.test_publisher import PROJECT, config, published

pytestmark = pytest.mark.server  # a real nats-server


def _rerun(result: StudyResult) -> InferenceCompleted:
    """A second result of the same study (another SEG under another run key)."""
    run_key = "f" * 32
    seg = build_seg(result.source, (10, 10, 30, 30))
    folder = result.results_dir / run_key
    folder.mkdir(parents=True)
    path = folder / f"seg-{seg.SOPInstanceUID}.dcm"
    seg.save_as(path, enforce_file_format=True)
    return result.stored.caused(
        InferenceCompleted, actor="worker:test", pipeline="lts", run_key=run_key,
        model_name="lts-unet", model_version="0.3.1", runtime="onnxruntime-cpu",
        runtime_reason="no GPU", duration_s=1.0, inference_s=0.5,
        patient_pseudonym=result.completed.patient_pseudonym,
        result_keys=(f"{run_key}/{path.name}",))


async def _consume(bus: EventBus, publisher: XnatPublisher, until: int) -> None:
    stop = asyncio.Event()
    publisher.bind(bus, stop)
    task = asyncio.create_task(bus.consume(
        "xnat-publisher", publisher.handle,
        filter_subjects=[type_filter("engine.inference.completed"),
                         type_filter("engine.result.superseded")],
        max_attempts=5, ack_wait_s=10.0, stop=stop, idle_timeout_s=0.2))
    for _ in range(200):
        if len(publisher.outcomes) >= until:
            break
        await asyncio.sleep(0.1)
    stop.set()
    await asyncio.wait_for(task, 15)
    await asyncio.to_thread(publisher.connection.close)


async def test_a_superseded_result_leaves_the_case_and_the_current_one_stays(
        bus: EventBus, standin: XnatStandIn, study_result: StudyResult) -> None:
    old = study_result.completed
    await bus.publish_many(study_result.events())
    await _consume(bus, XnatPublisher(config(standin, study_result)), 1)
    await wait_for(bus, study_result.study_uid, published)
    new = _rerun(study_result)
    await bus.publish(new)
    await bus.publish(new.caused(ResultSuperseded, actor="worker:test", run_key=old.run_key,
                                 superseded_by=new.run_key, reason="re-run"))
    publisher = XnatPublisher(config(standin, study_result))
    await _consume(bus, publisher, 2)
    assert sorted(o.status for o in publisher.outcomes) == ["published", "withdrawn"]
    session = standin.session_by_label(PROJECT, session_label(study_result.study_uid))
    assert session is not None
    files = set(session.resources["LM_RESULTS"].files)
    assert study_result.seg_path.name not in files  # the superseded SEG is gone
    assert any(name.startswith("seg-") for name in files)  # the current one is there
    assert session.fields[FIELD_SUPERSEDED] == old.run_key
    assert session.fields["lm_run_key"] == new.run_key
    assert session.fields["lm_worklist"] == "pending"
    history = [e for _, e in await bus.history(study_result.study_uid)]
    (withdrawn,) = [e for e in history if isinstance(e, ResultWithdrawn)]
    assert withdrawn.run_key == old.run_key and withdrawn.destination.startswith("xnat:")


async def test_a_result_superseded_before_it_reached_xnat_is_not_published(
        bus: EventBus, standin: XnatStandIn, study_result: StudyResult) -> None:
    old = study_result.completed
    await bus.publish_many(study_result.events())
    await bus.publish(old.caused(ResultSuperseded, actor="worker:test", run_key=old.run_key,
                                 superseded_by="f" * 32, reason="re-run"))
    publisher = XnatPublisher(config(standin, study_result))
    await _consume(bus, publisher, 2)
    assert sorted(o.status for o in publisher.outcomes) == ["duplicate", "superseded"]
    assert standin.session_by_label(PROJECT, session_label(study_result.study_uid)) is None
