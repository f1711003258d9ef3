"""Longitudinal comparison: the current volume against the same patient's earlier ones.

Earlier results are found by patient pseudonym (never by identity) and ordered by
study date. Baseline = the earliest earlier exam; prior = the latest earlier one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class EarlierResult:
    study_uid: str
    study_date: str  # YYYYMMDD
    value: float


@dataclass(frozen=True)
class Comparison:
    baseline: EarlierResult | None
    prior: EarlierResult | None
    change_from_baseline_pct: float | None
    change_from_prior_pct: float | None
    progression: bool | None  # None when there is nothing to compare with


def percent_change(value: float, reference: float) -> float | None:
    if reference <= 0:
        return None
    return (value - reference) / reference * 100.0


def compare(
    current_value: float,
    current_date: str,
    earlier: Sequence[EarlierResult],
    *,
    threshold_pct: float,
    current_study_uid: str | None = None,
) -> Comparison:
    """% change from baseline and prior; progression when either exceeds ``threshold_pct``.

    Results dated after the current study (or the current study itself) are ignored,
    so re-running an old exam compares it only with what was known before it.
    """
    before = sorted(
        (e for e in earlier if e.study_date < current_date and e.study_uid != current_study_uid),
        key=lambda e: (e.study_date, e.study_uid),
    )
    if not before:
        return Comparison(None, None, None, None, None)
    baseline, prior = before[0], before[-1]
    from_base = percent_change(current_value, baseline.value)
    from_prior = percent_change(current_value, prior.value)
    changes = [c for c in (from_base, from_prior) if c is not None]
    progression = any(c > threshold_pct for c in changes) if changes else None
    return Comparison(baseline, prior, from_base, from_prior, progression)
