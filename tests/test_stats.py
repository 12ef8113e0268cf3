"""lvm_ray.stats: Fisher z, DeLong (fast midrank vs the O(m*n) definition), Wilson, binary calls."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as st
from sklearn.metrics import roc_auc_score

from lvm_ray import stats


def _direct_delong(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong et al. 1988 by definition: psi(X_i, Y_j) over all positive/negative pairs."""
    scores = np.atleast_2d(scores)
    pos, neg = scores[:, y], scores[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    psi = (pos[:, :, None] > neg[:, None, :]).astype(float) + 0.5 * (pos[:, :, None] == neg[:, None, :])
    v10 = psi.mean(axis=2)  # [k, m]
    v01 = psi.mean(axis=1)  # [k, n]
    auc = v10.mean(axis=1)
    k = scores.shape[0]
    s10 = np.array([[np.sum((v10[a] - auc[a]) * (v10[b] - auc[b])) / (m - 1) for b in range(k)] for a in range(k)])
    s01 = np.array([[np.sum((v01[a] - auc[a]) * (v01[b] - auc[b])) / (n - 1) for b in range(k)] for a in range(k)])
    return auc, s10 / m + s01 / n


@pytest.fixture(scope="module")
def correlated_scores() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    n = 400
    y = rng.random(n) < 0.2
    latent = rng.normal(size=n) + 1.0 * y
    a = latent + rng.normal(scale=0.5, size=n)
    b = latent + rng.normal(scale=1.5, size=n)
    # Rounding makes ties, the case where midranks matter; a 0/1 flag is the extreme of it.
    c = (b > 1.0).astype(float)
    return y, np.vstack([np.round(a, 1), np.round(b, 0), c])


def test_fisher_z_reproduces_published_intervals() -> None:
    lo, hi = stats.fisher_z_ci(0.843, 891)
    assert (round(lo, 3), round(hi, 3)) == (0.823, 0.861)
    lo, hi = stats.fisher_z_ci(0.795, 891)
    assert (round(lo, 3), round(hi, 3)) == (0.770, 0.818)


def test_pearson_r_ci_matches_scipy_and_drops_missing() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=300)
    y = 0.8 * x + rng.normal(scale=0.6, size=300)
    x_missing = x.copy()
    x_missing[:10] = np.nan
    r, (lo, hi), n = stats.pearson_r_ci(x_missing, y)
    assert n == 290
    assert r == pytest.approx(st.pearsonr(x[10:], y[10:])[0], abs=1e-12)
    assert lo < r < hi
    assert stats.fisher_z_ci(r, n) == pytest.approx((lo, hi))


def test_mae_and_bland_altman() -> None:
    pred = np.array([100.0, 110.0, 90.0, 80.0, np.nan])
    ref = np.array([95.0, 100.0, 100.0, 80.0, 70.0])
    assert stats.mae(pred, ref) == pytest.approx((5 + 10 + 10 + 0) / 4)
    ba = stats.bland_altman(pred, ref)
    diffs = np.array([5.0, 10.0, -10.0, 0.0])
    assert ba["n"] == 4
    assert ba["mean_diff"] == pytest.approx(diffs.mean())
    assert ba["loa_upper"] - ba["mean_diff"] == pytest.approx(1.959964 * diffs.std(ddof=1), rel=1e-6)
    assert ba["mean_diff"] - ba["loa_lower"] == pytest.approx(ba["loa_upper"] - ba["mean_diff"])


def test_fast_delong_equals_direct_structural_components(correlated_scores) -> None:
    y, scores = correlated_scores
    auc_fast, cov_fast = stats.delong_covariance(y, scores)
    auc_direct, cov_direct = _direct_delong(y, scores)
    np.testing.assert_allclose(auc_fast, auc_direct, rtol=0, atol=1e-12)
    np.testing.assert_allclose(cov_fast, cov_direct, rtol=1e-10, atol=1e-15)
    # Components themselves, one by one.
    _, v10, v01 = stats.delong_components(y, scores[0])
    pos, neg = scores[0][y], scores[0][~y]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    np.testing.assert_allclose(v10[0], psi.mean(axis=1), atol=1e-12)
    np.testing.assert_allclose(v01[0], psi.mean(axis=0), atol=1e-12)


def test_auc_matches_sklearn(correlated_scores) -> None:
    y, scores = correlated_scores
    for s in scores:
        auc, var = stats.delong_roc_variance(y, s)
        assert auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert var > 0


def test_auroc_matches_sklearn_with_ties_and_is_nan_for_one_class(correlated_scores) -> None:
    y, scores = correlated_scores
    for s in scores:  # rounded scores and a 0/1 flag: ties count 1/2
        assert stats.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert stats.auroc(y.astype(float), -scores[0]) == pytest.approx(1 - roc_auc_score(y, scores[0]), abs=1e-12)
    assert np.isnan(stats.auroc(np.ones(5, dtype=bool), np.arange(5.0)))
    assert np.isnan(stats.auroc(np.zeros(5), np.arange(5.0)))
    with pytest.raises(ValueError, match="scores for"):
        stats.auroc(y, scores[0][:-1])


def test_delong_variance_is_undefined_with_a_single_positive_or_negative() -> None:
    y = np.array([True, False, False, False, False])
    # The AUC exists (0.75 here) but one positive gives no sample variance of its components.
    auc, var = stats.delong_roc_variance(y, np.array([3.0, 1.0, 2.0, 4.0, 0.0]))
    assert auc == pytest.approx(0.75) and np.isnan(var)
    for labels in (y, ~y):
        res = stats.auc_ci(labels, np.array([5.0, 1.0, 2.0, 3.0, 4.0]))
        assert np.isfinite(res["auc"]) and np.isnan(res["se"]) and np.isnan(res["ci"]).all()
        test = stats.delong_paired_test(labels, np.arange(5.0), np.array([0.0, 4.0, 3.0, 2.0, 1.0]))
        assert np.isfinite(test["diff"]) and np.isnan(test["z"]) and np.isnan(test["p"])


def test_paired_delong_with_zero_se_but_different_aucs_is_nan_not_p_one() -> None:
    y = np.array([False, False, False, True, True, True])
    perfect, reversed_ = np.arange(6.0), -np.arange(6.0)
    res = stats.delong_paired_test(y, perfect, reversed_)
    # AUC 1 against AUC 0: every structural component is constant, so the SE is 0.
    assert res["diff"] == pytest.approx(1.0) and res["se_diff"] == 0.0
    assert np.isnan(res["z"]) and np.isnan(res["p"])
    same = stats.delong_paired_test(y, perfect, 2 * perfect)  # same ranking, same AUC: nothing to test
    assert same["z"] == 0.0 and same["p"] == 1.0


def test_auc_ci_plain_is_symmetric_and_logit_stays_inside(correlated_scores) -> None:
    y, scores = correlated_scores
    plain = stats.auc_ci(y, scores[0])
    auc, var = stats.delong_roc_variance(y, scores[0])
    se = np.sqrt(var)
    assert plain["auc"] == pytest.approx(auc)
    assert plain["ci"] == pytest.approx([auc - 1.959964 * se, auc + 1.959964 * se], abs=1e-6)
    logit = stats.auc_ci(y, scores[0], method="logit")
    assert 0 < logit["ci"][0] < auc < logit["ci"][1] < 1
    # Near-perfect separation: the plain CI is clipped at 1, the logit one never reaches it.
    yy = np.array([0] * 50 + [1] * 50, dtype=bool)
    ss = np.r_[np.arange(50), np.arange(49, 99)].astype(float)
    assert stats.auc_ci(yy, ss)["ci"][1] <= 1.0
    assert stats.auc_ci(yy, ss, method="logit")["ci"][1] < 1.0
    # A single class: NaN, not an exception.
    assert np.isnan(stats.auc_ci(np.zeros(10, dtype=bool), np.arange(10.0))["auc"])


def test_paired_delong_test(correlated_scores) -> None:
    y, scores = correlated_scores
    res = stats.delong_paired_test(y, scores[0], scores[1])
    auc, cov = _direct_delong(y, scores[:2])
    z = (auc[0] - auc[1]) / np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert res["z"] == pytest.approx(z, rel=1e-9)
    assert res["p"] == pytest.approx(2 * st.norm.sf(abs(z)), rel=1e-9)
    assert res["auc_a"] > res["auc_b"] and res["p"] < 0.05  # the less noisy score wins clearly
    # Identical scores: nothing to test.
    same = stats.delong_paired_test(y, scores[0], scores[0])
    assert same["p"] == 1.0 and same["z"] == 0.0
    # Antisymmetric in its arguments.
    swapped = stats.delong_paired_test(y, scores[1], scores[0])
    assert swapped["z"] == pytest.approx(-res["z"]) and swapped["p"] == pytest.approx(res["p"])


def test_paired_delong_calibrated_under_null() -> None:
    """Two equally good, correlated scores: the test rejects about 5% of the time."""
    rng = np.random.default_rng(3)
    rejections = 0
    trials = 300
    for _ in range(trials):
        n = 150
        y = rng.random(n) < 0.3
        shared = rng.normal(size=n) + 0.8 * y
        a = shared + rng.normal(size=n)
        b = shared + rng.normal(size=n)
        rejections += stats.delong_paired_test(y, a, b)["p"] < 0.05
    assert 0.015 <= rejections / trials <= 0.10


def test_delong_ci_coverage() -> None:
    """95% DeLong CIs cover the true AUC of a binormal model in about 95% of samples."""
    rng = np.random.default_rng(11)
    true_auc = st.norm.cdf(1.0 / np.sqrt(2))  # binormal, separation 1, unit variances
    covered = 0
    trials = 300
    for _ in range(trials):
        y = rng.random(200) < 0.25
        s = rng.normal(size=200) + 1.0 * y
        lo, hi = stats.auc_ci(y, s)["ci"]
        covered += lo <= true_auc <= hi
    assert 0.90 <= covered / trials <= 0.985


def test_wilson_ci_known_values() -> None:
    # Wilson (1927) interval for 8/10: 0.4902 - 0.9433 (textbook value, e.g. Newcombe 1998).
    lo, hi = stats.wilson_ci(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    lo, hi = stats.wilson_ci(0, 20)
    assert lo == 0.0 and 0 < hi < 0.2
    assert np.isnan(stats.wilson_ci(0, 0)[0])


def test_binary_call_metrics_and_auc_of_a_flag() -> None:
    y = np.array([1] * 20 + [0] * 80, dtype=bool)
    call = np.zeros(100, dtype=bool)
    call[:5] = True  # 5 true positives of 20
    call[20:24] = True  # 4 false positives of 80
    m = stats.binary_call_metrics(y, call)
    assert (m.tp, m.fn, m.fp, m.tn) == (5, 15, 4, 76)
    assert m.sensitivity == pytest.approx(0.25)
    assert m.specificity == pytest.approx(0.95)
    assert m.ppv == pytest.approx(5 / 9)
    assert m.npv == pytest.approx(76 / 91)
    assert m.auc == pytest.approx((0.25 + 0.95) / 2)
    # The AUC of the 0/1 flag (DeLong, sklearn) is the same number: DeLong on the flag is right.
    assert stats.delong_roc_variance(y, call.astype(float))[0] == pytest.approx(m.auc)
    assert roc_auc_score(y, call) == pytest.approx(m.auc)
    d = m.to_dict()
    assert d["sensitivity_ci"][0] < 0.25 < d["sensitivity_ci"][1]


def test_cumulative_incidence_matches_lifelines() -> None:
    from lifelines import AalenJohansenFitter, KaplanMeierFitter

    rng = np.random.default_rng(2)
    n = 500
    t_event = rng.exponential(5, n)
    t_compete = rng.exponential(8, n)
    t_censor = rng.uniform(0, 10, n)
    time = np.minimum.reduce([t_event, t_compete, t_censor])
    event = t_event == time
    competing = t_compete == time
    # No competing risk: 1 - Kaplan-Meier.
    times, cif, _ = stats.cumulative_incidence(time, event)
    km = KaplanMeierFitter().fit(time, event)
    expected = 1 - km.survival_function_at_times(times).to_numpy()
    np.testing.assert_allclose(cif, expected, atol=1e-12)
    # With a competing risk: Aalen-Johansen (continuous times, so lifelines needs no jitter).
    times, cif, _ = stats.cumulative_incidence(time, event, competing)
    codes = np.where(event, 1, np.where(competing, 2, 0))
    aj = AalenJohansenFitter(calculate_variance=False).fit(time, codes, event_of_interest=1)
    ref = aj.cumulative_density_.iloc[:, 0]
    expected = ref.reindex(times, method="ffill").to_numpy()
    np.testing.assert_allclose(cif, expected, atol=1e-12)
    assert cif[-1] < (1 - km.survival_function_.iloc[-1, 0])  # competing deaths lower the incidence
