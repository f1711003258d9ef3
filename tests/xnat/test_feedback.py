"""Feedback from XNAT: a clinician's review and corrected SEG, made through the real
``xnat`` client on the XNAT STAND-IN, become events exactly once."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pydicom
import pytest
import xnat
from pydicom.data import get_testdata_file

import engine.xnat_publisher as publisher_module
import ingest.xnat_feedback as feedback_module
from engine.xnat_publisher import (
    XnatConnection,
    plan_publication,
    publish_plan,
    study_facts,
)
from events.catalogue import EditSubmitted, ReviewSubmitted
from events.instance_store import InstanceStore
from events.jetstream import EventBus
from ingest.xnat_feedback import FormError, XnatFeedbackPoller, parse_review
from tests.xnat.conftest import PASSWORD, USER, StudyResult, build_seg
from tests.xnat.standin import XnatStandIn
from xnat_client.session import XnatAccess

PROJECT = "LMTEST"

FORM = {
    "lm_review_reader": "dr_reader",
    "lm_review_submitted_at": "2026-11-22T05:30:00Z",
    "lm_review_agree_lesion": "no",
    "lm_review_read_lesion": "residual tumour",
    "lm_review_confidence": "4",
    "lm_review_comment": "margin missed posteriorly",
    "lm_review_seconds": "95.5",
}


# --------------------------------------------------------------------------- the form contract


def test_a_complete_form_parses() -> None:
    form = parse_review(FORM)
    assert form is not None
    assert form.reader == "dr_reader" and form.agree == {"lesion": False}
    assert form.reads == {"lesion": "residual tumour"} and form.confidence == 4
    assert form.seconds_on_case == 95.5


def test_an_unsubmitted_form_is_not_a_review() -> None:
    assert parse_review({k: v for k, v in FORM.items() if k != "lm_review_submitted_at"}) is None


@pytest.mark.parametrize(("change", "message"), [
    ({"lm_review_reader": ""}, "lm_review_reader is missing"),
    ({"lm_review_confidence": "7"}, "not 1..5"),
    ({"lm_review_agree_lesion": "maybe"}, "is not yes/no"),
])
def test_a_submitted_but_broken_form_says_what_is_wrong(change: dict[str, str],
                                                        message: str) -> None:
    with pytest.raises(FormError, match=message):
        parse_review({**FORM, **change})


def test_publisher_and_poller_agree_on_the_session_contract() -> None:
    for name in ("FIELD_STUDY_UID", "FIELD_RUN_KEY", "FIELD_WORKLIST", "SESSION_PREFIX"):
        assert getattr(publisher_module, name) == getattr(feedback_module, name)


# --------------------------------------------------------------------------- through XNAT


def publish_case(standin: XnatStandIn, result: StudyResult) -> str:
    """The publisher's part (tested on its own in test_publisher): the case in XNAT."""
    target = XnatAccess(url=standin.url, project=PROJECT, user=USER, password=PASSWORD)
    facts = study_facts([result.stored], result.instances_dir)
    plan = plan_publication(result.completed, facts, result.results_dir, None, "t")
    connection = XnatConnection(target)
    try:
        return str(connection.call(lambda s: publish_plan(s, target, plan)))
    finally:
        connection.close()


def as_clinician(standin: XnatStandIn) -> Any:
    """A clinician's own client session (the real client, their own account)."""
    return xnat.connect(standin.url, user="dr_reader", password="reader-pw",
                        loglevel="ERROR")


def poller(standin: XnatStandIn, tmp_path: Path) -> XnatFeedbackPoller:
    access = XnatAccess(url=standin.url, project=PROJECT, user=USER, password=PASSWORD,
                        timeout_s=5.0)
    return XnatFeedbackPoller(access, InstanceStore(tmp_path / "instances"), poll_s=0.1)


def edit_bytes(result: StudyResult) -> bytes:
    seg = build_seg(result.source, (22, 18, 46, 44))
    buf = io.BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.server  # a real nats-server
async def test_review_and_edit_in_xnat_become_events_exactly_once(
        bus: EventBus, standin: XnatStandIn, study_result: StudyResult, tmp_path: Path) -> None:
    await bus.publish_many(study_result.events())
    session_id = publish_case(standin, study_result)
    corrected = edit_bytes(study_result)
    with as_clinician(standin) as clinician:
        experiment = clinician.experiments[session_id]
        experiment.mset({f"fields/field[name={k}]/field": v for k, v in FORM.items()})
        edits = experiment.create_resource("LM_EDITS", format="DICOM")
        edits.upload_data(corrected, "dr_reader/corrected.dcm", overwrite=True)

    first = poller(standin, tmp_path)
    outcome = await first.poll_once(bus)
    assert len(outcome.reviews) == 1 and len(outcome.edits) == 1 and not outcome.problems

    history = [e for _, e in await bus.history(study_result.study_uid)]
    review = next(e for e in history if isinstance(e, ReviewSubmitted))
    assert review.source == "xnat" and review.actor == "xnat:dr_reader"
    assert review.run_key == study_result.completed.run_key
    assert review.agree == {"lesion": False} and review.reads == {"lesion": "residual tumour"}
    assert review.confidence == 4 and review.comment == "margin missed posteriorly"
    assert review.seconds_on_case == 95.5
    edit = next(e for e in history if isinstance(e, EditSubmitted))
    assert edit.source == "xnat" and edit.reader == "dr_reader"
    stored = (tmp_path / "instances" / edit.store_key).read_bytes()
    assert stored == corrected
    assert edit.sha256 in edit.store_key
    assert pydicom.dcmread(io.BytesIO(stored)).Modality == "SEG"
    session = standin.experiments[session_id]
    assert session.fields["lm_worklist"] == "reviewed"

    # polling again, and a new poller after a restart (empty memory): nothing twice
    assert (await first.poll_once(bus)).reviews == []
    again = await poller(standin, tmp_path).poll_once(bus)
    assert again.reviews == [] and again.edits == []
    history = [e for _, e in await bus.history(study_result.study_uid)]
    assert sum(isinstance(e, ReviewSubmitted) for e in history) == 1
    assert sum(isinstance(e, EditSubmitted) for e in history) == 1

    # the worklist flag is put right again if it was lost, with no second event
    session.fields["lm_worklist"] = "pending"
    assert (await first.poll_once(bus)).reviews == []
    assert session.fields["lm_worklist"] == "reviewed"

    # a changed answer is a new review (a new fact), recorded once
    with as_clinician(standin) as clinician:
        clinician.experiments[session_id].mset({
            "fields/field[name=lm_review_submitted_at]/field": "2026-11-22T05:40:00Z",
            "fields/field[name=lm_review_agree_lesion]/field": "yes"})
    assert len((await first.poll_once(bus)).reviews) == 1
    assert (await first.poll_once(bus)).reviews == []


@pytest.mark.server  # a real nats-server
async def test_a_review_on_an_assessor_is_read_too(
        bus: EventBus, standin: XnatStandIn, study_result: StudyResult, tmp_path: Path) -> None:
    await bus.publish_many(study_result.events())
    session_id = publish_case(standin, study_result)
    with as_clinician(standin) as clinician:
        experiment = clinician.experiments[session_id]
        assessor = clinician.classes.QcManualAssessorData(parent=experiment,
                                                          label="LM_REVIEW_dr_reader")
        assessor.mset({f"fields/field[name={k}]/field": v for k, v in FORM.items()})
    outcome = await poller(standin, tmp_path).poll_once(bus)
    assert len(outcome.reviews) == 1
    history = [e for _, e in await bus.history(study_result.study_uid)]
    review = next(e for e in history if isinstance(e, ReviewSubmitted))
    assert review.reader == "dr_reader" and review.agree == {"lesion": False}


@pytest.mark.server  # a real nats-server
async def test_bad_forms_and_files_write_no_event_and_say_why(
        bus: EventBus, standin: XnatStandIn, study_result: StudyResult, tmp_path: Path) -> None:
    await bus.publish_many(study_result.events())
    session_id = publish_case(standin, study_result)
    other_study = build_seg(pydicom.dcmread(get_testdata_file("MR_small.dcm")), (5, 5, 20, 20))
    buf = io.BytesIO()
    other_study.save_as(buf, enforce_file_format=True)
    with as_clinician(standin) as clinician:
        experiment = clinician.experiments[session_id]
        experiment.mset({f"fields/field[name={k}]/field": v
                         for k, v in {**FORM, "lm_review_confidence": "9"}.items()})
        edits = experiment.create_resource("LM_EDITS", format="DICOM")
        edits.upload_data(buf.getvalue(), "dr_reader/other-study.dcm", overwrite=True)
        edits.upload_data(b"not dicom at all", "dr_reader/notes.txt", overwrite=True)
        edits.upload_data(Path(get_testdata_file("CT_small.dcm")).read_bytes(),
                          "dr_reader/an-image.dcm", overwrite=True)
    p = poller(standin, tmp_path)
    outcome = await p.poll_once(bus)
    assert outcome.reviews == [] and outcome.edits == []
    problems = "\n".join(outcome.problems)
    assert "not 1..5" in problems
    assert "another study" in problems
    assert "not a readable DICOM file" in problems
    assert "not a segmentation (Modality CT)" in problems
    history = [e for _, e in await bus.history(study_result.study_uid)]
    assert not any(isinstance(e, ReviewSubmitted | EditSubmitted) for e in history)
    assert standin.experiments[session_id].fields["lm_worklist"] == "pending"
    # a refused file is not fetched again until it changes
    downloads = standin.count("GET", r"/files/.+")
    again = await p.poll_once(bus)
    assert standin.count("GET", r"/files/.+") == downloads
    assert all("not 1..5" in m for m in again.problems)


@pytest.mark.server  # a real nats-server
async def test_xnat_down_is_an_error_the_service_survives(
        bus: EventBus, standin: XnatStandIn, tmp_path: Path) -> None:
    standin.stop()
    with pytest.raises(feedback_module.FeedbackError, match="XNAT at http"):
        await poller(standin, tmp_path).poll_once(bus)
