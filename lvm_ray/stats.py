"""The statistics the LVM-AI paper reports (docs/method.md, "Statistics"). Pure numpy/scipy.

- Pearson r with a Fisher-z 95% CI, MAE, Bland-Altman agreement.
- ROC AUC (c-statistic) with its DeLong variance, computed by the fast midrank algorithm of
  Sun & Xu (IEEE Signal Process Lett 2014;21:1389-93), which is O(n log n) instead of the
  O(n_pos * n_neg) structural-component definition of DeLong, DeLong & Clarke-Pearson
  (Biometrics 1988;44:837-45). Several scores on the same cases give the full covariance, hence
  the paired DeLong test.
- Sensitivity, specificity, PPV and NPV of a binary call with Wilson score CIs.
- Cumulative incidence by Aalen-Johansen (death as a competing risk), 1 - Kaplan-Meier without one.

CIs for AUCs are "plain" (Wald on the AUC scale, AUC +- z * SE, clipped to [0, 1]) by default
because that is what the paper reports (its c-statistic CIs are symmetric: 0.653 (0.608-0.698))
and what pROC, the usual tool, gives. A logit-scale CI is available (``method="logit"``): it
stays inside (0, 1) and has better coverage near 1, so use it for strong classifiers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# scipy.special's normal quantile/tail and logistic (what scipy.stats.norm/logistic call, to the
# bit) rather than scipy.stats, which costs a Ray Train worker ~1 s to import for one auroc.
from scipy.special import expit, ndtr, ndtri

Z95 = float(ndtri(0.975))  # 1.959963984540054


def _finite_pairs(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"expected two 1-D arrays of equal length, got {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


# --------------------------------------------------------------------------------------------
# Agreement of a continuous prediction with its reference
# --------------------------------------------------------------------------------------------


def fisher_z_ci(r: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """CI of a Pearson correlation by Fisher's z: tanh(atanh(r) +- z / sqrt(n - 3))."""
    if n <= 3 or not np.isfinite(r):
        return (float("nan"), float("nan"))
    z = float(ndtri(0.5 + level / 2))
    # Clip so that r = +-1 gives a degenerate interval rather than inf arithmetic.
    centre = np.arctanh(np.clip(r, -1 + 1e-15, 1 - 1e-15))
    half = z / np.sqrt(n - 3)
    return (float(np.tanh(centre - half)), float(np.tanh(centre + half)))


def pearson_r_ci(x: Any, y: Any, level: float = 0.95) -> tuple[float, tuple[float, float], int]:
    """Pearson r between x and y (non-finite pairs dropped), its Fisher-z CI, and n used."""
    x, y = _finite_pairs(x, y)
    n = len(x)
    if n < 2 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan"), (float("nan"), float("nan")), n
    r = float(np.corrcoef(x, y)[0, 1])
    return r, fisher_z_ci(r, n, level), n


def mae(pred: Any, ref: Any) -> float:
    """Mean absolute error (non-finite pairs dropped)."""
    pred, ref = _finite_pairs(pred, ref)
    return float(np.mean(np.abs(pred - ref))) if len(pred) else float("nan")


def bland_altman(pred: Any, ref: Any) -> dict[str, float]:
    """Bland-Altman agreement: mean difference (pred - ref), its SD and 95% limits of agreement."""
    pred, ref = _finite_pairs(pred, ref)
    diff = pred - ref
    n = len(diff)
    if n < 2:
        nan = float("nan")
        return {"n": n, "mean_diff": nan, "sd_diff": nan, "loa_lower": nan, "loa_upper": nan}
    mean_diff = float(np.mean(diff))
    sd = float(np.std(diff, ddof=1))
    return {
        "n": n,
        "mean_diff": mean_diff,
        "sd_diff": sd,
        "loa_lower": mean_diff - Z95 * sd,
        "loa_upper": mean_diff + Z95 * sd,
    }


# --------------------------------------------------------------------------------------------
# ROC AUC and DeLong
# --------------------------------------------------------------------------------------------


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x with ties given their average rank (the 'midrank')."""
    from scipy.stats import rankdata

    return rankdata(x, method="average")


def _labels(y_true: Any) -> np.ndarray:
    y = np.asarray(y_true)
    if y.dtype == bool:
        return y
    values = np.asarray(y, dtype=float)
    if not np.all(np.isin(values, (0.0, 1.0))):
        raise ValueError("labels must be binary (0/1 or booleans) without missing values")
    return values == 1.0


def auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve by Mann-Whitney (ties count 1/2); NaN when a class is absent.

    The plain AUC of the training loop's validation metrics; :func:`auc_ci` adds the DeLong CI.
    """
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=float)
    if s.shape != y.shape:
        raise ValueError(f"{s.shape} scores for {y.shape} labels")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _midranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def delong_components(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fast DeLong (Sun & Xu 2014): AUCs and the structural components V10, V01.

    ``scores`` is [n] or [k, n] (k predictors on the same n cases). Returns (auc [k],
    v10 [k, m], v01 [k, n_neg]) where m = number of positives: V10_i is the fraction of
    negatives that positive i outranks (ties count 1/2), V01_j the fraction of positives that
    outrank negative j. By midranks, V10_i = (rank of X_i among all - rank among positives) / n_neg.
    """
    y = _labels(y_true)
    s = np.atleast_2d(np.asarray(scores, dtype=float))
    if s.shape[1] != len(y):
        raise ValueError(f"{s.shape[1]} scores for {len(y)} labels")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite (drop missing values first)")
    pos, neg = s[:, y], s[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    if m == 0 or n == 0:
        raise ValueError(f"need both classes: {m} positives, {n} negatives")
    k = s.shape[0]
    v10 = np.empty((k, m))
    v01 = np.empty((k, n))
    for r in range(k):
        tx = _midranks(pos[r])
        ty = _midranks(neg[r])
        tz = _midranks(np.concatenate([pos[r], neg[r]]))
        v10[r] = (tz[:m] - tx) / n
        v01[r] = 1.0 - (tz[m:] - ty) / m
    auc = v10.mean(axis=1)
    return auc, v10, v01


def delong_covariance(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """AUCs [k] and their DeLong covariance matrix [k, k]: S10/m + S01/n.

    With a single positive or a single negative the sample covariance of its structural
    components is undefined, and so is the DeLong covariance: it is NaN (not 0, which would
    claim a perfectly precise AUC).
    """
    auc, v10, v01 = delong_components(y_true, scores)
    m, n = v10.shape[1], v01.shape[1]
    if m < 2 or n < 2:
        return auc, np.full((len(auc), len(auc)), np.nan)
    # np.cov with a single row returns a 0-d array; atleast_2d keeps the [k, k] contract.
    return auc, np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n


def delong_roc_variance(y_true: Any, scores: Any) -> tuple[float, float]:
    """AUC of one score and its DeLong variance (NaN with a single positive or negative)."""
    auc, cov = delong_covariance(y_true, scores)
    return float(auc[0]), float(cov[0, 0])


def auc_ci(y_true: Any, scores: Any, level: float = 0.95, method: str = "plain") -> dict[str, Any]:
    """AUC with a DeLong CI. ``method``: 'plain' (AUC +- z SE, clipped; the paper's) or 'logit'.

    Returns {"auc", "ci": [lo, hi], "se", "n", "n_pos", "method"}; AUC and CI are NaN when a
    class is absent (no discrimination to measure); the CI and SE alone are NaN with a single
    positive or negative (the AUC is defined, its DeLong variance is not).
    """
    if method not in ("plain", "logit"):
        raise ValueError(f"method must be 'plain' or 'logit', got {method!r}")
    y = _labels(y_true)
    n_pos = int(y.sum())
    out: dict[str, Any] = {"n": len(y), "n_pos": n_pos, "method": method}
    if n_pos == 0 or n_pos == len(y):
        return {**out, "auc": float("nan"), "ci": [float("nan"), float("nan")], "se": float("nan")}
    auc, var = delong_roc_variance(y, scores)
    if not np.isfinite(var):
        return {**out, "auc": auc, "ci": [float("nan"), float("nan")], "se": float("nan")}
    se = float(np.sqrt(max(var, 0.0)))
    z = float(ndtri(0.5 + level / 2))
    if method == "plain" or auc in (0.0, 1.0):
        lo, hi = max(0.0, auc - z * se), min(1.0, auc + z * se)
    else:
        # Delta method: SE(logit AUC) = SE(AUC) / (AUC (1 - AUC)).
        centre = np.log(auc / (1 - auc))
        half = z * se / (auc * (1 - auc))
        lo, hi = float(expit(centre - half)), float(expit(centre + half))
    return {**out, "auc": auc, "ci": [float(lo), float(hi)], "se": se}


def delong_paired_test(y_true: Any, scores_a: Any, scores_b: Any) -> dict[str, float]:
    """Paired DeLong test of two correlated AUCs on the same cases (two-sided).

    z = (AUC_a - AUC_b) / sqrt(var_a + var_b - 2 cov_ab). Returns {"auc_a", "auc_b", "diff",
    "se_diff", "z", "p"}. z = 0 and p = 1 when the SE of the difference is 0 and so is the
    difference (the two scores rank every case alike); z and p are NaN when the SE is 0 but the
    AUCs differ (no variance to test the difference against), when the variance is undefined
    (a single positive or negative) and when a class is absent.
    """
    y = _labels(y_true)
    if y.sum() == 0 or y.sum() == len(y):
        nan = float("nan")
        return {"auc_a": nan, "auc_b": nan, "diff": nan, "se_diff": nan, "z": nan, "p": nan}
    auc, cov = delong_covariance(y, np.vstack([np.asarray(scores_a, float), np.asarray(scores_b, float)]))
    diff = float(auc[0] - auc[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = float(np.sqrt(max(var, 0.0))) if np.isfinite(var) else float("nan")
    if not np.isfinite(se):
        z, p = float("nan"), float("nan")
    elif se <= 1e-15:
        # No variance: equal AUCs leave nothing to test (p = 1); unequal ones cannot be tested (NaN).
        z, p = (0.0, 1.0) if abs(diff) <= 1e-12 else (float("nan"), float("nan"))
    else:
        z = diff / se
        p = float(2 * ndtr(-abs(z)))
    return {"auc_a": float(auc[0]), "auc_b": float(auc[1]), "diff": diff, "se_diff": se, "z": float(z), "p": p}


# --------------------------------------------------------------------------------------------
# Binary calls
# --------------------------------------------------------------------------------------------


def wilson_ci(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion (well-behaved at 0 and 1, unlike Wald)."""
    if trials <= 0:
        return (float("nan"), float("nan"))
    z = float(ndtri(0.5 + level / 2))
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return (float(max(0.0, centre - half)), float(min(1.0, centre + half)))


@dataclass(frozen=True)
class BinaryCallMetrics:
    """How one binary call (a rule flag, dichotomised LVM-AI) performs against the reference."""

    n: int
    tp: int
    fp: int
    tn: int
    fn: int
    sensitivity: float
    sensitivity_ci: tuple[float, float]
    specificity: float
    specificity_ci: tuple[float, float]
    ppv: float
    ppv_ci: tuple[float, float]
    npv: float
    npv_ci: tuple[float, float]
    #: (sensitivity + specificity) / 2: the ROC AUC of the 0/1 call.
    auc: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _ratio(a: int, b: int) -> float:
    return a / b if b else float("nan")


def binary_call_metrics(y_true: Any, call: Any, level: float = 0.95) -> BinaryCallMetrics:
    """Sensitivity, specificity, PPV, NPV (Wilson CIs) and AUC = (sens + spec) / 2 of a 0/1 call."""
    y = _labels(y_true)
    c = _labels(call)
    if len(c) != len(y):
        raise ValueError(f"{len(c)} calls for {len(y)} labels")
    tp = int(np.sum(c & y))
    fp = int(np.sum(c & ~y))
    tn = int(np.sum(~c & ~y))
    fn = int(np.sum(~c & y))
    sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    return BinaryCallMetrics(
        n=len(y),
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        sensitivity=sens,
        sensitivity_ci=wilson_ci(tp, tp + fn, level),
        specificity=spec,
        specificity_ci=wilson_ci(tn, tn + fp, level),
        ppv=_ratio(tp, tp + fp),
        ppv_ci=wilson_ci(tp, tp + fp, level),
        npv=_ratio(tn, tn + fn),
        npv_ci=wilson_ci(tn, tn + fn, level),
        auc=(sens + spec) / 2,
    )


# --------------------------------------------------------------------------------------------
# Cumulative incidence
# --------------------------------------------------------------------------------------------


def cumulative_incidence(
    time: Any, event: Any, competing: Any | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aalen-Johansen cumulative incidence of ``event`` with ``competing`` events (1 - KM if None).

    CIF(t) = sum over event times t_j <= t of S(t_j-) * d_j / n_j, where S is the Kaplan-Meier
    survival from *any* event, d_j the events of interest and n_j those at risk at t_j. With no
    competing events S(t_j-) * d_j / n_j telescopes to 1 - KM. Returns (times, cif, at_risk) at
    the distinct event times (cif is right-continuous: it holds from each time on). Exact, in
    numpy: tied times need no jittering.
    """
    time = np.asarray(time, dtype=float)
    event = np.asarray(event, dtype=bool)
    competing = np.zeros_like(event) if competing is None else (np.asarray(competing, dtype=bool) & ~event)
    any_event = event | competing
    if not any_event.any():
        return np.zeros(0), np.zeros(0), np.zeros(0)
    times = np.unique(time[any_event])
    order = np.sort(time)
    at_risk = len(time) - np.searchsorted(order, times, side="left")
    d_interest = np.bincount(np.searchsorted(times, time[event]), minlength=len(times))
    d_any = np.bincount(np.searchsorted(times, time[any_event]), minlength=len(times))
    surv_after = np.cumprod(1.0 - d_any / at_risk)
    surv_before = np.concatenate([[1.0], surv_after[:-1]])
    cif = np.cumsum(surv_before * d_interest / at_risk)
    return times, cif, at_risk
