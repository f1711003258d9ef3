"""The fold from a study's events to its outcome (pure), and the sender's contexts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    MRImageStorage,
)

from events.base import Event
from events.catalogue import (
    CompletionReason,
    DeliveryFailed,
    InferenceCompleted,
    InferenceFailed,
    InferenceRequested,
    InferenceSkipped,
    InferenceStarted,
    InstanceRejected,
    InstanceStored,
    PublishFailed,
    ResultPublished,
    RouteUnmatched,
    StudyAmended,
    StudyCompleted,
)
from sitecheck.check import settle
from sitecheck.folder import DicomFile
from sitecheck.outcome import Result, fold
from sitecheck.sender import FileSent, StudySent, requested_contexts

STUDY = "1.2.3.4"
T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def stored(sop: str, pipeline: str | None = "bts", at: float = 0.0) -> InstanceStored:
    return InstanceStored.new(
        actor="scp:LM_BTS", study_uid=STUDY, pipeline=pipeline, occurred_at=_at(at),
        sop_instance_uid=sop, sop_class_uid=str(MRImageStorage), series_uid="1.2.3.4.1",
        transfer_syntax_uid=str(ExplicitVRLittleEndian), sha256="0" * 64, size_bytes=10,
        store_key=f"ab/{sop}", calling_ae="MOD", called_ae="LM_BTS")


def completed(pipeline: str = "bts", at: float = 5.0) -> StudyCompleted:
    return StudyCompleted.new(actor="completion", study_uid=STUDY, pipeline=pipeline,
                              occurred_at=_at(at), reason=CompletionReason.QUIET_PERIOD,
                              series_count=1, instance_count=2, latency_s=5.0)


def engine(cls: type[Event], key: str, at: float, pipeline: str = "bts", **payload: Any
           ) -> Event:
    return cls.new(actor="worker:w", study_uid=STUDY, pipeline=pipeline, occurred_at=_at(at),
                   run_key=key, **payload)


def done(key: str, at: float) -> Event:
    return engine(InferenceCompleted, key, at, model_name="m", model_version="1",
                  model_sha256="f" * 64, runtime="onnxruntime-cpu", runtime_reason="cpu",
                  duration_s=1.0, inference_s=0.5, result_keys=(f"{key}/seg-1.dcm",))


def history(*events: Event) -> list[tuple[int, Event]]:
    return list(enumerate(events, start=1))


def test_a_completed_and_published_run_is_valid_with_its_times() -> None:
    out = fold(STUDY, history(
        stored("1"), stored("2"), completed(),
        engine(InferenceRequested, "k1", 5.1, model_sha256="f" * 64),
        engine(InferenceStarted, "k1", 5.2, worker_id="w"),
        done("k1", 7.0),
        engine(ResultPublished, "k1", 7.1, destination="store", kind="SEG"),
    ))
    (p,) = out.pipelines
    assert (p.pipeline, p.result, p.completed_reason) == ("bts", Result.VALID, "quiet_period")
    assert (p.completed_at, p.result_at) == (_at(5.0), _at(7.0))
    assert p.runs[0].kinds == ["SEG"] and p.runs[0].result_keys == ["k1/seg-1.dcm"]
    assert out.final and not out.crashed and out.retried_runs == 0 and out.stored == 2


def test_completed_but_waiting_for_the_engine_is_not_final() -> None:
    out = fold(STUDY, history(stored("1"), completed()))
    assert out.pipelines[0].result is Result.PENDING and not out.final


def test_an_input_error_final_at_once_is_a_named_refusal() -> None:
    out = fold(STUDY, history(
        stored("1"), completed(),
        engine(InferenceStarted, "k1", 5.2, worker_id="w"),
        engine(InferenceFailed, "k1", 6.0, operator="load_volume",
               error="slice 3 missing (InstanceNumber)", attempt=1, final=True),
    ))
    (p,) = out.pipelines
    assert p.result is Result.REFUSED and "load_volume" in (p.reason or "")
    assert out.final and not out.crashed and out.retried_runs == 0


def test_a_failure_only_after_retries_is_a_crash_and_counts_the_retries() -> None:
    events: list[Event] = [stored("1"), completed()]
    for attempt in (1, 2, 3):
        events.append(engine(InferenceStarted, "k1", 5 + attempt, worker_id="w",
                             attempt=attempt))
        events.append(engine(InferenceFailed, "k1", 5.5 + attempt, operator="write_seg",
                             error="AttributeError: PatientSex", attempt=attempt,
                             final=attempt == 3))
    out = fold(STUDY, history(*events))
    assert out.pipelines[0].result is Result.CRASHED
    assert out.crashed and out.retried_runs == 1 and out.pipelines[0].runs[0].starts == 3


def test_a_dead_letter_on_the_study_is_a_crash() -> None:
    out = fold(STUDY, history(
        stored("1"), completed(),
        DeliveryFailed.new(actor="consumer:engine-workers", study_uid=STUDY, pipeline="bts",
                           consumer="engine-workers", subject="lm.ev.x", stream_sequence=3,
                           deliveries=3, reason="boom")))
    assert out.crashed and out.pipelines[0].result is Result.CRASHED


def test_a_skip_is_a_refusal_with_its_reason_and_rejected_series() -> None:
    out = fold(STUDY, history(
        stored("1"), completed(),
        engine(InferenceSkipped, "k1", 6.0, reason="no series matched the selection rules",
               rejected_series=("series 1: 3 slices, fewer than 20",))))
    p = out.pipelines[0]
    assert p.result is Result.REFUSED
    assert p.reason == ("no series matched the selection rules "
                        "(series 1: 3 slices, fewer than 20)")


def test_a_publish_that_never_succeeded_or_a_refused_instance_makes_it_partial() -> None:
    base = [stored("1"), completed(), done("k1", 7.0)]
    failed = engine(PublishFailed, "k1", 7.5, destination="pacs:ORTHANC", error="refused",
                    attempt=3, will_retry=False)
    assert fold(STUDY, history(*base, failed)).pipelines[0].result is Result.PARTIAL
    later_ok = engine(ResultPublished, "k1", 9.0, destination="pacs:ORTHANC", kind="SR")
    assert fold(STUDY, history(*base, failed, later_ok)).pipelines[0].result is Result.VALID
    rejected = InstanceRejected.new(actor="scp", study_uid=STUDY, reason="no decoder",
                                    status=0xC000, status_name="ERROR_CANNOT_UNDERSTAND",
                                    calling_ae="MOD", called_ae="LM_BTS")
    out = fold(STUDY, history(*base, rejected))
    assert out.pipelines[0].result is Result.PARTIAL
    assert out.rejected == {"ERROR_CANNOT_UNDERSTAND: no decoder": 1}


def test_a_rerun_supersedes_the_earlier_result() -> None:
    amended = StudyAmended.new(actor="completion", study_uid=STUDY, pipeline="bts",
                               new_instance_count=1, series_uids=("s",), rerun=True)
    out = fold(STUDY, history(stored("1"), completed(), done("k1", 7.0), stored("2", at=8),
                              amended, done("k2", 12.0)))
    p = out.pipelines[0]
    assert p.result is Result.VALID and p.superseded_runs == 1
    assert [r.superseded for r in p.runs] == [True, False]


def test_a_study_no_rule_routed_is_no_pipeline_with_the_rules_reason() -> None:
    out = fold(STUDY, history(
        RouteUnmatched.new(actor="scp", study_uid=STUDY, called_ae="LASTMILE",
                           reason="store-only: fallback"),
        stored("1", pipeline=None)))
    assert out.result is Result.NO_PIPELINE and out.reason == "store-only: fallback"
    assert out.final and out.pipelines == []


def test_a_study_the_receiver_never_took_is_refused_with_the_senders_reasons() -> None:
    sent = StudySent(STUDY, "LM_HFD", T0, T0, files=[
        FileSent("a.dcm", "1", None, "Not sent", "not sent",
                 note="the receiver refused JPEG Lossless and this installation cannot "
                      "decompress it")])
    out = settle(sent, fold(STUDY, []))
    assert out.result is Result.REFUSED and "cannot decompress" in (out.reason or "")
    assert out.final


def test_contexts_propose_each_files_own_syntax_then_the_uncompressed_pair() -> None:
    def f(sop_class: str, ts: str) -> DicomFile:
        return DicomFile(Path("x"), STUDY, "s", sop_class, "1", ts)  # type: ignore[arg-type]

    contexts = requested_contexts([
        f(MRImageStorage, JPEGLosslessSV1), f(MRImageStorage, ImplicitVRLittleEndian),
        f(MRImageStorage, JPEGLosslessSV1), f(CTImageStorage, ExplicitVRBigEndian)])
    pair = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    assert contexts == [(MRImageStorage, [JPEGLosslessSV1]), (MRImageStorage, pair),
                        (CTImageStorage, [ExplicitVRBigEndian]), (CTImageStorage, pair)]


def test_the_summary_counts_results_and_groups_refusals_without_their_uids() -> None:
    from sitecheck.check import CheckReport, StudyReport

    def refused(uid: str) -> StudyReport:
        out = fold(uid, history(stored("1"), completed(), engine(
            InferenceFailed, f"k{uid}", 6.0, operator="load_images",
            error=f"PixelDataError: instance {uid}.7: cannot be decoded", attempt=1,
            final=True)))
        return StudyReport(StudySent(uid, "LM_HFD", T0, T0), out)

    valid = StudyReport(StudySent(STUDY, "LM_HFD", T0, T0),
                        fold(STUDY, history(stored("1"), completed(), done("k", 7.0))))
    pending = StudyReport(StudySent("9.9.9", "LM_HFD", T0, T0),
                          fold("9.9.9", history(stored("1"), completed())), timed_out=True)
    report = CheckReport([refused("1.2.3.5"), refused("1.2.3.6"), valid, pending])
    summary = report.summary()
    assert summary["results"] == {"refused": 2, "valid": 1, "timed out": 1}
    assert summary["refusals"] == {
        "load_images: PixelDataError: instance <uid>: cannot be decoded": 2}
    assert (summary["crashed"], summary["timed_out"]) == (0, 1) and not report.ok


def test_the_same_sop_uid_stored_in_another_series_counts_as_a_replacement() -> None:
    other = InstanceStored.new(
        actor="scp:LM_BTS", study_uid=STUDY, pipeline="bts", sop_instance_uid="1",
        sop_class_uid=str(MRImageStorage), series_uid="1.2.3.4.2", version=2,
        transfer_syntax_uid=str(ExplicitVRLittleEndian), sha256="1" * 64, size_bytes=10,
        store_key="cd/1", calling_ae="MOD", called_ae="LM_BTS")
    assert fold(STUDY, history(stored("1"), stored("1"))).replaced_across_series == 0
    assert fold(STUDY, history(stored("1"), other)).replaced_across_series == 1
