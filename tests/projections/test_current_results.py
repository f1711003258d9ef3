"""One current result per study and pipeline: a superseded result leaves the agreement
cases, the drift inputs, the reader's worklist and the open-case counts; a partial
completion and a stale result are flagged."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from dashboards import queries as Q
from events.catalogue import (
    CaseAssigned,
    CompletionReason,
    Finding,
    InferenceCompleted,
    ResultMarkedStale,
    ResultSuperseded,
    StudyAmended,
    StudyCompleted,
)
from projections import metrics as M
from projections import review_queries as RQ
from projections.duckdb_store import ProjectionStore
from projections.folds import RowBatch

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
A, B = "1.2.826.0.1.3680043.8.498.71", "1.2.826.0.1.3680043.8.498.72"


def _result(study: str, key: str, hip: str, at: int) -> InferenceCompleted:
    return InferenceCompleted.new(
        actor="worker", study_uid=study, pipeline="hfd", occurred_at=T0 + timedelta(minutes=at),
        run_key=key, model_name="hfd", model_version="1", runtime="onnxruntime-cpu",
        runtime_reason="cpu", duration_s=1.0, inference_s=0.5, score=0.9,
        findings=(Finding(label="left_hip", classification=hip, probability=0.9),))


def _assigned(study: str, key: str, at: int) -> CaseAssigned:
    return CaseAssigned.new(actor="assigner", study_uid=study, pipeline="hfd",
                            occurred_at=T0 + timedelta(minutes=at), run_key=key, reader="r1")


def _fold(events: list) -> ProjectionStore:
    store = ProjectionStore(":memory:")
    store.apply(RowBatch().extend(enumerate(events, 1)))
    return store


def test_a_superseded_result_is_counted_nowhere_and_partial_or_stale_are_flagged() -> None:
    partial = StudyCompleted.new(
        actor="completion", study_uid=A, pipeline="hfd", reason=CompletionReason.MAX_WAIT,
        series_count=1, instance_count=1, latency_s=300.0, partial=True,
        evidence=("association 1234abcd was aborted by the requestor after 1 instances",))
    whole = StudyAmended.new(actor="completion", study_uid=A, pipeline="hfd",
                             new_instance_count=1, series_uids=("s2",), rerun=True,
                             reason=CompletionReason.WHOLE_STUDY_RELEASED, instance_count=2)
    events = [
        partial, _result(A, "a1", "fracture", 1), _assigned(A, "a1", 2), whole,
        _result(A, "a2", "normal", 3), _assigned(A, "a2", 4),
        ResultSuperseded.new(actor="worker", study_uid=A, pipeline="hfd", run_key="a1",
                             superseded_by="a2", reason="re-run", partial=True),
        StudyCompleted.new(actor="completion", study_uid=B, pipeline="hfd",
                           reason=CompletionReason.MAX_WAIT, series_count=1,
                           instance_count=1, latency_s=300.0, partial=True),
        _result(B, "b1", "fracture", 5), _assigned(B, "b1", 6),
        ResultMarkedStale.new(actor="worker", study_uid=B, pipeline="hfd", run_key="b1",
                              reason="pixels changed", changed_instances=1),
    ]
    store = _fold(events)
    with store.connection() as con:
        current = con.execute("SELECT study_uid, run_key, partial, stale, superseded_results "
                              "FROM current_results ORDER BY study_uid").fetchall()
        assert current == [(A, "a2", False, False, 1), (B, "b1", True, True, 0)]
        data = M.load_agreement_data(con, "hfd")
        assert data.run_keys is not None and sorted(data.run_keys) == ["a2", "b1"]
        rows = {r.run_key: r for r in RQ.worklist(con, "r1", qc_pipelines=())}
        assert set(rows) == {"a2", "b1"}
        assert (rows["b1"].partial, rows["b1"].stale, rows["a2"].partial) == (True, True, False)
        (open_cases,) = Q.open_worklist(con, "hfd")
        assert open_cases.open_cases == 2  # a1's assignment no longer counts
        evidence = con.execute("SELECT kind, reason, partial, evidence FROM "
                               "completion_evidence WHERE study_uid = ? ORDER BY seq",
                               [A]).fetchall()
        assert evidence[0][:3] == ("completed", "max_wait", True)
        assert "aborted by the requestor" in evidence[0][3]
        assert evidence[1][:3] == ("amended", "whole_study_released", False)
    store.close()
