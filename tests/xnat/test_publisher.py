"""The XNAT publisher, through the real ``xnat`` client against the XNAT STAND-IN.

The trigger goes through the real event log (nats-server) and the real durable consumer,
as in `lastmile up`; the stand-in's fault injection drives the error paths. The
stand-in-down drills live in tests/drills/test_peers_down.py.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.xnat_publisher import (
    PublisherConfig,
    StudyFacts,
    XnatPublisher,
    XnatPublishError,
    plan_publication,
    render_preview,
    result_fields,
    session_label,
    study_facts,
)
from events.catalogue import DeliveryFailed, PublishFailed, ResultPublished
from events.jetstream import EventBus
from events.subjects import type_filter
from tests.xnat.conftest import PASSWORD, PSEUDONYM, USER, StudyResult, of_type, wait_for
from tests.xnat.standin import XnatStandIn
from xnat_client.session import XnatAccess

PROJECT = "LMTEST"


def config(standin: XnatStandIn, result: StudyResult, **kw: object) -> PublisherConfig:
    target = XnatAccess(url=standin.url, project=PROJECT, user=USER, password=PASSWORD,
                        timeout_s=float(kw.pop("timeout_s", 5.0)))  # type: ignore[arg-type]
    defaults: dict[str, object] = {"backoff_s": 0.05, "max_backoff_s": 0.2, "heartbeat_s": 0.5,
                                   "tries_per_delivery": 2, "max_deliveries": 10}
    defaults.update(kw)
    return PublisherConfig(target=target, results_dir=result.results_dir,
                           instances_dir=result.instances_dir, **defaults)  # type: ignore[arg-type]


@asynccontextmanager
async def running(bus: EventBus, publisher: XnatPublisher,
                  max_deliveries: int = 10, durable: str = "xnat-publisher"
                  ) -> AsyncIterator[XnatPublisher]:
    stop = asyncio.Event()
    publisher.bind(bus, stop)
    task = asyncio.create_task(bus.consume(
        durable, publisher.handle,
        filter_subjects=[type_filter("engine.inference.completed")],
        max_attempts=max_deliveries, ack_wait_s=10.0, stop=stop, idle_timeout_s=0.2))
    try:
        yield publisher
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await asyncio.to_thread(publisher.connection.close)


def published(events: list[object], n: int = 2) -> bool:
    return len([e for e in events if isinstance(e, ResultPublished)]) >= n


# --------------------------------------------------------------------------- pure plan


def test_plan_names_subject_by_pseudonym_and_fields_carry_the_result(
        study_result: StudyResult) -> None:
    facts = StudyFacts(None, "CT", "20040119", {})
    plan = plan_publication(study_result.completed, facts, study_result.results_dir, b"png",
                            "2026-11-22T05:00:00+00:00")
    assert plan.subject_label == PSEUDONYM
    assert plan.session_label == session_label(study_result.study_uid)
    assert plan.session_label.startswith("LM_") and len(plan.session_label) == 19
    assert plan.session_type == "xnat:ctSessionData"
    assert plan.session_date == "2004-01-19"
    assert [(f.kind, f.resource) for f in plan.files] == [("SEG", "LM_RESULTS"),
                                                           ("PNG", "LM_PREVIEW")]
    assert plan.files[0].sop_instance_uid in study_result.seg_path.name
    assert plan.roi_label is not None and plan.roi_label.startswith("LM_lts_")
    assert plan.fields["lm_volume_lesion_ml"] == "123.457"
    assert plan.fields["lm_pipeline"] == "lts"
    assert plan.fields["lm_model_version"] == "0.3.1"
    assert plan.fields["lm_worklist"] == "pending"
    assert plan.fields["lm_flags"] == "none"


def test_flags_list_abnormal_findings_and_progression(study_result: StudyResult) -> None:
    from events.catalogue import Finding

    ev = study_result.completed
    ev2 = type(ev)(**{**{f: getattr(ev, f) for f in ev.__struct_fields__},
                      "findings": (Finding(label="left_hip", classification="fracture",
                                           probability=0.91),
                                   Finding(label="right_hip", classification="normal")),
                      "progression": True})
    fields = result_fields(ev2, "t")
    assert fields["lm_flags"] == "left_hip:fracture,progression"
    assert fields["lm_finding_right_hip"] == "normal"
    assert fields["lm_prob_left_hip"] == "0.91"
    assert fields["lm_progression"] == "true"


def test_a_result_without_pseudonym_or_with_a_missing_file_is_refused_for_good(
        study_result: StudyResult, tmp_path: Path) -> None:
    ev = study_result.completed
    no_pseudonym = type(ev)(**{**{f: getattr(ev, f) for f in ev.__struct_fields__},
                               "patient_pseudonym": None})
    with pytest.raises(XnatPublishError, match="no patient pseudonym") as info:
        plan_publication(no_pseudonym, StudyFacts(None, "CT", None, {}),
                         study_result.results_dir, None, "t")
    assert not info.value.retryable
    with pytest.raises(XnatPublishError, match="missing") as info:
        plan_publication(ev, StudyFacts(None, "CT", None, {}), tmp_path / "elsewhere", None, "t")
    assert not info.value.retryable


# --------------------------------------------------------------------------- through the log


@pytest.mark.server  # a real nats-server
async def test_result_is_published_to_xnat_once(bus: EventBus, standin: XnatStandIn,
                                               study_result: StudyResult) -> None:
    await bus.publish_many(study_result.events())
    publisher = XnatPublisher(config(standin, study_result))
    async with running(bus, publisher):
        events = await wait_for(bus, study_result.study_uid, published)

    kinds = sorted(e.kind for e in of_type(events, "engine.result.published"))
    assert kinds == ["PNG", "SEG"]
    assert all(e.destination == f"xnat:{standin.url}" for e in of_type(
        events, "engine.result.published"))
    # the stand-in now holds the case, made through the real client
    assert PROJECT in standin.projects
    subject = next(iter(standin.subjects.values()))
    assert subject.label == PSEUDONYM and subject.project == PROJECT
    session = standin.session_by_label(PROJECT, session_label(study_result.study_uid))
    assert session is not None and session.xsi_type == "xnat:ctSessionData"
    assert session.subject_id == subject.id
    assert session.data.get("UID") == study_result.study_uid
    assert session.fields["lm_run_key"] == study_result.completed.run_key
    assert session.fields["lm_study_uid"] == study_result.study_uid
    assert session.fields["lm_volume_lesion_ml"] == "123.457"
    assert session.fields["lm_worklist"] == "pending"
    seg_bytes = study_result.seg_path.read_bytes()
    assert session.resources["LM_RESULTS"].files[study_result.seg_path.name].data == seg_bytes
    roi = standin.roi[(PROJECT, session.id)]
    assert [(c.type, c.data == seg_bytes) for c in roi.values()] == [("SEG", True)]
    png = Image.open(io.BytesIO(session.resources["LM_PREVIEW"].files["preview.png"].data))
    pixels = np.asarray(png.convert("RGB")).astype(int)
    red = (pixels[..., 0] > pixels[..., 1] + 60).sum()
    assert 0 < red < pixels.shape[0] * pixels.shape[1] // 4  # the mask, over the CT
    assert pixels[..., 0].std() > 10  # the CT is there, not a blank background

    # the same trigger again (a replay of the log by a new consumer): nothing new
    uploads = standin.count("PUT", r"/files/")
    second = XnatPublisher(config(standin, study_result))
    async with running(bus, second, durable="xnat-publisher-replay") as p:
        for _ in range(50):
            if p.outcomes:
                break
            await asyncio.sleep(0.1)
    assert [o.status for o in second.outcomes] == ["duplicate"]
    assert standin.count("PUT", r"/files/") == uploads
    events = [e for _, e in await bus.history(study_result.study_uid)]
    assert len(of_type(events, "engine.result.published")) == 2


@pytest.mark.server  # a real nats-server
async def test_500_on_upload_is_retried_and_says_why(bus: EventBus, standin: XnatStandIn,
                                                     study_result: StudyResult) -> None:
    standin.fail_uploads = 3  # three tries fail, over two deliveries (2 tries each)
    await bus.publish_many(study_result.events())
    async with running(bus, XnatPublisher(config(standin, study_result))):
        events = await wait_for(bus, study_result.study_uid, published)
    failures = [e for e in events if isinstance(e, PublishFailed)]
    assert [f.attempt for f in failures] == [1, 2, 3]
    assert all("HTTP 500" in f.error and f.will_retry for f in failures)
    ok = [e for e in events if isinstance(e, ResultPublished)]
    assert {e.attempt for e in ok} == {4}
    session = standin.session_by_label(PROJECT, session_label(study_result.study_uid))
    assert session is not None
    assert list(session.resources["LM_RESULTS"].files) == [study_result.seg_path.name]


@pytest.mark.server  # a real nats-server
async def test_bad_credentials_401_then_fixed(bus: EventBus, standin: XnatStandIn,
                                             study_result: StudyResult) -> None:
    standin.users[USER] = "rotated-password"
    await bus.publish_many(study_result.events())
    async with running(bus, XnatPublisher(config(standin, study_result))):
        events = await wait_for(bus, study_result.study_uid,
                                lambda evs: len(of_type(evs, "engine.result.publish_failed")) >= 2)
        failure = of_type(events, "engine.result.publish_failed")[0]
        assert isinstance(failure, PublishFailed)
        assert "refused the credentials" in failure.error and "401" in failure.error
        assert PASSWORD not in failure.error and "rotated" not in failure.error
        standin.users[USER] = PASSWORD  # the operator fixes it: the retry goes through
        events = await wait_for(bus, study_result.study_uid, published)
    assert standin.session_by_label(PROJECT, session_label(study_result.study_uid)) is not None


@pytest.mark.server  # a real nats-server
async def test_a_server_that_hangs_times_out_then_recovers(bus: EventBus, standin: XnatStandIn,
                                                          study_result: StudyResult) -> None:
    standin.hang.set()
    await bus.publish_many(study_result.events())
    async with running(bus, XnatPublisher(config(standin, study_result, timeout_s=0.5))):
        events = await wait_for(bus, study_result.study_uid,
                                lambda evs: len(of_type(evs, "engine.result.publish_failed")) >= 1)
        failure = of_type(events, "engine.result.publish_failed")[0]
        assert isinstance(failure, PublishFailed)
        assert "did not answer within 0.5s" in failure.error and failure.will_retry
        standin.hang.clear()
        await wait_for(bus, study_result.study_uid, published)


@pytest.mark.server  # a real nats-server
async def test_exhausted_retries_dead_letter_with_the_reason(
        bus: EventBus, standin: XnatStandIn, study_result: StudyResult) -> None:
    standin.stop()
    await bus.publish_many(study_result.events())
    publisher = XnatPublisher(config(standin, study_result, max_deliveries=2))
    async with running(bus, publisher, max_deliveries=2):
        events = await wait_for(bus, study_result.study_uid,
                                lambda evs: bool(of_type(evs, "system.delivery.failed")))
    failures = [e for e in events if isinstance(e, PublishFailed)]
    assert [f.will_retry for f in failures] == [True, True, True, False]
    dead = next(e for e in events if isinstance(e, DeliveryFailed))
    assert dead.original_event_id == study_result.completed.event_id
    assert "unreachable" in dead.reason


def test_preview_of_a_detection_draws_the_boxes(study_result: StudyResult) -> None:
    from events.catalogue import Finding

    uid = str(study_result.source.SOPInstanceUID)
    facts = study_facts([study_result.stored], study_result.instances_dir)
    png = render_preview(None, [Finding(label="left_hip", classification="fracture",
                                        box=(10.0, 10.0, 50.0, 40.0), sop_instance_uid=uid)],
                         facts.instances)
    assert png is not None
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 100)
    k = pixels.shape[1] // study_result.source.Columns  # small images are scaled up
    assert k >= 2 and pixels.shape[1] >= 256

    def at(row: int, col: int) -> bool:
        return bool(red[row * k, col * k])

    assert at(32, 10) and at(32, 50) and at(10, 30) and at(40, 30)  # the box's edges
    assert not at(32, 30) and not red[60 * k:, :].any()  # inside and below it: the image
    # nothing to draw: no SEG, no boxes, or the image is not in the store
    assert render_preview(None, [Finding(label="x", classification="normal")], {}) is None
    assert render_preview(None, [Finding(label="left_hip", classification="fracture",
                                         box=(1.0, 1.0, 2.0, 2.0),
                                         sop_instance_uid="1.2.3")], facts.instances) is None


def test_backoff_doubles_per_attempt_up_to_the_cap(standin: XnatStandIn,
                                                   study_result: StudyResult) -> None:
    publisher = XnatPublisher(config(standin, study_result, backoff_s=2.0, max_backoff_s=30.0))
    assert [publisher.delay(n) for n in range(1, 7)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
