"""Drift windows follow the data: the last complete week when it and its baseline hold
exams, otherwise the latest arrivals (said so, with what was empty); never an empty
comparison because every exam arrived this week (as in `lastmile demo`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from demo.synthetic import SyntheticConfig, SyntheticSite
from projections import metrics as M
from projections.drift import (
    LAST_COMPLETE_WEEK,
    LATEST_DATA,
    drift_windows,
    windows_following_data,
)
from projections.duckdb_store import ProjectionStore
from projections.folds import RowBatch

TODAY = datetime(2026, 12, 9, 8, 0, tzinfo=UTC)  # a Wednesday


def _store(events: list) -> ProjectionStore:
    store = ProjectionStore(":memory:")
    store.apply(RowBatch().extend(enumerate(events, 1)))
    return store


def _today_site() -> list:
    """120 studies arriving within five hours today; from the fifth hour on, site 0's MR
    scanner is a new model (a later batch, as the demo sends)."""
    before = SyntheticSite(SyntheticConfig(seed=3, start=TODAY, drift_week=None))
    after = SyntheticSite(SyntheticConfig(seed=4, start=TODAY, drift_week=0))
    events = list(before.deployments())
    for i in range(100):
        events += before.study(TODAY + timedelta(minutes=2.4 * i))
    for i in range(20):
        events += after.study(TODAY + timedelta(hours=4, minutes=3 * i))
    return sorted(events, key=lambda e: e.occurred_at)


def test_a_site_with_weeks_of_data_uses_the_last_complete_week() -> None:
    store = _store(list(SyntheticSite(SyntheticConfig(seed=3, studies=200, weeks=10,
                                                      drift_week=None)).events()))
    with store.connection() as con:
        last = con.execute("SELECT max(occurred_at) FROM instances").fetchone()[0]
        chosen = windows_following_data(con, last, 4, "bts")
    assert chosen.basis == LAST_COMPLETE_WEEK and chosen.note is None
    assert (chosen.baseline, chosen.window) == drift_windows(last, 4)
    store.close()


def test_data_of_today_only_says_the_week_is_empty_and_compares_the_latest() -> None:
    store = _store(_today_site())
    with store.connection() as con:
        n, first, last = M.arrivals(con, "bts")
        week_b, week_w = drift_windows(last, 4)
        assert M.arrivals(con, "bts", *week_w)[0] == 0  # the fixed window holds nothing
        chosen = windows_following_data(con, last, 4, "bts")
        assert chosen.basis == LATEST_DATA and chosen.window and chosen.baseline
        assert "holds no exams" in (chosen.note or "")
        assert f"{week_w[0]:%Y-%m-%d}" in (chosen.note or "")
        # the window ends at the last arrival, the baseline reaches back to the first
        assert chosen.window[0] < last < chosen.window[1]
        assert chosen.baseline[0] <= first and chosen.baseline[1] == chosen.window[0]
        assert M.arrivals(con, "bts", *chosen.window)[0] > 0
        rows = {r.feature: r for r in M.drift(con, baseline=chosen.baseline,
                                             window=chosen.window, pipeline="bts")}
        # the comparison happened, and it sees the new scanner of the later batch
        assert rows["manufacturer_model"].psi is not None
        assert rows["manufacturer_model"].alert and not rows["modality"].alert
        fixed = M.drift(con, baseline=week_b, window=week_w, pipeline="bts")
    assert all(r.psi is None for r in fixed)  # what the page showed before: nothing
    store.close()


def test_no_data_or_one_arrival_gives_no_windows_and_says_why() -> None:
    store = ProjectionStore(":memory:")
    with store.connection() as con:
        chosen = windows_following_data(con, TODAY.replace(tzinfo=None), 4, "bts")
    assert chosen.window is None and chosen.baseline is None and chosen.basis is None
    assert "too few arrivals" in (chosen.note or "")
    store.close()
