"""Pure helpers for plots whose points ``projections.metrics`` summarises but does not
return: the ROC curve behind the AUC, the Bland-Altman points behind bias and limits.

The reference standard follows ``projections.metrics`` exactly (its module docstring):
the strict majority of at least two readers ("consensus"; ties give no reference) or
one named reader; the AI score is P(positive).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from projections.metrics import Case


def reference_of(case: Case, reference: str = "consensus") -> str | None:
    """The reference read of one case, or None when there is none."""
    if reference != "consensus":
        return case.reads.get(reference)
    if len(case.reads) < 2:
        return None
    top, n = Counter(case.reads.values()).most_common(1)[0]
    return top if n * 2 > len(case.reads) else None


def p_positive(case: Case, positive: str) -> float | None:
    if case.probability is None:
        return None
    return case.probability if case.ai == positive else 1.0 - case.probability


@dataclass(frozen=True)
class RocPoint:
    threshold: float
    fpr: float
    tpr: float


def roc_points(truth: Sequence[bool], scores: Sequence[float]) -> list[RocPoint]:
    """The empirical ROC curve: one point per distinct score, from (0,0) to (1,1)."""
    pairs = [(s, t) for s, t in zip(scores, truth, strict=True) if math.isfinite(s)]
    pos = sum(1 for _, t in pairs if t)
    neg = len(pairs) - pos
    if pos == 0 or neg == 0:
        return []
    pairs.sort(key=lambda p: -p[0])
    out = [RocPoint(math.inf, 0.0, 0.0)]
    tp = fp = 0
    i = 0
    while i < len(pairs):
        s = pairs[i][0]
        while i < len(pairs) and pairs[i][0] == s:
            tp += pairs[i][1]
            fp += not pairs[i][1]
            i += 1
        out.append(RocPoint(s, fp / neg, tp / pos))
    return out


def roc_of_cases(cases: Sequence[Case], positive: str, reference: str = "consensus",
                 ) -> list[RocPoint]:
    truth: list[bool] = []
    scores: list[float] = []
    for c in cases:
        ref = reference_of(c, reference)
        p = p_positive(c, positive)
        if ref is None or p is None:
            continue
        truth.append(ref == positive)
        scores.append(p)
    return roc_points(truth, scores)


def thin(points: Sequence[RocPoint], max_points: int = 400) -> list[RocPoint]:
    """At most ``max_points`` of a curve for drawing (first and last kept, evenly spaced
    between): a browser need not draw 20,000 steps to show the shape; the CSV keeps all."""
    if len(points) <= max_points:
        return list(points)
    step = (len(points) - 1) / (max_points - 1)
    return [points[round(i * step)] for i in range(max_points)]


def trapezoid_auc(points: Sequence[RocPoint]) -> float | None:
    """Area under the plotted curve (equals the Mann-Whitney AUC for an empirical ROC)."""
    if len(points) < 2:
        return None
    return sum((b.fpr - a.fpr) * (a.tpr + b.tpr) / 2 for a, b in zip(points, points[1:],
                                                                       strict=False))


@dataclass(frozen=True)
class BlandAltmanPoint:
    mean: float
    difference: float  # edited - AI


def bland_altman_points(edited: Sequence[float], ai: Sequence[float]) -> list[BlandAltmanPoint]:
    return [BlandAltmanPoint((a + b) / 2, a - b) for a, b in zip(edited, ai, strict=True)]
