"""lvm_ray.conformal: the finite-sample quantile rule by hand, the regression against brute force,
payload round trips, and coverage and calibration by simulation where the truth is known."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import statsmodels.api as sm
import torch

from lvm_ray.conformal import (
    POOLED,
    Calibration,
    CalibrationError,
    conformal_bounds,
    conformal_ranks,
    exceedance,
    fit_calibration,
    min_calibration_size,
)

THRESHOLDS = {"M": 72.0, "F": 55.0}


def test_ranks_follow_the_n_plus_one_rule() -> None:
    # n = 99, 90%: k_lo = floor(100 * 0.05) = 5, k_hi = ceil(100 * 0.95) = 95.
    assert conformal_ranks(99, 0.9) == (5, 95)
    # n = 19 is the smallest n with a bounded 90% interval: 20 * 0.95 = 19 exactly (not 19.000000000000004).
    assert conformal_ranks(19, 0.9) == (1, 19)
    # n = 18: floor(19 * 0.05) = 0 and ceil(19 * 0.95) = ceil(18.05) = 19 = n + 1: both sides unbounded.
    assert conformal_ranks(18, 0.9) == (0, 19)
    # a = 0.2: k_lo = floor(101 * 0.1) = floor(10.1) = 10; k_hi = ceil(101 * 0.9) = ceil(90.9) = 91.
    assert conformal_ranks(100, 0.8) == (10, 91)
    assert min_calibration_size(0.9) == 19 and min_calibration_size(0.8) == 9 and min_calibration_size(0.5) == 3


def test_bounds_and_exceedance_on_a_small_array_by_hand() -> None:
    scores = np.sort(np.array([0.3, -0.1, 0.05, 0.2, -0.25, 0.0, 0.12, -0.05, 0.08, 0.15]))
    # n = 10, level 0.5: k_lo = floor(11 * 0.25) = 2, k_hi = ceil(11 * 0.75) = 9 -> 2nd and 9th smallest.
    assert conformal_bounds(scores, 0.5) == (-0.1, 0.2)
    assert all(math.isnan(v) for v in conformal_bounds(scores, 0.9))  # 10 < 19 scores
    # P(score > 0.1): 4 of the 10 scores exceed it -> (4 + 1/2) / 11.
    assert exceedance(scores, np.array([0.1]))[0] == pytest.approx(4.5 / 11)
    assert exceedance(scores, np.array([10.0]))[0] == pytest.approx(0.5 / 11)
    assert np.isnan(exceedance(scores, np.array([np.nan]))[0])


def test_plain_log_ratio_intervals_are_the_hand_computed_quantiles() -> None:
    rng = np.random.default_rng(1)
    n = 39  # per sex: 90% -> k_lo = floor(40 * 0.05) = 2, k_hi = ceil(40 * 0.95) = 38
    pred = rng.uniform(60, 160, 2 * n)
    true = pred * np.exp(rng.normal(0.05, 0.12, 2 * n))
    sex = np.array(["M"] * n + ["F"] * n, dtype=object)
    cal = fit_calibration(pred, true, sex, regression=False)
    for s in ("M", "F"):
        ratios = np.sort(np.log(true[sex == s] / pred[sex == s]))
        out = cal.predict([100.0], [s], level=0.9)
        assert out["lo"][0] == pytest.approx(100.0 * np.exp(ratios[1]))
        assert out["hi"][0] == pytest.approx(100.0 * np.exp(ratios[37]))
    # Unknown sex: the pooled 78 scores (k = floor(79 * 0.05) = 3, ceil(79 * 0.95) = 76).
    pooled = np.sort(np.log(true / pred))
    out = cal.predict([100.0], [None])
    assert out["lo"][0] == pytest.approx(100 * np.exp(pooled[2])) and out["hi"][0] == pytest.approx(
        100 * np.exp(pooled[75])
    )
    # P(LVMI > 72) for a man with BSA 2 and prediction 140: P(log ratio > log(144 / 140)).
    p = cal.predict([140.0], ["M"], [2.0], THRESHOLDS)["lvh_prob"][0]
    ratios = np.sort(np.log(true[sex == "M"] / pred[sex == "M"]))
    assert p == pytest.approx(((ratios > math.log(144 / 140)).sum() + 0.5) / (n + 1))


def test_regression_coefficients_and_leave_one_out_residuals_against_brute_force() -> None:
    rng = np.random.default_rng(2)
    n = 40
    bsa = rng.normal(1.9, 0.2, n)
    pred = rng.uniform(70, 150, n)
    true = np.exp(0.3 + 0.9 * np.log(pred) + 0.4 * np.log(bsa) + rng.normal(0, 0.1, n))
    cal = fit_calibration(pred, true, ["F"] * n, bsa)
    group = cal.groups["F"]
    x = np.column_stack([np.ones(n), np.log(pred), np.log(bsa)])
    coef = np.linalg.lstsq(x, np.log(true), rcond=None)[0]
    np.testing.assert_allclose(group.coef, coef, rtol=1e-10)
    loo = []
    for i in range(n):  # refit without ECG i, predict it
        keep = np.arange(n) != i
        beta = np.linalg.lstsq(x[keep], np.log(true[keep]), rcond=None)[0]
        loo.append(np.log(true[i]) - x[i] @ beta)
    np.testing.assert_allclose(group.residuals, np.sort(loo), rtol=1e-9, atol=1e-12)
    q_lo, q_hi = np.sort(loo)[1], np.sort(loo)[38]  # n = 40, 90%: ranks 2 and 39
    out = cal.predict([100.0, 100.0], ["F", "F"], [2.0, np.nan], level=0.9)
    centre = coef @ [1.0, math.log(100.0), math.log(2.0)]
    assert out["lo"][0] == pytest.approx(math.exp(centre + q_lo)) and out["hi"][0] == pytest.approx(
        math.exp(centre + q_hi)
    )
    ratios = np.sort(np.log(true / pred))
    assert out["lo"][1] == pytest.approx(100 * math.exp(ratios[1]))  # no BSA: the plain log ratios
    assert np.isnan(cal.predict([100.0], ["F"], [np.nan], THRESHOLDS)["lvh_prob"][0])  # no BSA, no LVMI


def test_too_few_rows_or_no_spread_skip_the_regression_and_small_groups_get_nulls() -> None:
    rng = np.random.default_rng(3)
    pred = rng.uniform(70, 150, 25)
    cal = fit_calibration(pred, pred * 1.1, ["M"] * 25, np.full(25, 1.9))
    assert cal.groups["M"].coef is None and "30" in cal.groups["M"].note
    constant = fit_calibration(np.full(40, 90.0), rng.uniform(70, 150, 40), ["M"] * 40, rng.normal(1.9, 0.2, 40))
    assert constant.groups["M"].coef is None and "uniform" in constant.groups["M"].note
    few = fit_calibration(pred[:10], pred[:10], ["F"] * 10)
    out = few.predict([100.0, 100.0], ["F", "M"], level=0.9)
    assert np.isnan(out["lo"]).all()  # 10 scores < 19 for women; no scores at all for men
    assert not np.isnan(few.predict([100.0], ["F"], level=0.5)["lo"][0])


def test_bad_input_gives_one_line_errors() -> None:
    with pytest.raises(CalibrationError, match="between 0 and 1"):
        fit_calibration([100.0], [100.0], ["M"], level=1.5)
    with pytest.raises(CalibrationError, match="no ECG with both"):
        fit_calibration([np.nan, 100.0], [120.0, np.nan], ["M", "F"])
    with pytest.raises(CalibrationError, match="2 predictions but 1"):
        fit_calibration([1.0, 2.0], [1.0], ["M", "F"])
    cal = fit_calibration(np.full(30, 100.0), np.linspace(80, 120, 30), ["M"] * 30)
    with pytest.raises(CalibrationError, match="between 0 and 1"):
        cal.predict([100.0], ["M"], level=0.0)
    with pytest.raises(CalibrationError, match="not an lvm-ray calibration"):
        Calibration.from_payload({"format": "something else"})


def test_payload_survives_a_weights_only_torch_round_trip() -> None:
    rng = np.random.default_rng(4)
    n = 200
    pred, bsa = rng.uniform(60, 160, n), rng.normal(1.9, 0.2, n)
    true = pred * np.exp(rng.normal(0, 0.12, n))
    sex = rng.choice(["M", "F", None], n)
    cal = fit_calibration(pred, true, sex, bsa, provenance={"data": "memory://x", "split": "val"})
    buffer = io.BytesIO()
    torch.save({"calibration": cal.to_payload()}, buffer)
    back = Calibration.from_payload(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)["calibration"])
    assert back.identity == cal.identity and back.level == 0.9
    assert back.provenance["data"] == "memory://x" and back.provenance["n_ecgs"] == n
    assert set(back.groups) == {"M", "F", POOLED} and back.groups[POOLED].n == n
    args = (pred[:20], sex[:20], bsa[:20], THRESHOLDS, 0.8)
    for key, values in cal.predict(*args).items():
        np.testing.assert_array_equal(values, back.predict(*args)[key], err_msg=key)
    assert cal.summary()["n"] == {name: g.n for name, g in cal.groups.items()}


def _cohort(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """A model with the faults of an ECG-only network: sex bias, errors growing with the mass and
    correlated with BSA (it cannot see body size), shrinkage to the mean."""
    male = rng.random(n) < 0.5
    bsa = np.where(male, rng.normal(2.0, 0.16, n), rng.normal(1.75, 0.14, n))
    true = np.exp(np.log(np.where(male, 105.0, 75.0)) + 1.1 * np.log(bsa / 1.9) + rng.normal(0, 0.15, n))
    log_pred = 0.7 * np.log(true) + 0.3 * np.log(90.0) - 0.35 * np.log(bsa / 1.9) + rng.normal(0, 0.1, n)
    pred = np.exp(log_pred) * np.where(male, 0.95, 1.04)
    sex = np.where(male, "M", "F").astype(object)
    return {"pred": pred, "true": true, "sex": sex, "bsa": bsa, "lvh": true / bsa > np.where(male, 72.0, 55.0)}


def test_average_coverage_equals_the_finite_sample_value() -> None:
    """Over many calibration sets of 39 per sex, mean coverage is (k_hi - k_lo) / (n + 1), in each sex."""
    rng = np.random.default_rng(5)
    n_per_sex, reps = 39, 400
    k_lo, k_hi = conformal_ranks(n_per_sex, 0.9)
    expected = (k_hi - k_lo) / (n_per_sex + 1)  # 36 / 40 = 0.9 exactly
    covered = {"M": [], "F": []}
    for _ in range(reps):
        cal = _cohort(rng, 6 * n_per_sex)
        keep = np.concatenate([np.flatnonzero(cal["sex"] == s)[:n_per_sex] for s in ("M", "F")])
        fitted = fit_calibration(cal["pred"][keep], cal["true"][keep], cal["sex"][keep], regression=False)
        test = _cohort(rng, 400)
        out = fitted.predict(test["pred"], test["sex"])
        inside = (out["lo"] <= test["true"]) & (test["true"] <= out["hi"])
        for s in covered:
            covered[s].append(inside[test["sex"] == s].mean())
    for s, values in covered.items():
        se = np.std(values) / math.sqrt(reps)
        assert abs(np.mean(values) - expected) < 4 * se, (s, np.mean(values), expected, se)


def test_simulated_cohort_coverage_by_sex_and_calibrated_lvh_probability() -> None:
    rng = np.random.default_rng(6)
    cal, test = _cohort(rng, 4000), _cohort(rng, 20000)
    fitted = fit_calibration(cal["pred"], cal["true"], cal["sex"], cal["bsa"])
    out = fitted.predict(test["pred"], test["sex"], test["bsa"], THRESHOLDS)
    inside = (out["lo"] <= test["true"]) & (test["true"] <= out["hi"])
    assert 0.88 <= inside.mean() <= 0.92
    for s in ("M", "F"):
        assert 0.87 <= inside[test["sex"] == s].mean() <= 0.93, s
    # Conditional on the size of the prediction too: the log ratio follows the growing error.
    tertile = np.digitize(test["pred"], np.quantile(test["pred"], [1 / 3, 2 / 3]))
    for t in range(3):
        assert 0.86 <= inside[tertile == t].mean() <= 0.94, t
    y, p = test["lvh"], out["lvh_prob"]
    assert np.mean((p - y) ** 2) < y.mean() * (1 - y.mean())  # better than the prevalence-only forecast
    logit = np.log(np.clip(p, 1e-6, 1 - 1e-6) / (1 - np.clip(p, 1e-6, 1 - 1e-6)))
    fit = sm.GLM(y.astype(float), sm.add_constant(logit), family=sm.families.Binomial()).fit()
    assert 0.85 <= fit.params[1] <= 1.15
    assert abs(p.mean() - y.mean()) < 0.01  # calibrated in the large
    # Without the BSA term, the probability is visibly worse calibrated (the network cannot see body size).
    plain = fit_calibration(cal["pred"], cal["true"], cal["sex"], regression=False)
    p_plain = plain.predict(test["pred"], test["sex"], test["bsa"], THRESHOLDS)["lvh_prob"]
    assert np.mean((p - y) ** 2) < np.mean((p_plain - y) ** 2)
