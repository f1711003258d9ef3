"""The BTS longitudinal finding's three classes: progression above the pipeline's
threshold (from baseline or prior), improved at RANO's partial-response shrinkage from
baseline, stable between; nothing to compare, no finding."""

from __future__ import annotations

import pytest

from engine.ops.longitudinal import (
    CLASSES,
    IMPROVED,
    IMPROVEMENT_PCT,
    PROGRESSION,
    STABLE,
    EarlierResult,
    compare,
)

EARLIER = [EarlierResult("s1", "20250101", 10.0), EarlierResult("s2", "20250601", 8.0)]


@pytest.mark.parametrize(("value", "expected"), [
    (13.0, PROGRESSION),  # +30% from baseline
    (10.5, PROGRESSION),  # +5% from baseline but +31% from the prior
    (9.0, STABLE),  # -10% from baseline, +12.5% from prior
    (5.0, IMPROVED),  # -50% from baseline: exactly RANO's partial response
    (5.1, STABLE),  # -49%: not yet improved
])
def test_the_finding_follows_the_volume_change(value: float, expected: str) -> None:
    c = compare(value, "20260101", EARLIER, threshold_pct=25.0)
    assert c.finding == expected
    assert c.progression is (expected == PROGRESSION)


def test_improvement_threshold_is_the_pipelines_choice_and_first_exams_have_none() -> None:
    assert IMPROVEMENT_PCT == 50.0 and CLASSES == (PROGRESSION, STABLE, IMPROVED)
    assert compare(7.0, "20260101", EARLIER, threshold_pct=25.0,
                   improvement_pct=25.0).finding == IMPROVED
    assert compare(7.0, "20260101", EARLIER, threshold_pct=25.0).finding == STABLE
    assert compare(3.0, "20240101", EARLIER, threshold_pct=25.0).finding is None
