"""Drift monitoring: which windows to compare, and the alerts to publish.

``drift_windows`` picks the last complete week before ``now`` as the window and the
``baseline_weeks`` before it as the baseline. ``windows_following_data`` uses those when
both hold data and otherwise says so and takes the latest data instead (never an empty
comparison because every exam arrived this week, as in ``lastmile demo``; events are never
backdated to fit a window). ``alerts_for`` turns the rows of
``metrics.drift`` that crossed the threshold into ``DriftAlertRaised`` events whose
id is derived from (feature, window, baseline), so however often the check runs, an
alert is raised once per feature and window (JetStream drops the re-publish).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from events.base import deterministic_id
from events.catalogue import DriftAlertRaised
from projections.metrics import Con, DriftRow, arrivals

Window = tuple[datetime, datetime]


def week_start(t: datetime) -> datetime:
    """Monday 00:00 of t's week, naive UTC (as the read model stores times)."""
    if t.tzinfo is not None:
        t = t.astimezone(UTC).replace(tzinfo=None)
    day = t.replace(hour=0, minute=0, second=0, microsecond=0)
    return day - timedelta(days=day.weekday())


def drift_windows(now: datetime, baseline_weeks: int = 4) -> tuple[Window, Window]:
    """(baseline, window): the last complete week before ``now`` and the weeks before it."""
    if baseline_weeks < 1:
        raise ValueError("baseline_weeks must be at least 1")
    end = week_start(now)
    start = end - timedelta(weeks=1)
    return (start - timedelta(weeks=baseline_weeks), start), (start, end)


LAST_COMPLETE_WEEK = "last complete week"
LATEST_DATA = "latest data"


@dataclass(frozen=True)
class DriftWindows:
    """The two windows a drift comparison uses, and on what basis: ``LAST_COMPLETE_WEEK``
    (the default), ``LATEST_DATA`` (the default held no data: ``note`` says so and what is
    used instead), or none at all (``baseline``/``window`` None, ``note`` says why)."""

    baseline: Window | None
    window: Window | None
    basis: str | None
    note: str | None = None


def _duration(d: timedelta) -> str:
    s = d.total_seconds()
    for unit, size in (("days", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if s >= size:
            return f"{s / size:.1f} {unit}"
    return f"{s:.0f} s"


def windows_following_data(con: Con, now: datetime, baseline_weeks: int = 4,
                           pipeline: str | None = None) -> DriftWindows:
    """The drift windows for ``pipeline``'s stored instances (routed to it; None: all).

    The last complete week before ``now`` against the ``baseline_weeks`` before it, when
    both hold instances. Otherwise the latest data: the window ends at the last arrival
    and is one week long, or a ``baseline_weeks + 1``-th of the arrivals' span when that
    span is shorter than ``baseline_weeks + 1`` weeks (the baseline is the
    ``baseline_weeks`` window lengths before it); ``note`` names the empty default.
    Fewer than two distinct arrival times: no windows. Times are naive UTC."""
    baseline, window = drift_windows(now, baseline_weeks)
    wn = arrivals(con, pipeline, *window)[0]
    bn = arrivals(con, pipeline, *baseline)[0]
    if wn and bn:
        return DriftWindows(baseline, window, LAST_COMPLETE_WEEK)
    last_day = window[1] - timedelta(days=1)
    empty = (f"The last complete week ({window[0]:%Y-%m-%d} to {last_day:%Y-%m-%d}) "
             + ("holds no exams" if not wn else
                f"has no exams in the {baseline_weeks} weeks before it"))
    n, first, last = arrivals(con, pipeline)
    if n < 2 or first is None or last is None or first >= last:
        return DriftWindows(None, None, None, f"{empty}, and there are too few arrivals to "
                            "compare any other windows.")
    stop = last + timedelta(microseconds=1)  # the last arrival is inside the window
    length = min(timedelta(weeks=1), (stop - first) / (baseline_weeks + 1))
    window = (stop - length, stop)
    baseline = (stop - (baseline_weeks + 1) * length, window[0])
    return DriftWindows(baseline, window, LATEST_DATA, (
        f"{empty}; showing the latest data instead: the window is the last "
        f"{_duration(length)} of arrivals, the baseline the {baseline_weeks} × "
        f"{_duration(length)} before it."))


def alert_id(row: DriftRow, baseline: Window, window: Window) -> str:
    return deterministic_id("drift-alert", row.pipeline, row.feature,
                            window[0].isoformat(), window[1].isoformat(),
                            baseline[0].isoformat(), baseline[1].isoformat())


def alerts_for(rows: Iterable[DriftRow], *, baseline: Window, window: Window,
               actor: str = "projector") -> list[DriftAlertRaised]:
    """The DriftAlertRaised events to publish for rows over their threshold."""
    out = []
    for row in rows:
        if not row.alert or row.psi is None:
            continue
        out.append(DriftAlertRaised.new(
            actor=actor,
            pipeline=row.pipeline,
            event_id=alert_id(row, baseline, window),
            correlation_id=deterministic_id("drift", row.pipeline, row.feature),
            feature=f"{row.pipeline}:{row.feature}",
            psi=round(row.psi, 6),
            threshold=row.threshold,
            window_start=window[0].isoformat(),
            window_end=window[1].isoformat(),
            baseline_start=baseline[0].isoformat(),
            baseline_end=baseline[1].isoformat(),
        ))
    return out


def describe_drift(rows: Iterable[DriftRow]) -> str:
    """One line for a person: the features over their threshold (PSI), or that none was
    among those whose PSI could be computed, or that no PSI could be computed at all (and
    why) — "no feature over threshold" would claim a check that did not happen."""
    rows = list(rows)
    alerts = [r for r in rows if r.alert and r.psi is not None]
    if alerts:
        return ", ".join(f"{a.pipeline}:{a.feature} PSI {a.psi:.2f}" for a in alerts)
    computed = [r for r in rows if r.psi is not None]
    if computed:
        return (f"no feature over threshold ({len(computed)} of {len(rows)} features "
                "compared)")
    if not rows:
        return "no PSI could be computed: no exams in the baseline or the window"
    smallest = min(rows, key=lambda r: min(r.baseline_n, r.window_n))
    return (f"no PSI could be computed: {len(rows)} features with too few exams (fewest: "
            f"{smallest.baseline_n} in the baseline, {smallest.window_n} in the window)")
