"""Issue 16 item 5: a classification pipeline's decisions fold like HFD's findings: one
finding per study (the decision and its probability), the per-class probabilities as
measurements, and the agreement figures (kappa AI vs reader, confusion against the
readers' reads) computed from them, checked against scikit-learn on the same cases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
from sklearn.metrics import cohen_kappa_score, confusion_matrix

from events.catalogue import Finding, InferenceCompleted, Measurement, ReviewSubmitted
from projections import metrics as M
from projections.duckdb_store import ProjectionStore
from projections.folds import RowBatch

T0 = datetime(2026, 11, 3, 9, 0, tzinfo=UTC)
CLASSES = ("glioma", "meningioma", "notumor", "pituitary")


def _result(i: int, decision: str, p: float) -> InferenceCompleted:
    others = (1.0 - p) / 3
    return InferenceCompleted.new(
        actor="worker", study_uid=f"1.2.826.0.1.3680043.8.498.160{i}", pipeline="detect-tumor",
        occurred_at=T0 + timedelta(minutes=i), run_key=f"k{i}", model_name="detect-tumor",
        model_version="0.1.1", runtime="onnxruntime-cpu", runtime_reason="cpu",
        duration_s=1.0, inference_s=0.5,
        findings=(Finding(label="brain_tumor", classification=decision, probability=p),),
        measurements=tuple(Measurement(name=f"probability_{c}", unit="1", label="brain_tumor",
                                       value=p if c == decision else others)
                           for c in CLASSES))


def _read(i: int, reader: str, read: str) -> ReviewSubmitted:
    return ReviewSubmitted.new(actor=reader, study_uid=f"1.2.826.0.1.3680043.8.498.160{i}",
                               pipeline="detect-tumor",
                               occurred_at=T0 + timedelta(hours=1, minutes=i),
                               run_key=f"k{i}", reader=reader, reads={"brain_tumor": read})


def test_classification_decisions_fold_into_agreement_like_hfd_findings() -> None:
    ai = ["glioma", "notumor", "notumor", "pituitary", "meningioma", "glioma", "notumor",
          "glioma"]
    reader = ["glioma", "notumor", "glioma", "pituitary", "notumor", "glioma", "notumor",
              "meningioma"]
    events: list = [_result(i, d, 0.6 + 0.04 * i) for i, d in enumerate(ai)]
    events += [_read(i, "r1", r) for i, r in enumerate(reader)]
    store = ProjectionStore(":memory:")
    store.apply(RowBatch().extend(enumerate(events, 1)))
    with store.connection() as con:
        rows = con.execute("SELECT label, classification, probability FROM findings "
                           "WHERE pipeline = 'detect-tumor' ORDER BY run_key").fetchall()
        assert [r[1] for r in rows] == ai and {r[0] for r in rows} == {"brain_tumor"}
        probs = con.execute("SELECT count(*) FROM measurements WHERE pipeline = "
                            "'detect-tumor' AND unit = '1'").fetchone()
        assert probs == (4 * len(ai),)
        result = M.agreement(con, "detect-tumor", positive="glioma", label="brain_tumor",
                             reference="r1")
    store.close()
    assert result.cases == len(ai) and result.readers == ("r1",)
    kappa = result.ai_vs_reader["r1"]
    assert np.isclose(kappa.value, cohen_kappa_score(ai, reader))
    assert result.confusion is not None  # rows: the reference reader, columns: the AI
    labels = list(result.confusion.labels)
    assert np.array_equal(np.array(result.confusion.matrix),
                          confusion_matrix(reader, ai, labels=labels))
