"""Longitudinal comparison: the current volume against the same patient's earlier ones.

Earlier results are found by patient pseudonym (never by identity) and ordered by
study date *as a date* (``events.dicom_dates``: ``20260301``, ``2026.03.01`` and
``01.03.2026`` are one day; strings would order ``01.03.2026`` before ``20250101``).
Baseline = the earliest earlier exam; prior = the latest earlier one. An exam whose
date cannot be read takes no part in the comparison (and a current exam without a
readable date is compared with nothing), rather than being placed by guesswork.

The comparison's finding has three classes (engine/README.md, "Longitudinal classes"):
``progression`` when the volume grew by more than the pipeline's ``threshold_pct`` from
baseline or prior (BTS: 25%, RANO's progression threshold), ``improved`` when it did not
and it shrank from baseline by at least ``improvement_pct`` (50%: RANO's partial
response), ``stable`` otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

from events.dicom_dates import DicomValueError, parse_da

PROGRESSION = "progression"
STABLE = "stable"
IMPROVED = "improved"
#: the finding's classes, positive first (the reader form offers the same)
CLASSES = (PROGRESSION, STABLE, IMPROVED)
#: shrinkage from baseline (%) that counts as improved: RANO's partial response (a 50%
#: decrease, Wen et al., J Clin Oncol 2010), the counterpart of its 25% progression
IMPROVEMENT_PCT = 50.0


@dataclass(frozen=True)
class EarlierResult:
    study_uid: str
    study_date: str  # DA: YYYYMMDD (older forms are read too)
    value: float


@dataclass(frozen=True)
class Comparison:
    baseline: EarlierResult | None
    prior: EarlierResult | None
    change_from_baseline_pct: float | None
    change_from_prior_pct: float | None
    progression: bool | None  # None when there is nothing to compare with
    label: str = ""  # the label whose volume was compared (the pipeline file's)
    improved: bool = False  # not progression, and shrunk from baseline by improvement_pct

    @property
    def finding(self) -> str | None:
        """The AI's longitudinal finding for agreement with readers' reads (issue 19 #4):
        one of ``CLASSES`` ("progression", "stable", "improved"; the reader form's
        classes, ``dashboards.review.policy.PROGRESSION_CLASSES``); None without an
        earlier exam."""
        if self.progression is None:
            return None
        return PROGRESSION if self.progression else IMPROVED if self.improved else STABLE


def percent_change(value: float, reference: float) -> float | None:
    if reference <= 0:
        return None
    return (value - reference) / reference * 100.0


def earlier_than(earlier: Sequence[EarlierResult], current_date: str,
                 current_study_uid: str | None = None) -> list[EarlierResult]:
    """The results dated before ``current_date`` (not the current study's), earliest
    first; none when the current date cannot be read."""
    current = _date(current_date)
    dated = [(d, e) for e in earlier if (d := _date(e.study_date)) is not None]
    return [e for d, e in sorted(dated, key=lambda t: (t[0], t[1].study_uid))
            if current is not None and d < current and e.study_uid != current_study_uid]


def compare(
    current_value: float,
    current_date: str,
    earlier: Sequence[EarlierResult],
    *,
    threshold_pct: float,
    improvement_pct: float = IMPROVEMENT_PCT,
    current_study_uid: str | None = None,
) -> Comparison:
    """% change from baseline and prior; progression when either exceeds ``threshold_pct``,
    improved when neither does and the change from baseline is ``-improvement_pct`` or
    less (the prior's when the baseline's cannot be computed).

    Results dated after the current study (or the current study itself) are ignored,
    so re-running an old exam compares it only with what was known before it.
    """
    before = earlier_than(earlier, current_date, current_study_uid)
    if not before:
        return Comparison(None, None, None, None, None)
    baseline, prior = before[0], before[-1]
    from_base = percent_change(current_value, baseline.value)
    from_prior = percent_change(current_value, prior.value)
    changes = [c for c in (from_base, from_prior) if c is not None]
    progression = any(c > threshold_pct for c in changes) if changes else None
    reference = from_base if from_base is not None else from_prior
    improved = progression is False and reference is not None and \
        reference <= -improvement_pct
    return Comparison(baseline, prior, from_base, from_prior, progression, improved=improved)


def _date(value: str) -> date | None:
    try:
        return parse_da(value, "StudyDate")
    except DicomValueError:
        return None
