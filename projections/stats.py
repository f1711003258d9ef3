"""Agreement and accuracy statistics: pure functions of values, each with a 95% CI.

A governance board acts on these numbers, so every function either returns a
number with its interval and the count it rests on, or ``Stat.missing(reason)``
("not enough data", and why) where the quantity is undefined: a kappa when
chance agreement is 1 (everyone always said the same class), a sensitivity with
no positives, an AUC with one class, a Bland-Altman with fewer than 3 pairs.

Methods (so a reader can check them):

- proportions (sensitivity, specificity, PPV, NPV, rates): Wilson score interval.
- Cohen's kappa: the large-sample standard error of Fleiss, Cohen & Everitt (1969).
- Fleiss' kappa (Fleiss 1971) for m >= 2 ratings per subject; CI from the jackknife
  standard error over subjects (deterministic, O(subjects)).
- ROC AUC: Mann-Whitney statistic (ties count one half); CI from the Hanley &
  McNeil (1982) standard error, clipped to [0, 1].
- Dice: 2|A and B| / (|A| + |B|); undefined when both masks are empty.
- Bland-Altman: bias = mean(a - b), limits = bias +/- 1.96 SD; CIs as in Bland &
  Altman (1999): t * SD / sqrt(n) for the bias, t * SD * sqrt(3 / n) for each limit.
- mean with a t interval.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray


def _t_ppf(q: float, df: int) -> float:
    """scipy is imported when a statistic is computed, not when the CLI starts (~0.9 s)."""
    from scipy import stats

    return float(stats.t.ppf(q, df))


def _rankdata(values: ArrayLike) -> NDArray[np.float64]:
    from scipy import stats

    return np.asarray(stats.rankdata(values), dtype=float)

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Stat:
    """A statistic with its 95% CI and the count it rests on, or why there is none."""

    value: float | None
    low: float | None = None
    high: float | None = None
    n: int = 0
    reason: str | None = None

    @classmethod
    def missing(cls, reason: str, n: int = 0) -> Stat:
        return cls(None, None, None, n, f"not enough data: {reason}")

    @property
    def ok(self) -> bool:
        return self.value is not None

    def as_dict(self) -> dict[str, float | int | str | None]:
        return asdict(self)

    def __str__(self) -> str:
        if self.value is None:
            return self.reason or "not enough data"
        if self.low is None or self.high is None:
            return f"{self.value:.3f} (n={self.n})"
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}] (n={self.n})"


def wilson(successes: int, n: int) -> Stat:
    """A proportion with its Wilson score interval."""
    if n <= 0:
        return Stat.missing("no cases", 0)
    if successes < 0 or successes > n:
        raise ValueError(f"successes {successes} outside 0..{n}")
    p = successes / n
    z2 = Z95 * Z95
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return Stat(p, max(0.0, centre - half), min(1.0, centre + half), n)


def mean_ci(values: ArrayLike, bounds: tuple[float, float] | None = None) -> Stat:
    """Mean with a 95% t interval; ``bounds`` clips the interval to what the quantity can
    be (Dice is in [0, 1]: with two values far apart the t interval is wider than that)."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return Stat.missing("no values", 0)
    m = float(x.mean())
    if n < 2:
        return Stat(m, None, None, n)
    half = float(_t_ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n))
    low, high = m - half, m + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Stat(m, low, high, n)


def mean_ci_moments(n: int, total: float, total_sq: float) -> Stat:
    """The same t interval as ``mean_ci``, from a count, a sum and a sum of squares (what
    SQL aggregates return)."""
    if n <= 0:
        return Stat.missing("no values", 0)
    m = total / n
    if n < 2:
        return Stat(m, None, None, n)
    var = max(0.0, (total_sq - n * m * m) / (n - 1))
    half = float(_t_ppf(0.975, n - 1) * math.sqrt(var) / math.sqrt(n))
    return Stat(m, m - half, m + half, n)


# --------------------------------------------------------------------------- confusion


@dataclass(frozen=True)
class Confusion:
    """A confusion matrix: rows = reference, columns = rater, in ``labels`` order."""

    labels: tuple[str, ...]
    matrix: tuple[tuple[int, ...], ...]

    @property
    def n(self) -> int:
        return sum(sum(r) for r in self.matrix)


def confusion(reference: Sequence[Hashable], rater: Sequence[Hashable],
              labels: Sequence[str] | None = None) -> Confusion:
    if len(reference) != len(rater):
        raise ValueError("reference and rater must have the same length")
    labs = tuple(labels) if labels is not None else tuple(
        sorted({str(v) for v in reference} | {str(v) for v in rater}))
    index = {lab: i for i, lab in enumerate(labs)}
    m = [[0] * len(labs) for _ in labs]
    for r, a in zip(reference, rater, strict=True):
        if str(r) in index and str(a) in index:
            m[index[str(r)]][index[str(a)]] += 1
    return Confusion(labs, tuple(tuple(row) for row in m))


@dataclass(frozen=True)
class Accuracy:
    """Binary accuracy of a rater against a reference, for one positive class."""

    positive: str
    tp: int
    fp: int
    fn: int
    tn: int
    sensitivity: Stat
    specificity: Stat
    ppv: Stat
    npv: Stat


def binary_accuracy(reference: Sequence[str], rater: Sequence[str], positive: str,
                    ) -> Accuracy:
    """Sensitivity, specificity, PPV, NPV (Wilson CIs); anything not ``positive`` counts
    as negative (one-vs-rest)."""
    if len(reference) != len(rater):
        raise ValueError("reference and rater must have the same length")
    tp = fp = fn = tn = 0
    for r, a in zip(reference, rater, strict=True):
        rp, ap = r == positive, a == positive
        if rp and ap:
            tp += 1
        elif ap:
            fp += 1
        elif rp:
            fn += 1
        else:
            tn += 1
    return accuracy_from_counts(positive, tp, fp, fn, tn)


def accuracy_from_counts(positive: str, tp: int, fp: int, fn: int, tn: int) -> Accuracy:
    def prop(k: int, n: int, what: str) -> Stat:
        return wilson(k, n) if n else Stat.missing(what)

    return Accuracy(
        positive, tp, fp, fn, tn,
        sensitivity=prop(tp, tp + fn, f"no reference positives ({positive})"),
        specificity=prop(tn, tn + fp, f"no reference negatives (not {positive})"),
        ppv=prop(tp, tp + fp, f"the rater never called {positive}"),
        npv=prop(tn, tn + fn, f"the rater always called {positive}"),
    )


# --------------------------------------------------------------------------- kappa


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> Stat:
    """Cohen's kappa between two raters over the same cases, with a 95% CI."""
    if len(a) != len(b):
        raise ValueError("both raters must rate the same cases")
    n = len(a)
    if n < 2:
        return Stat.missing("fewer than 2 cases rated by both", n)
    both = np.array([str(x) for x in a] + [str(y) for y in b])
    labels, codes = np.unique(both, return_inverse=True)
    return cohen_kappa_codes(codes[:n], codes[n:], len(labels))


def cohen_kappa_codes(a: NDArray[np.integer], b: NDArray[np.integer], k: int) -> Stat:
    """Cohen's kappa of two raters given as class codes 0..k-1 (the vectorised core)."""
    n = int(a.size)
    if n < 2:
        return Stat.missing("fewer than 2 cases rated by both", n)
    m = np.bincount(a * k + b, minlength=k * k).reshape(k, k).astype(float)
    return cohen_kappa_table(m)


def cohen_kappa_table(m: NDArray[np.floating]) -> Stat:
    """Cohen's kappa from a k x k table of counts (rows rater A, columns rater B)."""
    n = int(m.sum())
    k = m.shape[0]
    if n < 2:
        return Stat.missing("fewer than 2 cases rated by both", n)
    p = m / n
    po = float(np.trace(p))
    rows, cols = p.sum(axis=1), p.sum(axis=0)
    pe = float(rows @ cols)
    if pe >= 1.0 - 1e-12:
        return Stat.missing("both raters gave one and the same class to every case "
                            "(chance agreement is 1)", n)
    kappa = (po - pe) / (1 - pe)
    # Fleiss, Cohen & Everitt (1969) large-sample variance
    diag = sum(p[i, i] * (1 - (rows[i] + cols[i]) * (1 - kappa)) ** 2 for i in range(k))
    off = (1 - kappa) ** 2 * sum(p[i, j] * (cols[i] + rows[j]) ** 2
                                 for i in range(k) for j in range(k) if i != j)
    last = (kappa - pe * (1 - kappa)) ** 2
    var = (diag + off - last) / (n * (1 - pe) ** 2)
    if not var > 1e-12:
        return Stat(kappa, None, None, n, "no confidence interval: the asymptotic variance "
                    "is not positive for so few or so uniform ratings")
    se = math.sqrt(var)
    return Stat(kappa, max(-1.0, kappa - Z95 * se), min(1.0, kappa + Z95 * se), n)


def fleiss_table(ratings: Sequence[Sequence[Hashable]],
                 labels: Sequence[str] | None = None) -> tuple[NDArray[np.int64], list[str]]:
    """Subjects x categories counts from each subject's list of ratings."""
    labs = list(labels) if labels is not None else sorted(
        {str(r) for subject in ratings for r in subject})
    index = {lab: i for i, lab in enumerate(labs)}
    table = np.zeros((len(ratings), len(labs)), dtype=np.int64)
    for s, subject in enumerate(ratings):
        for r in subject:
            table[s, index[str(r)]] += 1
    return table, labs


def _fleiss_value(table: NDArray[np.float64]) -> float:
    n_sub = table.shape[0]
    m = table.sum(axis=1)[0]
    p_j = table.sum(axis=0) / (n_sub * m)
    p_i = ((table * table).sum(axis=1) - m) / (m * (m - 1))
    p_bar = p_i.mean()
    pe = float((p_j * p_j).sum())
    return float((p_bar - pe) / (1 - pe))


def fleiss_kappa(table: ArrayLike) -> Stat:
    """Fleiss' kappa from a subjects x categories count table (same number of ratings per
    subject, at least 2), with a jackknife 95% CI over subjects (each subject left out in
    turn; the leave-one-out values are computed from totals, so this is O(subjects))."""
    t = np.asarray(table, dtype=float)
    if t.ndim != 2 or t.shape[0] < 2:
        return Stat.missing("fewer than 2 subjects", int(t.shape[0]) if t.ndim == 2 else 0)
    per = t.sum(axis=1)
    if not np.all(per == per[0]):
        raise ValueError("every subject must have the same number of ratings")
    if per[0] < 2:
        return Stat.missing("fewer than 2 ratings per subject", t.shape[0])
    p_j = t.sum(axis=0) / t.sum()
    if float((p_j * p_j).sum()) >= 1.0 - 1e-12:
        return Stat.missing("every rating is the same class (chance agreement is 1)",
                            t.shape[0])
    value = _fleiss_value(t)
    n = t.shape[0]
    m = per[0]
    p_subject = ((t * t).sum(axis=1) - m) / (m * (m - 1))
    rest_p = (p_subject.sum() - p_subject) / (n - 1)  # mean agreement without subject i
    rest_counts = t.sum(axis=0)[None, :] - t  # category totals without subject i
    rest_pj = rest_counts / ((n - 1) * m)
    rest_pe = (rest_pj * rest_pj).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        loo = (rest_p - rest_pe) / (1 - rest_pe)
    if not np.all(np.isfinite(loo)):
        return Stat(value, None, None, n, "no confidence interval: leaving one subject out "
                    "leaves a single category")
    se = math.sqrt((n - 1) / n * float(((loo - loo.mean()) ** 2).sum()))
    return Stat(value, max(-1.0, value - Z95 * se), min(1.0, value + Z95 * se), n)


# --------------------------------------------------------------------------- ROC


def roc_auc(truth: Sequence[bool] | ArrayLike, scores: ArrayLike) -> Stat:
    """Area under the ROC curve (Mann-Whitney, ties = 1/2) with a Hanley-McNeil 95% CI."""
    y = np.asarray(truth, dtype=bool)
    s = np.asarray(scores, dtype=float)
    if y.shape != s.shape:
        raise ValueError("truth and scores must have the same length")
    keep = np.isfinite(s)
    y, s = y[keep], s[keep]
    n1 = int(y.sum())
    n0 = int(y.size - n1)
    if n1 == 0 or n0 == 0:
        return Stat.missing("the reference has only one class (no positives or no "
                            "negatives)", int(y.size))
    ranks = _rankdata(s)  # average ranks for ties
    auc = float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))
    q1 = auc / (2 - auc)
    q2 = 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n1 - 1) * (q1 - auc * auc) + (n0 - 1) * (q2 - auc * auc)) / (
        n1 * n0)
    se = math.sqrt(max(0.0, var))
    return Stat(auc, max(0.0, auc - Z95 * se), min(1.0, auc + Z95 * se), int(y.size))


# --------------------------------------------------------------------------- masks, volumes


def dice(a: ArrayLike, b: ArrayLike) -> Stat:
    """Dice similarity of two binary masks of the same shape."""
    x = np.asarray(a, dtype=bool)
    y = np.asarray(b, dtype=bool)
    if x.shape != y.shape:
        raise ValueError(f"mask shapes differ: {x.shape} vs {y.shape}")
    total = int(x.sum()) + int(y.sum())
    if total == 0:
        return Stat.missing("both masks are empty (Dice is undefined)")
    return Stat(2.0 * int(np.logical_and(x, y).sum()) / total, n=int(x.size))


@dataclass(frozen=True)
class BlandAltman:
    bias: Stat
    sd: float
    lower: Stat  # lower limit of agreement
    upper: Stat


def bland_altman(a: ArrayLike, b: ArrayLike) -> BlandAltman | Stat:
    """Bias and 95% limits of agreement of method a against method b (a - b)."""
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError("both methods must measure the same cases")
    d = x - y
    d = d[np.isfinite(d)]
    n = int(d.size)
    if n < 3:
        return Stat.missing("fewer than 3 paired measurements", n)
    bias = float(d.mean())
    sd = float(d.std(ddof=1))
    t = float(_t_ppf(0.975, n - 1))
    se_bias = sd / math.sqrt(n)
    se_loa = sd * math.sqrt(3.0 / n)
    lo, hi = bias - Z95 * sd, bias + Z95 * sd
    return BlandAltman(
        bias=Stat(bias, bias - t * se_bias, bias + t * se_bias, n),
        sd=sd,
        lower=Stat(lo, lo - t * se_loa, lo + t * se_loa, n),
        upper=Stat(hi, hi - t * se_loa, hi + t * se_loa, n),
    )


# --------------------------------------------------------------------------- drift


def psi(expected: ArrayLike, actual: ArrayLike, *, floor: float = 1e-4) -> float:
    """Population stability index of two distributions over the same bins (counts or
    proportions): sum((a - e) * ln(a / e)). Empty bins are floored at ``floor`` so one
    new category gives a large but finite value."""
    e = np.asarray(expected, dtype=float)
    a = np.asarray(actual, dtype=float)
    if e.shape != a.shape or e.ndim != 1:
        raise ValueError("expected and actual must be 1-D over the same bins")
    if e.sum() <= 0 or a.sum() <= 0:
        raise ValueError("both distributions need at least one observation")
    e = np.maximum(e / e.sum(), floor)
    a = np.maximum(a / a.sum(), floor)
    return float(((a - e) * np.log(a / e)).sum())
