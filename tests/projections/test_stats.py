"""Every statistic against a reference implementation (scikit-learn, statsmodels, numpy),
on generated cases including the edge cases a governance board will meet."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import cohen_kappa_score, confusion_matrix, roc_auc_score
from statsmodels.stats.inter_rater import cohens_kappa as sm_cohens_kappa
from statsmodels.stats.inter_rater import fleiss_kappa as sm_fleiss_kappa
from statsmodels.stats.proportion import proportion_confint

from projections.stats import (
    BlandAltman,
    binary_accuracy,
    bland_altman,
    cohen_kappa,
    confusion,
    dice,
    fleiss_kappa,
    fleiss_table,
    mean_ci,
    mean_ci_moments,
    psi,
    roc_auc,
    wilson,
)

CLASSES = ("normal", "fracture", "hardware")
labels = st.sampled_from(CLASSES)


@st.composite
def two_raters(draw: st.DrawFn, min_size: int = 1) -> tuple[list[str], list[str]]:
    n = draw(st.integers(min_size, 60))
    return draw(st.lists(labels, min_size=n, max_size=n)), draw(
        st.lists(labels, min_size=n, max_size=n))


@settings(max_examples=200, deadline=None)
@given(two_raters())
def test_cohen_kappa_matches_sklearn_or_says_not_enough(pair: tuple[list[str], list[str]]
                                                        ) -> None:
    a, b = pair
    ours = cohen_kappa(a, b)
    if len(a) < 2:
        assert ours.value is None and "not enough data" in (ours.reason or "")
        return
    cats = sorted(set(a) | set(b))
    if len(cats) == 1:  # both raters always gave the same single class
        assert ours.value is None and "chance agreement is 1" in (ours.reason or "")
        return
    ref = cohen_kappa_score(a, b)
    assert ours.value == pytest.approx(ref, abs=1e-9)
    # the CI uses statsmodels' asymptotic standard error (Fleiss, Cohen & Everitt 1969)
    with np.errstate(invalid="ignore", divide="ignore"):
        sm = sm_cohens_kappa(confusion_matrix(a, b, labels=cats))
    if not sm.var_kappa > 1e-12:
        assert ours.low is None and ours.high is None and "no confidence interval" in (
            ours.reason or "")
        return
    assert ours.low is not None and ours.high is not None
    assert ours.low <= ours.value <= ours.high
    if ours.low > -1.0:
        assert ours.low == pytest.approx(max(-1.0, sm.kappa_low), abs=1e-9)
    if ours.high < 1.0:
        assert ours.high == pytest.approx(min(1.0, sm.kappa_upp), abs=1e-9)


def test_cohen_kappa_with_a_reader_who_always_says_the_same_class() -> None:
    ai = ["fracture", "normal", "normal", "fracture", "normal"]
    reader = ["normal"] * 5
    ours = cohen_kappa(ai, reader)
    assert ours.value == pytest.approx(cohen_kappa_score(ai, reader)) == 0.0


def test_cohen_kappa_single_case_is_not_enough_data() -> None:
    assert cohen_kappa(["fracture"], ["fracture"]).value is None


@st.composite
def rating_table(draw: st.DrawFn) -> np.ndarray:
    subjects = draw(st.integers(2, 40))
    raters = draw(st.integers(2, 6))
    cats = draw(st.integers(2, 4))
    rows = []
    for _ in range(subjects):
        cuts = sorted(draw(st.lists(st.integers(0, raters), min_size=cats - 1,
                                    max_size=cats - 1)))
        edges = [0, *cuts, raters]
        rows.append([edges[i + 1] - edges[i] for i in range(cats)])
    return np.array(rows)


@settings(max_examples=150, deadline=None)
@given(rating_table())
def test_fleiss_kappa_matches_statsmodels(table: np.ndarray) -> None:
    ours = fleiss_kappa(table)
    p = table.sum(axis=0) / table.sum()
    if (p * p).sum() >= 1 - 1e-12:
        assert ours.value is None and "chance agreement is 1" in (ours.reason or "")
        return
    assert ours.value == pytest.approx(sm_fleiss_kappa(table, method="fleiss"), abs=1e-9)
    assert ours.n == table.shape[0]
    if ours.low is None:
        assert "no confidence interval" in (ours.reason or "")
        return
    # the jackknife interval, against leave-one-out values from statsmodels itself
    with np.errstate(invalid="ignore", divide="ignore"):
        loo = np.array([sm_fleiss_kappa(np.delete(table, i, axis=0), method="fleiss")
                        for i in range(table.shape[0])])
    n = table.shape[0]
    se = math.sqrt((n - 1) / n * float(((loo - loo.mean()) ** 2).sum()))
    assert ours.low == pytest.approx(max(-1.0, ours.value - 1.959963984540054 * se), abs=1e-7)
    assert ours.high == pytest.approx(min(1.0, ours.value + 1.959963984540054 * se), abs=1e-7)


def test_fleiss_table_counts_each_subjects_ratings() -> None:
    table, labs = fleiss_table([["a", "a", "b"], ["b", "b", "b"]])
    assert labs == ["a", "b"]
    assert table.tolist() == [[2, 1], [0, 3]]
    assert fleiss_kappa([[3, 0]]).value is None  # a single subject


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 500), st.integers(0, 500))
def test_wilson_matches_statsmodels(k: int, extra: int) -> None:
    n = k + extra
    ours = wilson(k, n)
    if n == 0:
        assert ours.value is None
        return
    lo, hi = proportion_confint(k, n, method="wilson")
    assert ours.value == pytest.approx(k / n)
    assert ours.low == pytest.approx(lo, abs=1e-9)
    assert ours.high == pytest.approx(hi, abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(two_raters())
def test_accuracy_and_confusion_match_sklearn(pair: tuple[list[str], list[str]]) -> None:
    ref, rater = pair
    conf = confusion(ref, rater, CLASSES)
    assert np.array_equal(np.array(conf.matrix), confusion_matrix(ref, rater, labels=CLASSES))
    acc = binary_accuracy(ref, rater, "fracture")
    (tn, fp), (fn, tp) = confusion_matrix([r == "fracture" for r in ref],
                                          [r == "fracture" for r in rater],
                                          labels=[False, True])
    assert (acc.tp, acc.fp, acc.fn, acc.tn) == (tp, fp, fn, tn)
    for stat, k, n in ((acc.sensitivity, tp, tp + fn), (acc.specificity, tn, tn + fp),
                       (acc.ppv, tp, tp + fp), (acc.npv, tn, tn + fn)):
        if n == 0:
            assert stat.value is None and "not enough data" in (stat.reason or "")
        else:
            assert stat.value == pytest.approx(k / n)
            lo, hi = proportion_confint(k, n, method="wilson")
            assert (stat.low, stat.high) == (pytest.approx(lo), pytest.approx(hi))


def test_no_positives_gives_no_sensitivity() -> None:
    acc = binary_accuracy(["normal"] * 4, ["normal", "fracture", "normal", "normal"],
                          "fracture")
    assert acc.sensitivity.value is None and "no reference positives" in str(acc.sensitivity)
    assert acc.specificity.value == 0.75


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.7, 0.9, 1.0])),
                min_size=1, max_size=80))
def test_roc_auc_matches_sklearn(cases: list[tuple[bool, float]]) -> None:
    y = [c[0] for c in cases]
    s = [c[1] for c in cases]
    ours = roc_auc(y, s)
    if all(y) or not any(y):
        assert ours.value is None and "only one class" in (ours.reason or "")
        return
    assert ours.value == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert ours.low is not None and ours.high is not None
    assert 0.0 <= ours.low <= ours.value <= ours.high <= 1.0


masks = st.integers(1, 6).flatmap(
    lambda n: st.tuples(st.lists(st.booleans(), min_size=n * n, max_size=n * n),
                        st.lists(st.booleans(), min_size=n * n, max_size=n * n)))


@settings(max_examples=200, deadline=None)
@given(masks)
def test_dice_matches_numpy(pair: tuple[list[bool], list[bool]]) -> None:
    a, b = np.array(pair[0]), np.array(pair[1])
    ours = dice(a, b)
    if not a.any() and not b.any():
        assert ours.value is None and "both masks are empty" in (ours.reason or "")
        return
    assert ours.value == pytest.approx(2 * np.sum(a & b) / (np.sum(a) + np.sum(b)))


def test_dice_refuses_masks_of_different_shapes() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        dice(np.zeros((2, 2)), np.zeros((3, 3)))


finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=1, max_size=50))
def test_bland_altman_matches_numpy(pairs: list[tuple[float, float]]) -> None:
    a = np.array([p[0] for p in pairs])
    b = np.array([p[1] for p in pairs])
    ours = bland_altman(a, b)
    if len(pairs) < 3:
        assert not isinstance(ours, BlandAltman) and ours.value is None
        return
    assert isinstance(ours, BlandAltman)
    d = a - b
    sd = np.std(d, ddof=1)
    assert ours.bias.value == pytest.approx(np.mean(d), abs=1e-6)
    assert ours.sd == pytest.approx(sd, abs=1e-6)
    assert ours.lower.value == pytest.approx(np.mean(d) - 1.96 * sd, abs=1e-3 + 1e-3 * sd)
    assert ours.upper.value == pytest.approx(np.mean(d) + 1.96 * sd, abs=1e-3 + 1e-3 * sd)
    for s in (ours.bias, ours.lower, ours.upper):
        assert s.low is not None and s.high is not None and s.value is not None
        assert s.low <= s.value + 1e-9 and s.value <= s.high + 1e-9


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=0, max_size=30))
def test_mean_ci_from_sums_equals_mean_ci(values: list[int]) -> None:
    a = mean_ci(values)
    b = mean_ci_moments(len(values), sum(values), sum(v * v for v in values))
    assert (a.value, a.n) == (pytest.approx(b.value) if b.value is not None else None, b.n)
    if a.low is not None:
        assert (a.low, a.high) == (pytest.approx(b.low), pytest.approx(b.high))


def test_mean_ci_of_a_single_value_has_no_interval() -> None:
    one = mean_ci([4.0])
    assert one.value == 4.0 and one.low is None
    assert mean_ci([]).value is None
    m = mean_ci([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * np.std([1, 2, 3, 4], ddof=1) / 2  # t(0.975, 3)
    assert (m.low, m.high) == (pytest.approx(2.5 - half), pytest.approx(2.5 + half))


counts = st.lists(st.integers(0, 1000), min_size=2, max_size=8)


@settings(max_examples=200, deadline=None)
@given(counts, counts)
def test_psi_matches_the_formula_and_is_zero_for_equal_distributions(e: list[int],
                                                                    a: list[int]) -> None:
    n = min(len(e), len(a))
    e, a = e[:n], a[:n]
    if sum(e) == 0 or sum(a) == 0:
        with pytest.raises(ValueError):
            psi(e, a)
        return
    ep = np.maximum(np.array(e) / sum(e), 1e-4)
    ap = np.maximum(np.array(a) / sum(a), 1e-4)
    assert psi(e, a) == pytest.approx(float(np.sum((ap - ep) * np.log(ap / ep))))
    assert psi(e, a) >= 0
    assert psi(e, e) == pytest.approx(0.0, abs=1e-12)
    assert math.isfinite(psi([1, 0], [0, 1]))


def test_mean_ci_is_clipped_to_what_the_quantity_can_be() -> None:
    wide = mean_ci([0.1, 0.95])  # two Dice values far apart: the t interval leaves [0, 1]
    assert wide.low is not None and wide.high is not None
    assert wide.low < 0.0 and wide.high > 1.0
    dice = mean_ci([0.1, 0.95], bounds=(0.0, 1.0))
    assert (dice.low, dice.high) == (0.0, 1.0) and dice.value == wide.value
