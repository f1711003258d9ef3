"""What `lastmile metrics` says about drift: alerts, a comparison without one, or no
comparison at all (never "no feature over threshold" when no PSI was computed)."""

from __future__ import annotations

from projections.drift import describe_drift
from projections.metrics import DriftRow


def _row(feature: str, psi: float | None, n: int = 50) -> DriftRow:
    return DriftRow("bts", feature, psi, 0.2, psi is not None and psi >= 0.2, n, n,
                    None if psi is not None else "not enough data")


def test_alerts_are_named_with_their_psi() -> None:
    assert describe_drift([_row("modality", 0.05), _row("manufacturer", 0.31)]) == (
        "bts:manufacturer PSI 0.31")


def test_a_comparison_without_alert_says_how_many_features_were_compared() -> None:
    text = describe_drift([_row("modality", 0.05), _row("manufacturer", None, 3)])
    assert text == "no feature over threshold (1 of 2 features compared)"


def test_no_psi_computed_is_said_so_with_the_counts() -> None:
    text = describe_drift([_row("modality", None, 3), _row("manufacturer", None, 0)])
    assert text.startswith("no PSI could be computed") and "over threshold" not in text
    assert "0 in the baseline" in text
    assert describe_drift([]).startswith("no PSI could be computed")
