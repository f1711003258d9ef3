"""Longitudinal comparison orders exams by date, not by StudyDate string (issue 14 item
4): baseline and prior were swapped by one exam with a non-standard date."""

from __future__ import annotations

import pytest

from engine.ops.longitudinal import EarlierResult, compare


def test_longitudinal_orders_exams_by_date_not_by_string() -> None:
    """The issue's case: one exam with a non-standard date swapped baseline and prior."""
    earlier = [EarlierResult("baseline", "20250105", 10.0),  # earliest
               EarlierResult("prior", "01.06.2025", 20.0)]  # later, but sorts first as text
    assert sorted(e.study_date for e in earlier)[0] == "01.06.2025"  # the old bug's order
    c = compare(33.6, "20260301", earlier, threshold_pct=25.0)
    assert c.baseline is not None and c.baseline.study_uid == "baseline"
    assert c.prior is not None and c.prior.study_uid == "prior"
    assert c.change_from_baseline_pct == pytest.approx(236.0)
    assert c.change_from_prior_pct == pytest.approx(68.0)
    # the current exam in an older form is placed correctly too
    assert compare(33.6, "2026.03.01", earlier, threshold_pct=25.0).baseline == c.baseline
    # an unreadable earlier date takes no part; an unreadable current one compares nothing
    odd = [*earlier, EarlierResult("odd", "13/13/2025", 1.0)]
    assert compare(33.6, "20260301", odd, threshold_pct=25.0) == c
    assert compare(33.6, "bad date", earlier, threshold_pct=25.0).progression is None
