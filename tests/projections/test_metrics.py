"""Metric queries against figures recomputed straight from the events (no SQL), and the
"not enough data" answers on an empty or too-small read model."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime, timedelta

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from demo.synthetic import SyntheticConfig, SyntheticSite
from events.catalogue import (
    DriftAlertRaised,
    InferenceCompleted,
    InferenceFailed,
    InferenceSkipped,
    InferenceStarted,
    InstanceStored,
    QcRejected,
    ResultPublished,
    ReviewSubmitted,
    StudyCompleted,
)
from projections import metrics as M
from projections.drift import alerts_for, drift_windows
from projections.duckdb_store import ProjectionStore
from projections.folds import RowBatch


def _by_pipeline(events: list, cls: type) -> Counter[str]:
    return Counter(e.pipeline for e in events if isinstance(e, cls))


def test_outcomes_count_what_the_log_says(folded: ProjectionStore, site_events: list) -> None:
    with folded.connection() as con:
        rows = {r.pipeline: r for r in M.outcomes(con)}
    done = _by_pipeline(site_events, InferenceCompleted)
    failed = Counter(e.pipeline for e in site_events
                     if isinstance(e, InferenceFailed) and e.final)
    skipped = _by_pipeline(site_events, InferenceSkipped)
    redelivered = Counter(e.pipeline for e in site_events
                          if isinstance(e, InferenceStarted) and e.attempt > 1)
    assert set(rows) == {"bts", "lts", "hfd"}
    for p, row in rows.items():
        assert (row.completed, row.failed, row.skipped) == (done[p], failed[p], skipped[p])
        assert row.redeliveries == redelivered[p]
        assert row.success_rate.value == pytest.approx(done[p] / row.finished)
        assert row.success_rate.low is not None and row.success_rate.low < done[p] / row.finished
    assert sum(r.redeliveries for r in rows.values()) > 0


def test_runtime_matches_numpy(folded: ProjectionStore, site_events: list) -> None:
    with folded.connection() as con:
        rows = {r.pipeline: r for r in M.runtime(con, threshold_s=270.0)}
    for p in ("bts", "lts", "hfd"):
        d = np.array([e.duration_s for e in site_events
                      if isinstance(e, InferenceCompleted) and e.pipeline == p])
        r = rows[p]
        assert r.n == d.size
        assert r.mean_s == pytest.approx(d.mean())
        assert r.p50_s == pytest.approx(np.percentile(d, 50))
        assert r.p90_s == pytest.approx(np.percentile(d, 90))
        assert r.under_threshold.value == pytest.approx(np.mean(d <= 270.0))


def test_runtime_uses_each_pipelines_own_target_from_its_file(
        folded: ProjectionStore, site_events: list) -> None:
    """No threshold given: each pipeline's share is against its file's targets.runtime_s
    (BTS 270 s, LTS 600 s, HFD 20 s), not one figure for all."""
    from engine.spec import REFERENCE_DIR, load_pipeline

    with folded.connection() as con:
        rows = {r.pipeline: r for r in M.runtime(con)}
        assert M.runtime_targets(con) == {p: r.threshold_s for p, r in rows.items()}
    for p in ("bts", "lts", "hfd"):
        target = load_pipeline(REFERENCE_DIR / f"{p}.yaml", check_model=False
                               ).spec.targets.runtime_s
        d = np.array([e.duration_s for e in site_events
                      if isinstance(e, InferenceCompleted) and e.pipeline == p])
        assert rows[p].threshold_s == target
        assert rows[p].under_threshold.value == pytest.approx(np.mean(d <= target))


def test_runtime_without_a_target_says_so(site_events: list) -> None:
    """A deployment whose file names no target: no share, and the reason."""
    import msgspec

    from events.catalogue import PipelineDeployed

    events = [msgspec.structs.replace(e, runtime_target_s=None)
              if isinstance(e, PipelineDeployed) and e.name == "lts" else e
              for e in site_events]
    store = ProjectionStore(":memory:")
    try:
        store.apply(RowBatch().extend(enumerate(events, 1)))
        with store.connection() as con:
            rows = {r.pipeline: r for r in M.runtime(con)}
    finally:
        store.close()
    assert rows["lts"].threshold_s is None and rows["lts"].under_threshold.value is None
    assert rows["lts"].under_threshold.reason == M.NO_RUNTIME_TARGET
    assert rows["bts"].threshold_s == 270.0


def test_turnaround_matches_the_event_times(folded: ProjectionStore, site_events: list
                                            ) -> None:
    completed: dict[tuple[str, str], datetime] = {}
    first: dict[tuple[str, str], datetime] = {}
    inferred: dict[tuple[str, str], datetime] = {}
    for e in site_events:
        key = (e.study_uid, e.pipeline)
        if isinstance(e, StudyCompleted):
            completed.setdefault(key, e.occurred_at)
            first.setdefault(key, datetime.fromisoformat(e.first_instance_at))
        elif isinstance(e, InferenceCompleted):
            inferred.setdefault(key, e.occurred_at)
    per: dict[tuple[str, object], list[float]] = defaultdict(list)
    for key, t in inferred.items():
        f = first[key]
        week = (f - timedelta(days=f.weekday())).date()
        per[(key[1], week)].append((t - completed[key]).total_seconds())
    with folded.connection() as con:
        rows = [r for r in M.turnaround(con) if r.stage == "complete_to_inference"]
    assert len(rows) == len(per)
    for r in rows:
        xs = per[(r.pipeline, r.week)]
        assert r.n == len(xs)
        assert r.p50_s == pytest.approx(np.percentile(xs, 50), abs=1e-3)
        assert r.p90_s == pytest.approx(np.percentile(xs, 90), abs=1e-3)


def test_volume_counts_every_stored_instance(folded: ProjectionStore, site_events: list
                                             ) -> None:
    with folded.connection() as con:
        rows = M.volume(con)
    stored = [e for e in site_events if isinstance(e, InstanceStored)]
    assert sum(r.instances for r in rows) == len(stored)
    by_ae = Counter(e.calling_ae for e in stored)
    got: Counter[str] = Counter()
    for r in rows:
        got[r.calling_ae] += r.instances
    assert got == by_ae


def _hfd_cases(site_events: list) -> tuple[dict, dict]:
    ai: dict[tuple[str, str], tuple[str, float | None]] = {}
    reads: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    for e in site_events:
        if e.pipeline != "hfd":
            continue
        if isinstance(e, InferenceCompleted):
            for f in e.findings:
                ai[(e.run_key, f.label)] = (f.classification, f.probability)
        elif isinstance(e, ReviewSubmitted):
            for label, read in e.reads.items():
                reads[(e.run_key, label)][e.reader] = read
    return ai, reads


def test_agreement_matches_sklearn_on_the_same_cases(folded: ProjectionStore,
                                                     site_events: list) -> None:
    ai, reads = _hfd_cases(site_events)
    with folded.connection() as con:
        result = M.agreement(con, "hfd", positive="fracture")
    assert result.readers == ("msk_a", "msk_b", "msk_c")
    assert result.cases == len(ai)
    for reader in result.readers:
        keys = [k for k in ai if reader in reads.get(k, {})]
        ref = cohen_kappa_score([ai[k][0] for k in keys], [reads[k][reader] for k in keys])
        assert result.ai_vs_reader[reader].value == pytest.approx(ref)
        assert result.ai_vs_reader[reader].n == len(keys)
    a, b = "msk_a", "msk_b"
    keys = [k for k in ai if {a, b} <= set(reads.get(k, {}))]
    assert result.between_readers[f"{a} vs {b}"].value == pytest.approx(
        cohen_kappa_score([reads[k][a] for k in keys], [reads[k][b] for k in keys]))
    assert result.fleiss.value is not None  # three readers
    # consensus reference: strict majority of the three reads
    tp = fn = 0
    for k, (cls, _) in ai.items():
        votes = Counter(reads.get(k, {}).values())
        if not votes:
            continue
        top, n = votes.most_common(1)[0]
        if n * 2 <= sum(votes.values()):
            continue
        if top == "fracture":
            tp += cls == "fracture"
            fn += cls != "fracture"
    assert result.accuracy is not None
    assert (result.accuracy.tp, result.accuracy.fn) == (tp, fn)
    assert result.accuracy.sensitivity.value == pytest.approx(tp / (tp + fn))
    assert result.auc.value is not None and result.auc.value > 0.8  # the synthetic AI is good


def test_a_designated_reader_as_reference_and_subgroups(folded: ProjectionStore) -> None:
    with folded.connection() as con:
        one = M.agreement(con, "hfd", positive="fracture", reference="msk_a")
        groups = M.agreement_by_subgroup(con, "hfd", "sex", positive="fracture")
        bts = M.agreement(con, "bts", positive="progression")
    assert one.reference_cases == one.ai_vs_reader["msk_a"].n
    assert {g.subgroup_value for g in groups} == {"F", "M"}
    assert sum(g.cases for g in groups) == one.cases
    assert bts.fleiss.value is None and "more than two readers" in (bts.fleiss.reason or "")
    with pytest.raises(ValueError, match="unknown subgroup"):
        M.agreement_by_subgroup(con, "hfd", "birth_date", positive="fracture")


def test_blinded_reads_are_unblinded_with_the_key_from_configuration(
        folded: ProjectionStore, site: tuple) -> None:
    s, events = site
    with folded.connection() as con:
        rows = {r.source: r for r in M.blinded_reads(con, "lts", s.unblinding)}
        unkeyed = M.blinded_reads(con, "lts", {})
    accepted: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for e in events:
        if isinstance(e, ReviewSubmitted) and e.blinded_label:
            src = s.unblinding[e.blinded_label]
            total[src] += 1
            accepted[src] += e.reads["mask"] == "acceptable"
    assert set(rows) == {"ai", "expert", "novice"}
    for src, row in rows.items():
        assert row.reads == total[src]
        assert row.accepted.value == pytest.approx(accepted[src] / total[src])
    assert [r.source for r in unkeyed] == ["(unknown key)"]


def test_longitudinal_change_against_baseline_and_prior(folded: ProjectionStore) -> None:
    with folded.connection() as con:
        rows = M.longitudinal(con)
    series: dict[str, list[M.LongitudinalRow]] = defaultdict(list)
    for r in rows:
        series[r.patient_pseudonym].append(r)
    multi = [v for v in series.values() if len(v) >= 3]
    assert multi, "the synthetic site has patients with three or more exams"
    for exams in multi:
        base = exams[0].value
        assert exams[0].from_baseline_pct is None and exams[0].from_prior_pct is None
        for prev, cur in zip(exams, exams[1:], strict=False):
            assert cur.at >= prev.at
            assert cur.from_prior_pct == pytest.approx(100 * (cur.value - prev.value) / prev.value)
            assert cur.from_baseline_pct == pytest.approx(100 * (cur.value - base) / base)


def test_dice_volume_agreement_qc_and_reader_time(folded: ProjectionStore, site_events: list
                                                  ) -> None:
    with folded.connection() as con:
        (d,) = M.dice_summary(con)
        (va,) = M.volume_agreement(con)
        (qc,) = M.qc_rates(con)
        rt = M.reviewer_time(con, "hfd")
    assert d.label == "lesion" and 0.7 < (d.mean.value or 0) < 1.0
    assert va.measurement == "lesion_volume" and va.pairs == d.mean.n
    assert isinstance(va.agreement, M.BlandAltman)
    rejected = sum(isinstance(e, QcRejected) for e in site_events)
    assert qc.rejected == rejected
    assert {r.reader for r in rt} == {"msk_a", "msk_b", "msk_c"}


def test_drift_raises_one_alert_per_feature_and_window(folded: ProjectionStore) -> None:
    with folded.connection() as con:
        start = datetime(2026, 6, 1)  # the synthetic site's first Monday; drift from week 8
        baseline = (start, start + timedelta(weeks=4))
        window = (start + timedelta(weeks=9), start + timedelta(weeks=10))
        rows = M.drift(con, baseline=baseline, window=window, pipeline="bts")
        weekly = M.weekly_distribution(con, "manufacturer_model", "bts")
    by = {r.feature: r for r in rows}
    assert by["manufacturer_model"].alert and by["pixel_spacing_mm"].alert
    assert not by["modality"].alert and by["modality"].psi == pytest.approx(0.0)
    alerts = alerts_for(rows, baseline=baseline, window=window)
    again = alerts_for(rows, baseline=baseline, window=window)
    assert [a.event_id for a in alerts] == [a.event_id for a in again]
    assert all(isinstance(a, DriftAlertRaised) for a in alerts)
    assert "bts:manufacturer_model" in {a.feature for a in alerts}
    assert "Vantage Galan" in {w.value for w in weekly}


def test_no_drift_no_alert_and_too_little_data_says_so() -> None:
    s = SyntheticSite(SyntheticConfig(seed=3, studies=200, weeks=10, drift_week=None))
    store = ProjectionStore(":memory:")
    store.apply(RowBatch().extend(enumerate(s.events(), 1)))
    with store.connection() as con:
        last = con.execute("SELECT max(occurred_at) FROM instances").fetchone()[0]
        baseline, window = drift_windows(last)
        rows = M.drift(con, baseline=baseline, window=window, pipeline="bts")
        tiny = M.drift(con, baseline=baseline, window=(window[0], window[0] + timedelta(
            seconds=1)), pipeline="bts")
    assert not [r for r in rows if r.feature.startswith("manufacturer") and r.alert]
    assert all(r.psi is None and "not enough data" in (r.reason or "") for r in tiny)
    store.close()


def test_an_empty_read_model_says_not_enough_data() -> None:
    store = ProjectionStore(":memory:")
    with store.connection() as con:
        assert M.turnaround(con) == [] and M.runtime(con) == [] and M.outcomes(con) == []
        a = M.agreement(con, "hfd", positive="fracture")
    assert a.cases == 0 and a.accuracy is None
    assert a.auc.value is None and "not enough data" in (a.auc.reason or "")
    assert a.fleiss.value is None
    store.close()


def test_published_results_feed_the_timeline(folded: ProjectionStore, site_events: list
                                             ) -> None:
    published = {(e.study_uid, e.pipeline) for e in site_events
                 if isinstance(e, ResultPublished)}
    with folded.connection() as con:
        n = con.execute("SELECT count(*) FROM study_timeline WHERE published_at IS NOT NULL"
                        ).fetchone()[0]
    assert n == len(published)


def test_drift_windows_are_whole_utc_weeks() -> None:
    from datetime import UTC

    baseline, window = drift_windows(datetime(2026, 11, 19, 15, 0, tzinfo=UTC), 4)
    assert window == (datetime(2026, 11, 9), datetime(2026, 11, 16))  # Monday to Monday
    assert baseline == (datetime(2026, 10, 12), datetime(2026, 11, 9))
    with pytest.raises(ValueError):
        drift_windows(datetime(2026, 11, 19), 0)


def test_per_case_view_gives_the_same_statistics(folded: ProjectionStore) -> None:
    with folded.connection() as con:
        cases = M.load_cases(con, "hfd")
        direct = M.agreement(con, "hfd", positive="fracture")
    assert len(cases) == direct.cases
    assert all(c.ai in {"normal", "fracture", "hardware"} and c.label for c in cases)
    via_cases = M.agreement_of(cases, pipeline="hfd", positive="fracture")
    assert via_cases.ai_vs_reader == direct.ai_vs_reader
    assert via_cases.fleiss == direct.fleiss
    assert via_cases.accuracy == direct.accuracy and via_cases.auc == direct.auc


def test_a_prior_exam_processed_late_still_counts_as_the_baseline() -> None:
    from events.catalogue import Measurement

    def result(study: str, date: str, volume: float, at: datetime) -> InferenceCompleted:
        return InferenceCompleted.new(
            actor="w", study_uid=study, pipeline="bts", occurred_at=at, run_key=f"{study}/bts",
            model_name="bts", model_version="1", runtime="cpu", runtime_reason="test",
            duration_s=1.0, inference_s=1.0, patient_pseudonym="p1", study_date=date,
            measurements=(Measurement(name="lesion_volume", value=volume, unit="mL"),))

    t = datetime(2026, 9, 1, 12, 0)
    events = [result("1.2.3.2", "20260801", 12.0, t),
              result("1.2.3.1", "20260101", 10.0, t + timedelta(hours=1)),  # imported late
              result("1.2.3.3", "20260901", 15.0, t + timedelta(hours=2))]
    store = ProjectionStore(":memory:")
    store.apply(RowBatch().extend(enumerate(events, 1)))
    with store.connection() as con:
        rows = M.longitudinal(con, patient="p1")
    store.close()
    assert [r.study_uid for r in rows] == ["1.2.3.1", "1.2.3.2", "1.2.3.3"]
    assert rows[1].from_baseline_pct == pytest.approx(20.0)
    assert rows[2].from_prior_pct == pytest.approx(25.0)
    assert rows[2].from_baseline_pct == pytest.approx(50.0)


def test_reference_readers_masks_are_not_counted_as_clinician_edits(
        folded: ProjectionStore, site_events: list) -> None:
    """A blinded study's expert/novice masks arrive as edits with their source; their
    Dice against the AI is not 'how much clinicians corrected the AI'."""
    from events.catalogue import EditSubmitted, Measurement, MeasurementRecomputed

    with folded.connection() as con:
        (before,) = M.dice_summary(con)
        (va_before,) = M.volume_agreement(con)
    run = next(e for e in site_events if isinstance(e, MeasurementRecomputed))
    expert = EditSubmitted.new(actor="expert_1", study_uid=run.study_uid,
                               pipeline=run.pipeline, run_key=run.run_key, reader="expert_1",
                               store_key="ab/cd/x.dcm", sha256="0" * 64, source="expert")
    recomputed = MeasurementRecomputed.new(
        actor="worker:w", study_uid=run.study_uid, pipeline=run.pipeline,
        run_key=run.run_key, edit_event_id=expert.event_id,
        measurements=(Measurement(name="lesion_volume", value=1.0, unit="mL"),),
        dice={"lesion": 0.01})
    n = len(site_events)
    folded.apply(RowBatch().extend([(n + 1, expert), (n + 2, recomputed)]))
    with folded.connection() as con:
        (after,) = M.dice_summary(con)
        (va_after,) = M.volume_agreement(con)
        assert con.execute("SELECT count(*) FROM dice WHERE dice = 0.01").fetchone() == (1,)
    assert after.mean == before.mean and va_after.pairs == va_before.pairs
