"""Worklist, QC queue and priors on a read model folded from known events."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import msgspec
import pytest

from dashboards.review.policy import assignments
from events.base import Event
from events.catalogue import (
    InferenceCompleted,
    Measurement,
    QcPassed,
    QcRejected,
    ReviewSubmitted,
)
from projections import review_queries as RQ
from projections.duckdb_store import ProjectionStore
from projections.folds import RowBatch


def done(study: str, pipeline: str, run_key: str, minutes: int, *, patient: str = "p1",
         date: str = "20260101", volume: float | None = None) -> InferenceCompleted:
    ev = InferenceCompleted.new(
        actor="w", study_uid=study, pipeline=pipeline, run_key=run_key, model_name="m",
        model_version="1", runtime="cpu", runtime_reason="t", duration_s=1, inference_s=1,
        patient_pseudonym=patient, study_date=date,
        measurements=(Measurement(name="volume_lesion", value=volume, unit="mL",
                                  label="lesion"),) if volume is not None else ())
    t = ev.occurred_at + timedelta(minutes=minutes)
    return msgspec.structs.replace(ev, occurred_at=t, recorded_at=t)


@pytest.fixture
def con() -> Iterator[Any]:
    a = done("s.a", "bts", "run-a", 1, date="20260101", volume=10.0)
    b = done("s.b", "bts", "run-b", 2, date="20260201", volume=12.0)
    c_old = done("s.c", "bts", "run-c1", 3, date="20260301", volume=15.0)
    c_new = done("s.c", "bts", "run-c2", 4, date="20260301", volume=16.0)  # a re-run
    h1 = done("s.h1", "hfd", "run-h1", 5)
    h2 = done("s.h2", "hfd", "run-h2", 6)
    h3 = done("s.h3", "hfd", "run-h3", 7)
    other = done("s.x", "lts", "run-x", 8)
    events: list[Event] = [a, b, c_old, c_new, h1, h2, h3, other]
    for r in (a, b, c_old, c_new, other):
        events += assignments(r, ["dr.a", "dr.b"])
    passed = h1.caused(QcPassed, actor="qc", run_key="run-h1")
    rejected = h2.caused(QcRejected, actor="qc", run_key="run-h2", reason="motion")
    events += [passed, rejected, *assignments(passed, ["dr.a"])]
    events.append(b.caused(ReviewSubmitted, actor="dr.a", run_key="run-b", reader="dr.a"))
    store = ProjectionStore(":memory:")
    store.apply(RowBatch().extend(enumerate(events, start=1)))
    with store.connection() as c:
        yield c
    store.close()


def test_worklist_is_assigned_current_unreviewed_released_and_newest_first(con: Any) -> None:
    rows = RQ.worklist(con, "dr.a", ["bts", "hfd"])
    assert [r.run_key for r in rows] == ["run-h1", "run-c2", "run-a"]
    # dr.b: nothing reviewed, no HFD assigned; all pipelines
    assert [r.run_key for r in RQ.worklist(con, "dr.b")] == ["run-x", "run-c2", "run-b",
                                                             "run-a"]
    assert RQ.worklist(con, "dr.b", ["lts"])[0].run_key == "run-x"
    assert RQ.worklist(con, "nobody") == []


def test_qc_queue_lists_undecided_current_gated_results_oldest_first(con: Any) -> None:
    assert [r.run_key for r in RQ.qc_queue(con, ["hfd"])] == ["run-h3"]
    assert RQ.qc_queue(con, []) == []


def test_priors_give_percent_change_against_baseline_and_previous(con: Any) -> None:
    rows = RQ.priors(con, "p1", "bts", up_to_date="20260301")
    assert [(r.study_uid, r.value) for r in rows] == [("s.a", 10.0), ("s.b", 12.0),
                                                       ("s.c", 16.0)]  # latest run of s.c
    assert rows[0].change_from_baseline_pct is None
    assert rows[1].change_from_baseline_pct == 20.0 and rows[1].change_from_previous_pct == 20.0
    assert rows[2].change_from_baseline_pct == 60.0
    assert rows[2].change_from_previous_pct == pytest.approx(33.3)
    assert [r.study_uid for r in RQ.priors(con, "p1", "bts", up_to_date="20260201")] == [
        "s.a", "s.b"]
    assert RQ.priors(con, "p2", "bts") == []


def test_reviewed_runs_and_blinded_worklist(con: Any) -> None:
    assert [r[0] for r in RQ.reviewed_runs(con, "dr.a")] == ["run-b"]
    rows = RQ.blinded_worklist(con, "dr.b", "lts")
    assert [(r.run_key, r.rated) for r in rows] == [("run-x", 0)]
