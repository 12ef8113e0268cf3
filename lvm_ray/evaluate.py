"""`lvm-ray evaluate`: predictions + CMR labels -> the paper's accuracy and discrimination metrics.

Reads a predictions table (one parquet file, or a folder of them, on any fsspec URL) that carries
the CMR labels (lv_mass_g, bsa_m2, sex; the scoring stage passes them through from the shards)
and writes to DIR:

- ``metrics.json``: {"n", "pearson_r", "pearson_r_ci", "mae_g", "c_statistics", "delong_p"} as
  fixed by docs/method.md, plus extras (bland_altman, binary_calls, n_lvh, prevalence, exclusions...).
- ``table.md`` / ``table.json``: the paper-shaped table (c-statistic with 95% CI, DeLong P against
  LVM-AI, sensitivity, specificity, PPV, NPV).
- ``pairs.parquet`` (predicted vs CMR, per ECG) and ``roc.parquet`` (ROC curve of predicted
  LVMI): what ``lvm_ray.report`` draws, so the report needs nothing but DIR.

CMR LVH is LVMI = lv_mass_g / bsa_m2 over the sex thresholds of :class:`LVHConfig` (all derived
by :func:`lvm_ray.lvh.derive`; BSA by Mosteller from height_cm/weight_kg where bsa_m2 is missing
and the table has them). LVM-AI LVH is recomputed from the predicted LVMI with the *same*
configuration (docs/method.md: "predicted LV mass / BSA over the same thresholds"), so a non-default
threshold applies to both sides alike; the number of rows where the table's own ``lvh_pred``
disagrees is reported.
"""

from __future__ import annotations

import datetime as _dt
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as _st
from sklearn.metrics import roc_curve

from lvm_ray import signals, store
from lvm_ray.lvh import LVHConfig, derive
from lvm_ray.stats import (
    auc_ci,
    binary_call_metrics,
    bland_altman,
    delong_paired_test,
    mae,
    pearson_r_ci,
    wilson_ci,
)

#: Binary rule calls the paper compares with LVM-AI: metric NAME -> predictions column.
RULES: dict[str, str] = {
    "sokolow_lyon": "lvh_sokolow_lyon",
    "cornell": "lvh_cornell",
    "avl": "lvh_avl",
    "any_rule": "lvh_any_rule",
}
#: Further rules the rules stage may provide; reported under extra keys when present.
EXTRA_RULES: dict[str, str] = {"cornell_product": "lvh_cornell_product", "peguero": "lvh_peguero"}
C_STATISTIC_NAMES: tuple[str, ...] = ("lvm_ai_lvmi", "lvm_ai_lvh", *RULES)
DISPLAY_NAMES: dict[str, str] = {
    "lvm_ai_lvmi": "LVM-AI (predicted LVMI, continuous)",
    "lvm_ai_lvh": "LVM-AI LVH",
    "sokolow_lyon": "Sokolow-Lyon",
    "cornell": "Cornell voltage",
    "avl": "Lead aVL",
    "any_rule": "Any ECG rule",
    "cornell_product": "Cornell product",
    "peguero": "Peguero-Lo Presti",
}
#: Columns evaluate must have (the labels travel with the predictions).
REQUIRED_COLUMNS: tuple[str, ...] = ("ecg_id", "lv_mass_pred_g", "lv_mass_g", "bsa_m2", "sex")

METRICS_JSON = "metrics.json"
TABLE_MD = "table.md"
TABLE_JSON = "table.json"
PAIRS_PARQUET = "pairs.parquet"
ROC_PARQUET = "roc.parquet"


# --------------------------------------------------------------------------------------------
# I/O helpers (shared with outcomes and report)
# --------------------------------------------------------------------------------------------


def normalise_sex(values: pd.Series) -> pd.Series:
    """'M'/'F' from common spellings (M, male, F, female, W, woman; any case); None otherwise."""
    return values.map(signals.normalise_sex).astype(object)


def _nullable_bool(series: pd.Series) -> pd.Series:
    """Any boolean-ish column (bool, boolean, object with None, 0/1 floats) -> pandas 'boolean'."""
    if series.dtype == "boolean":
        return series
    if series.dtype == bool:
        return series.astype("boolean")
    values = series.astype(object).where(series.notna(), None)
    return pd.Series(pd.array([None if v is None else bool(v) for v in values], dtype="boolean"), index=series.index)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


PREDICTION_COLUMNS: tuple[str, ...] = (
    "ecg_id",
    "patient_id",
    "lv_mass_pred_g",
    "lvmi_pred",
    "lvh_pred",
    "lvh_prob",
    "sokolow_lyon_uv",
    "cornell_uv",
    "ravl_uv",
    *RULES.values(),
    *EXTRA_RULES.values(),
    "model_preset",
    "model_version",
    "lv_mass_g",
    "bsa_m2",
    "height_cm",
    "weight_kg",
    "sex",
    "age",
    "bmi",
    # From a calibrated checkpoint (lvm_ray.conformal): prediction intervals and P(CMR LVH).
    "lv_mass_pred_lo_g",
    "lv_mass_pred_hi_g",
    "interval_level",
    "lvh_prob_calibrated",
)


def _first_row_per_ecg(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """A copy of ``frame`` with one row per ecg_id (the first), and the exclusions that made."""
    df = frame.reset_index(drop=True).copy()
    duplicated = df["ecg_id"].duplicated(keep="first")
    if not duplicated.any():
        return df, {}
    return df.loc[~duplicated].reset_index(drop=True), {"duplicate_ecg_id": int(duplicated.sum())}


def prepare_evaluation_frame(
    frame: pd.DataFrame, lvh_config: LVHConfig = LVHConfig()
) -> tuple[pd.DataFrame, dict[str, int], int]:
    """Derive CMR LVMI/LVH and predicted LVMI/LVH; drop (and count) rows that cannot be evaluated.

    Returns (analysis frame, exclusions by reason, number of rows where the table's own
    lvh_pred disagrees with the recomputed one).
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(
            f"the predictions table lacks {missing}: evaluate needs the CMR labels (lv_mass_g, bsa_m2, sex) "
            "carried through scoring beside ecg_id and lv_mass_pred_g"
        )
    df, exclusions = _first_row_per_ecg(frame)
    df["sex"] = normalise_sex(df["sex"])
    for column in ("lv_mass_g", "bsa_m2", "lv_mass_pred_g"):
        df[column] = pd.to_numeric(df[column], errors="coerce").astype(float)
    cmr = derive(df, lvh_config)
    # The table's own lvmi_pred wins where given (the scoring stage wrote it with the same BSA).
    predicted = derive(df, lvh_config, mass_column="lv_mass_pred_g", lvmi_column="lvmi_pred")
    df["bsa_m2"] = cmr["bsa_m2"].to_numpy()  # Mosteller from height/weight where the table lacks BSA
    df["lvmi"] = cmr["lvmi"].to_numpy()
    df["lvmi_pred"] = predicted["lvmi"].to_numpy()
    df["lvh"] = cmr["lvh"].array
    lvh_pred = predicted["lvh"].reset_index(drop=True)
    mismatch = 0
    if "lvh_pred" in df.columns:
        given_call = _nullable_bool(df["lvh_pred"]).reset_index(drop=True)
        both = given_call.notna() & lvh_pred.notna()
        mismatch = int((given_call[both] != lvh_pred[both]).sum())
    df["lvh_pred"] = lvh_pred.array

    # Exclusion reasons in order; each row counted once, under the first reason that applies.
    reasons = [
        ("missing_lv_mass_g", ~np.isfinite(df["lv_mass_g"].to_numpy())),
        ("missing_bsa_m2", ~(np.isfinite(df["bsa_m2"].to_numpy()) & (df["bsa_m2"].to_numpy() > 0))),
        ("missing_sex", df["sex"].isna().to_numpy()),
        ("missing_prediction", ~np.isfinite(df["lv_mass_pred_g"].to_numpy()) | ~np.isfinite(df["lvmi_pred"])),
    ]
    excluded = np.zeros(len(df), dtype=bool)
    for name, mask in reasons:
        new = mask & ~excluded
        if new.any():
            exclusions[name] = int(new.sum())
        excluded |= mask
    return df.loc[~excluded].reset_index(drop=True), exclusions, mismatch


# --------------------------------------------------------------------------------------------
# Without CMR LV mass: the labels' LVH column is the reference (PTB-XL-like sites)
# --------------------------------------------------------------------------------------------

#: The continuous LVM-AI score by its column: predicted LVMI, or predicted LV mass where BSA is unknown.
SCORE_DISPLAY_NAMES: dict[str, str] = {
    "lvmi_pred": DISPLAY_NAMES["lvm_ai_lvmi"],
    "lv_mass_pred_g": "LVM-AI (predicted LV mass, continuous)",
}
_LVH_TEXT: dict[str, bool] = {"true": True, "false": False, "yes": True, "no": False, "y": True, "n": False}


def reference_lvh(values: pd.Series, column: str) -> pd.Series:
    """A reference LVH label column -> nullable boolean (<NA> where empty).

    Booleans, 0/1 and true/false/yes/no text are read; anything else (a 0-100 likelihood, a
    diagnosis text) is a ValueError naming the column and the value.
    """
    out: list[bool | None] = []
    for value in values.astype(object):
        if value is None or (not isinstance(value, str) and pd.isna(value)) or str(value).strip() == "":
            out.append(None)
        elif isinstance(value, (bool, np.bool_)):
            out.append(bool(value))
        elif isinstance(value, str) and value.strip().lower() in _LVH_TEXT:
            out.append(_LVH_TEXT[value.strip().lower()])
        else:
            number = pd.to_numeric(pd.Series([value]), errors="coerce").iloc[0]
            if number not in (0.0, 1.0):
                raise ValueError(
                    f"column {column!r} must hold an LVH label (0/1, true/false or yes/no); it has {str(value)[:40]!r}"
                )
            out.append(bool(number == 1.0))
    return pd.Series(pd.array(out, dtype="boolean"), index=values.index)


def has_cmr_mass(frame: pd.DataFrame) -> bool:
    """Whether any row has a CMR LV mass (then CMR LVH is the reference, as in the paper)."""
    return "lv_mass_g" in frame.columns and bool(pd.to_numeric(frame["lv_mass_g"], errors="coerce").notna().any())


def prepare_lvh_reference_frame(
    frame: pd.DataFrame, lvh_config: LVHConfig, lvh_column: str
) -> tuple[pd.DataFrame, dict[str, int], int, str, list[str]]:
    """The analysis frame where the labels have an LVH column but no CMR LV mass.

    The reference LVH is ``lvh_column``. LVM-AI's continuous score is predicted LVMI if every
    analysed ECG has a BSA, else predicted LV mass (one score for all rows); LVM-AI LVH is known
    where BSA and sex are. Returns (frame, exclusions, lvh_pred mismatches, score column, notes).
    """
    missing = [c for c in ("ecg_id", "lv_mass_pred_g", lvh_column) if c not in frame.columns]
    if missing:
        raise ValueError(
            f"the predictions table lacks {missing}: evaluating against an LVH column needs that column "
            "carried through scoring (a labels column at ingest) beside ecg_id and lv_mass_pred_g"
        )
    df, exclusions = _first_row_per_ecg(frame)
    for column in ("lv_mass_g", "bsa_m2", "sex"):
        if column not in df.columns:
            df[column] = None
    df["sex"] = normalise_sex(df["sex"])
    for column in ("lv_mass_g", "bsa_m2", "lv_mass_pred_g"):
        df[column] = pd.to_numeric(df[column], errors="coerce").astype(float)
    predicted = derive(df, lvh_config, mass_column="lv_mass_pred_g", lvmi_column="lvmi_pred")
    df["bsa_m2"] = predicted["bsa_m2"].to_numpy()
    df["lvmi"] = np.nan
    df["lvmi_pred"] = predicted["lvmi"].to_numpy()
    recomputed = predicted["lvh"].reset_index(drop=True)
    mismatch = 0
    if "lvh_pred" in df.columns:
        given_call = _nullable_bool(df["lvh_pred"]).reset_index(drop=True)
        both = given_call.notna() & recomputed.notna()
        mismatch = int((given_call[both] != recomputed[both]).sum())
    df["lvh_pred"] = recomputed.array
    df["lvh"] = reference_lvh(df[lvh_column], lvh_column).array
    no_label = df["lvh"].isna().to_numpy()
    no_prediction = ~np.isfinite(df["lv_mass_pred_g"].to_numpy()) & ~no_label
    for name, mask in (("missing_lvh_label", no_label), ("missing_prediction", no_prediction)):
        if mask.any():
            exclusions[name] = int(mask.sum())
    df = df.loc[~(no_label | no_prediction)].reset_index(drop=True)

    n = len(df)
    with_lvmi = int(np.isfinite(df["lvmi_pred"].to_numpy(dtype=float)).sum())
    score_column = "lvmi_pred" if n and with_lvmi == n else "lv_mass_pred_g"
    notes = [
        f"No CMR LV mass in the labels: the reference LVH is the labels' column {lvh_column!r}, not CMR LVMI; "
        "Pearson r, MAE and Bland-Altman need CMR LV mass and are not computed."
    ]
    if score_column == "lv_mass_pred_g":
        notes.append(
            f"Predicted LVMI needs a BSA (height and weight, or bsa_m2): known for {with_lvmi} of {n} ECGs, "
            "so the continuous LVM-AI score is predicted LV mass (g)."
        )
    n_call = int(df["lvh_pred"].notna().sum())
    if n_call < n:
        notes.append(
            f"LVM-AI LVH (predicted LVMI over the sex thresholds) needs a BSA and sex: known for {n_call} of {n} "
            "ECGs; its c-statistic and binary-call counts use those."
        )
    return df, exclusions, mismatch, score_column, notes


def _rule_call(df: pd.DataFrame, column: str) -> pd.Series | None:
    if column not in df.columns:
        return None
    return _nullable_bool(df[column]).reset_index(drop=True)


def _c_statistic(y: np.ndarray, score: np.ndarray, ci_method: str) -> dict[str, Any]:
    res = auc_ci(y, score, method=ci_method)
    return {"auc": res["auc"], "ci": res["ci"], "se": res["se"], "n": res["n"], "n_lvh": res["n_pos"]}


def _unavailable(reason: str) -> dict[str, Any]:
    return {"auc": None, "ci": [None, None], "n": 0, "note": reason}


def compute_metrics(
    df: pd.DataFrame, ci_method: str = "plain", score_column: str = "lvmi_pred"
) -> tuple[dict[str, Any], pd.DataFrame]:
    """All metrics on an analysis frame from :func:`prepare_evaluation_frame`; also the ROC curve.

    ``score_column``: the continuous LVM-AI score (predicted LV mass where the labels lack a BSA:
    :func:`prepare_lvh_reference_frame`); where lvh_pred is unknown (no BSA), LVM-AI LVH is assessed
    on the rows that have it, as a rule is on the ECGs where it is measurable.
    """
    y = df["lvh"].to_numpy(dtype=bool)
    r, r_ci, n = pearson_r_ci(df["lv_mass_pred_g"], df["lv_mass_g"])
    metrics: dict[str, Any] = {
        "n": int(len(df)),
        "pearson_r": r,
        "pearson_r_ci": list(r_ci),
        "mae_g": mae(df["lv_mass_pred_g"], df["lv_mass_g"]),
        "c_statistics": {},
        "delong_p": {},
    }
    n_lvh = int(y.sum())
    both_classes = 0 < n_lvh < len(y)
    lvmi_pred = df[score_column].to_numpy(dtype=float)
    lvh_known = df["lvh_pred"].notna().to_numpy()  # every row with CMR labels
    lvh_pred = df["lvh_pred"].fillna(False).to_numpy(dtype=bool)
    c_stats: dict[str, Any] = {}
    delong_p: dict[str, Any] = {"lvm_ai_lvmi": None}
    delong_detail: dict[str, Any] = {}
    delong_p_lvh: dict[str, Any] = {}
    binary_calls: dict[str, Any] = {}
    c_extra: dict[str, Any] = {}

    if both_classes:
        c_stats["lvm_ai_lvmi"] = _c_statistic(y, lvmi_pred, ci_method)
        k = lvh_known
        c_stats["lvm_ai_lvh"] = _c_statistic(y[k], lvh_pred[k].astype(float), ci_method)
        test = delong_paired_test(y[k], lvmi_pred[k], lvh_pred[k].astype(float))
        delong_p["lvm_ai_lvh"] = test["p"]
        delong_detail["lvm_ai_lvh"] = test
    else:
        note = f"CMR LVH has a single class ({n_lvh} of {len(y)} with LVH): no discrimination to measure"
        c_stats["lvm_ai_lvmi"] = _unavailable(note)
        c_stats["lvm_ai_lvh"] = _unavailable(note)
        delong_p["lvm_ai_lvh"] = None
    binary_calls["lvm_ai_lvh"] = {
        **binary_call_metrics(y[lvh_known], lvh_pred[lvh_known]).to_dict(),
        "column": "lvh_pred",
        "n_not_measurable": int((~lvh_known).sum()),
    }

    for name, column in {**RULES, **EXTRA_RULES}.items():
        extra = name in EXTRA_RULES
        target_c = c_extra if extra else c_stats
        call = _rule_call(df, column)
        if call is None:
            if not extra:
                target_c[name] = _unavailable(f"column {column} not in the predictions")
                delong_p[name] = None
            continue
        known = call.notna().to_numpy()
        flag = call[known].to_numpy(dtype=bool)
        yk = y[known]
        binary_calls[name] = {
            **binary_call_metrics(yk, flag).to_dict(),
            "column": column,
            "n_not_measurable": int((~known).sum()),
        }
        if 0 < yk.sum() < len(yk):
            # A 0/1 score's ROC AUC is (sens + spec) / 2, so DeLong on the flag is the paper's c-statistic.
            target_c[name] = {
                **_c_statistic(yk, flag.astype(float), ci_method),
                "n_not_measurable": int((~known).sum()),
            }
            test = delong_paired_test(yk, lvmi_pred[known], flag.astype(float))
            both = known & lvh_known
            test_lvh = delong_paired_test(y[both], lvh_pred[both].astype(float), call[both].to_numpy(dtype=float))
            if extra:
                c_extra[name]["delong_p_vs_lvm_ai_lvmi"] = test["p"]
            else:
                delong_p[name] = test["p"]
                delong_detail[name] = test
                delong_p_lvh[name] = test_lvh["p"]
        else:
            target_c[name] = _unavailable("CMR LVH has a single class among ECGs where this rule is measurable")
            if not extra:
                delong_p[name] = None

    if "lvh_prob" in df.columns:
        prob = pd.to_numeric(df["lvh_prob"], errors="coerce").to_numpy(dtype=float)
        ok = np.isfinite(prob)
        if ok.any() and 0 < y[ok].sum() < ok.sum():
            c_extra["lvm_ai_prob"] = _c_statistic(y[ok], prob[ok], ci_method)

    metrics["c_statistics"] = {name: c_stats[name] for name in C_STATISTIC_NAMES}
    metrics["delong_p"] = {name: delong_p.get(name) for name in C_STATISTIC_NAMES}
    metrics.update(
        {
            "n_lvh": n_lvh,
            "prevalence": n_lvh / len(y) if len(y) else float("nan"),
            "pearson_r_n": n,
            "bland_altman": bland_altman(df["lv_mass_pred_g"], df["lv_mass_g"]),
            "binary_calls": binary_calls,
            "delong_reference": "lvm_ai_lvmi",
            "delong_tests": delong_detail,
            "delong_p_lvm_ai_lvh_vs_rules": delong_p_lvh,
            "c_statistics_extra": c_extra,
            "ci_method": f"DeLong, {ci_method} (Wald on the AUC scale)" if ci_method == "plain" else "DeLong, logit",
            "lv_mass_cmr_mean_g": float(df["lv_mass_g"].mean()) if len(df) else None,
            "lv_mass_pred_mean_g": float(df["lv_mass_pred_g"].mean()) if len(df) else None,
        }
    )
    if both_classes:
        fpr, tpr, thr = roc_curve(y, lvmi_pred, drop_intermediate=True)
        roc = pd.DataFrame({"name": "lvm_ai_lvmi", "fpr": fpr, "tpr": tpr, "threshold": thr})
    else:
        roc = pd.DataFrame({"name": pd.Series(dtype=str), "fpr": [], "tpr": [], "threshold": []})
    return metrics, roc


# --------------------------------------------------------------------------------------------
# Prediction intervals, subgroups and calibration (TRIPOD+AI: performance by subgroup, calibration)
# --------------------------------------------------------------------------------------------

#: Subgroup bands as cut points: (55, 65) gives "<55", "55-65" (55 <= x < 65) and ">=65".
DEFAULT_BANDS: dict[str, tuple[float, ...]] = {"age": (55.0, 65.0), "bmi": (25.0, 30.0)}
#: Fewest ECGs in a subgroup for a correlation (and its Fisher-z CI) to be reported.
MIN_SUBGROUP_N = 10
#: Bins (equal counts, by prediction) of the calibration tables and the expected calibration error.
CALIBRATION_BINS = 10
#: Fewest ECGs (and, for probabilities, events) for a calibration slope.
MIN_CALIBRATION_N = 20
SEX_LABELS: dict[str, str] = {"M": "Men", "F": "Women"}


def band_labels(cuts: Sequence[float]) -> list[str]:
    """Labels of the bands between sorted cut points: (55, 65) -> ['<55', '55-65', '>=65']."""
    cuts = sorted(float(c) for c in cuts)
    if not cuts:
        return ["all"]
    inner = [f"{a:g}-{b:g}" for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    return [f"<{cuts[0]:g}", *inner, f">={cuts[-1]:g}"]


def assign_bands(values: Any, cuts: Sequence[float]) -> np.ndarray:
    """Each value's band label (None where the value is unknown); bands are [lower, upper)."""
    x = pd.to_numeric(pd.Series(np.asarray(values, dtype=object)), errors="coerce").to_numpy(dtype=float)
    labels = np.array(band_labels(cuts), dtype=object)
    index = np.searchsorted(np.sort(np.asarray(cuts, dtype=float)), x, side="right")
    return np.where(np.isfinite(x), labels[np.minimum(index, len(labels) - 1)], None)


def _covered(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(rows with an interval and a CMR mass, CMR mass inside the interval) as boolean arrays."""
    if not {"lv_mass_pred_lo_g", "lv_mass_pred_hi_g"} <= set(df.columns):
        return np.zeros(len(df), dtype=bool), np.zeros(len(df), dtype=bool)
    lo = pd.to_numeric(df["lv_mass_pred_lo_g"], errors="coerce").to_numpy(dtype=float)
    hi = pd.to_numeric(df["lv_mass_pred_hi_g"], errors="coerce").to_numpy(dtype=float)
    y = pd.to_numeric(df["lv_mass_g"], errors="coerce").to_numpy(dtype=float)
    known = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(y)
    return known, known & (lo <= y) & (y <= hi)


def _coverage(known: np.ndarray, inside: np.ndarray) -> dict[str, Any]:
    n = int(known.sum())
    if n == 0:
        return {"n": 0, "coverage": None, "coverage_ci": [None, None]}
    k = int((known & inside).sum())
    return {"n": n, "coverage": k / n, "coverage_ci": list(wilson_ci(k, n))}


def interval_metrics(df: pd.DataFrame) -> dict[str, Any]:
    """Coverage (Wilson 95% CI) and width of the LV mass prediction intervals, overall and by sex."""
    known, inside = _covered(df)
    out: dict[str, Any] = {"level": None, **_coverage(known, inside), "mean_width_g": None, "median_width_g": None}
    if not known.any():
        out["note"] = "no prediction intervals (an uncalibrated checkpoint: `lvm-ray calibrate` adds them)"
        return out
    levels = sorted(set(pd.to_numeric(df.loc[known, "interval_level"], errors="coerce").dropna().round(6)))
    width = (df["lv_mass_pred_hi_g"].astype(float) - df["lv_mass_pred_lo_g"].astype(float)).to_numpy()[known]
    out.update(
        {
            "level": levels[0] if len(levels) == 1 else None,
            "mean_width_g": float(np.mean(width)),
            "median_width_g": float(np.median(width)),
            "n_without_interval": int(len(df) - known.sum()),
            "by_sex": {s: _coverage(known & (df["sex"] == s).to_numpy(), inside) for s in SEX_LABELS},
        }
    )
    if len(levels) > 1:
        out["note"] = f"the predictions mix interval levels {levels}: coverage pools them"
    return out


def _c_stat_or_null(y: np.ndarray, score: np.ndarray, ci_method: str) -> dict[str, Any]:
    ok = np.isfinite(score)
    y, score = y[ok], score[ok]
    n_pos = int(y.sum())
    if not 0 < n_pos < len(y):
        return {"auc": None, "ci": [None, None], "n": int(len(y)), "note": f"{n_pos} of {len(y)} with LVH: one class"}
    c = _c_statistic(y, score, ci_method)
    return {"auc": c["auc"], "ci": c["ci"], "n": c["n"], "n_lvh": c["n_lvh"]}


def _subgroup_stats(df: pd.DataFrame, score_column: str, ci_method: str) -> dict[str, Any]:
    """n, r (CI), MAE, interval coverage and c-statistics of one subgroup; nulls with notes where too small."""
    n = len(df)
    if n == 0:
        c_null = {"auc": None, "ci": [None, None], "n": 0}
        return {
            "n": 0,
            "n_lvh": 0,
            "pearson_r": None,
            "pearson_r_ci": [None, None],
            "mae_g": None,
            "interval_coverage": None,
            "interval_coverage_ci": [None, None],
            "c_statistics": {"lvm_ai_lvmi": c_null, "any_rule": dict(c_null)},
            "notes": ["no ECG in this subgroup"],
        }
    y = df["lvh"].to_numpy(dtype=bool)
    notes: list[str] = []
    r, r_ci, n_r = pearson_r_ci(df["lv_mass_pred_g"], df["lv_mass_g"])
    if n_r < MIN_SUBGROUP_N:
        r, r_ci = float("nan"), (float("nan"), float("nan"))
        notes.append(f"pearson_r: {n_r} ECGs with CMR LV mass (at least {MIN_SUBGROUP_N} needed)")
    known, inside = _covered(df)
    coverage = _coverage(known, inside)
    if not coverage["n"]:
        notes.append("interval_coverage: no ECG with a prediction interval")
    any_rule = _rule_call(df, RULES["any_rule"])
    rule = np.full(n, np.nan) if any_rule is None else any_rule.astype("Float64").to_numpy(dtype=float, na_value=np.nan)
    c_stats = {
        "lvm_ai_lvmi": _c_stat_or_null(y, df[score_column].to_numpy(dtype=float), ci_method),
        "any_rule": _c_stat_or_null(y, rule, ci_method),
    }
    notes += [f"c_statistics.{k}: {v['note']}" for k, v in c_stats.items() if v.get("note")]
    return {
        "n": n,
        "n_lvh": int(y.sum()),
        "pearson_r": r,
        "pearson_r_ci": list(r_ci),
        "mae_g": mae(df["lv_mass_pred_g"], df["lv_mass_g"]) if n_r else None,
        "interval_coverage": coverage["coverage"],
        "interval_coverage_ci": coverage["coverage_ci"],
        "c_statistics": c_stats,
        "notes": notes,
    }


def subgroup_metrics(
    df: pd.DataFrame,
    lvh_config: LVHConfig = LVHConfig(),
    bands: Mapping[str, Sequence[float]] | None = None,
    ci_method: str = "plain",
    score_column: str = "lvmi_pred",
) -> dict[str, Any]:
    """Performance by sex and by bands of age and BMI (``bands``: cut points, default :data:`DEFAULT_BANDS`).

    Every subgroup of every band is reported; one with too few ECGs (or one LVH class) has null
    statistics and a note saying why. BMI is the labels' own, else weight / height^2 (lvh.derive).
    """
    bands = {**DEFAULT_BANDS, **dict(bands or {})}
    columns = {"age": pd.to_numeric(df.get("age", pd.Series(np.nan, index=df.index)), errors="coerce")}
    columns["bmi"] = pd.Series(derive(df, lvh_config)["bmi"].to_numpy(), index=df.index)
    out: dict[str, Any] = {
        "sex": {s: _subgroup_stats(df[df["sex"] == s], score_column, ci_method) for s in SEX_LABELS},
    }
    for name, cuts in bands.items():
        if name not in columns and name in df.columns:
            columns[name] = pd.to_numeric(df[name], errors="coerce")
        if name not in columns:
            raise ValueError(f"subgroup band {name!r}: the predictions have no such column")
        labels = assign_bands(columns[name].to_numpy(), cuts)
        out[name] = {
            label: _subgroup_stats(df[labels == label], score_column, ci_method) for label in band_labels(cuts)
        }
        if pd.isna(labels).any():
            out[name]["unknown"] = {"n": int(pd.isna(labels).sum()), "note": f"{name} not known"}
    out["bands"] = {name: sorted(float(c) for c in cuts) for name, cuts in bands.items()}
    return out


def mass_calibration(df: pd.DataFrame, bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """CMR on predicted LV mass: OLS slope and intercept (95% CIs) and a table by decile of prediction."""
    pred = pd.to_numeric(df["lv_mass_pred_g"], errors="coerce").to_numpy(dtype=float)
    cmr = pd.to_numeric(df["lv_mass_g"], errors="coerce").to_numpy(dtype=float)
    ok = np.isfinite(pred) & np.isfinite(cmr)
    n = int(ok.sum())
    if n < MIN_CALIBRATION_N or np.ptp(pred[ok]) == 0:
        return {"n": n, "slope": None, "intercept": None, "note": f"{n} ECGs with CMR LV mass: too few to fit"}
    fit = _st.linregress(pred[ok], cmr[ok])
    t = float(_st.t.ppf(0.975, n - 2))
    known, inside = _covered(df)
    table = []
    frame = pd.DataFrame({"pred": pred[ok], "cmr": cmr[ok], "known": known[ok], "inside": inside[ok]})
    frame["bin"] = pd.qcut(frame["pred"].rank(method="first"), min(bins, n), labels=False)
    for b, part in frame.groupby("bin"):
        coverage = _coverage(part["known"].to_numpy(), part["inside"].to_numpy())
        table.append(
            {
                "bin": int(b) + 1,
                "n": int(len(part)),
                "pred_min_g": float(part["pred"].min()),
                "pred_max_g": float(part["pred"].max()),
                "pred_mean_g": float(part["pred"].mean()),
                "cmr_mean_g": float(part["cmr"].mean()),
                "cmr_mean_ci_g": _mean_ci(part["cmr"].to_numpy()),
                "interval_coverage": coverage["coverage"],
                "interval_coverage_ci": coverage["coverage_ci"],
                "interval_n": coverage["n"],
            }
        )
    return {
        "n": n,
        "slope": float(fit.slope),
        "slope_ci": [float(fit.slope - t * fit.stderr), float(fit.slope + t * fit.stderr)],
        "intercept": float(fit.intercept),
        "intercept_ci": [
            float(fit.intercept - t * fit.intercept_stderr),
            float(fit.intercept + t * fit.intercept_stderr),
        ],
        "model": "OLS of CMR LV mass on predicted LV mass (slope 1, intercept 0: calibrated)",
        "deciles": table,
    }


def _mean_ci(values: np.ndarray) -> list[float | None]:
    if len(values) < 2:
        return [None, None]
    half = float(_st.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values)))
    return [float(np.mean(values)) - half, float(np.mean(values)) + half]


def probability_calibration(y: Any, prob: Any, bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """Brier score (and the prevalence-only forecast's), logistic calibration slope and intercept, ECE.

    Slope: logistic regression of the outcome on logit(p) (1 = calibrated, < 1 = too extreme).
    Intercept: calibration-in-the-large, the intercept with logit(p) as offset (0 = calibrated).
    ECE: mean |observed - predicted| over ``bins`` equal-count bins of p, weighted by size.
    """
    import statsmodels.api as sm

    y = np.asarray(y, dtype=bool)
    p = pd.to_numeric(pd.Series(np.asarray(prob, dtype=object)), errors="coerce").to_numpy(dtype=float)
    ok = np.isfinite(p)
    y, p = y[ok], p[ok]
    n, events = len(y), int(y.sum())
    out: dict[str, Any] = {"n": n, "n_lvh": events}
    if n < MIN_CALIBRATION_N or not 0 < events < n:
        return {
            **out,
            "brier": None,
            "slope": None,
            "intercept": None,
            "ece": None,
            "note": f"{events} of {n} with LVH",
        }
    prevalence = events / n
    out.update(
        {
            "brier": float(np.mean((p - y) ** 2)),
            "brier_prevalence_only": float(np.mean((prevalence - y) ** 2)),
            "mean_predicted": float(p.mean()),
            "prevalence": prevalence,
        }
    )
    out["brier_skill"] = 1.0 - out["brier"] / out["brier_prevalence_only"]
    logit = np.log(np.clip(p, 1e-6, 1 - 1e-6) / (1 - np.clip(p, 1e-6, 1 - 1e-6)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # perfect separation is reported as a note below
            slope_fit = sm.GLM(y.astype(float), sm.add_constant(logit), family=sm.families.Binomial()).fit()
            citl = sm.GLM(y.astype(float), np.ones((n, 1)), family=sm.families.Binomial(), offset=logit).fit()
        out.update(
            {
                "slope": float(slope_fit.params[1]),
                "slope_ci": [float(v) for v in slope_fit.conf_int()[1]],
                "intercept": float(citl.params[0]),
                "intercept_ci": [float(v) for v in citl.conf_int()[0]],
            }
        )
    except (np.linalg.LinAlgError, ValueError, OverflowError) as exc:
        out.update({"slope": None, "intercept": None, "note": f"logistic calibration not estimable ({exc})"})
    frame = pd.DataFrame({"p": p, "y": y})
    frame["bin"] = pd.qcut(frame["p"].rank(method="first"), min(bins, n), labels=False)
    table = []
    for b, part in frame.groupby("bin"):
        k = int(part["y"].sum())
        table.append(
            {
                "bin": int(b) + 1,
                "n": int(len(part)),
                "mean_predicted": float(part["p"].mean()),
                "observed": k / len(part),
                "observed_ci": list(wilson_ci(k, len(part))),
            }
        )
    out["ece"] = float(sum(row["n"] * abs(row["observed"] - row["mean_predicted"]) for row in table) / n)
    out["bins"] = table
    return out


def calibration_metrics(df: pd.DataFrame) -> dict[str, Any]:
    """LV mass calibration, and the calibration of lvh_prob_calibrated (and lvh_prob where present)."""
    y = df["lvh"].to_numpy(dtype=bool)
    out: dict[str, Any] = {"lv_mass": mass_calibration(df)}
    for column in ("lvh_prob_calibrated", "lvh_prob"):
        if column in df.columns and pd.to_numeric(df[column], errors="coerce").notna().any():
            out[column] = probability_calibration(y, df[column].to_numpy())
        elif column == "lvh_prob_calibrated":
            out[column] = {"n": 0, "brier": None, "slope": None, "intercept": None, "ece": None}
            out[column]["note"] = "no lvh_prob_calibrated (an uncalibrated checkpoint: `lvm-ray calibrate`)"
    return out


def _fmt(x: Any, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _fmt_p(p: Any) -> str:
    if p is None or (isinstance(p, float) and not math.isfinite(p)):
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}" if p < 0.1 else f"{p:.2f}"


def _fmt_pct_ci(value: Any, ci: Any) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    lo, hi = ci if ci else (None, None)
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{100 * value:.1f}%"
    return f"{100 * value:.1f}% ({100 * lo:.1f}-{100 * hi:.1f})"


def _fmt_auc_ci(auc: Any, ci: Any) -> str:
    """'0.653 (0.608-0.698)'; '0.900 (no CI)' where the DeLong variance is undefined (one case in a class)."""
    if auc is None:
        return "-"
    lo, hi = ci if ci else (None, None)
    if lo is None or hi is None:
        return f"{_fmt(auc)} (no CI)"
    return f"{_fmt(auc)} ({_fmt(lo)}-{_fmt(hi)})"


def paper_table(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the paper-shaped table: one per ECG method, formatted strings plus raw numbers."""
    rows = []
    c_all = {**metrics["c_statistics"], **metrics.get("c_statistics_extra", {})}
    for name in (*C_STATISTIC_NAMES, *EXTRA_RULES):
        c = c_all.get(name)
        if c is None:
            continue
        calls = metrics["binary_calls"].get(name, {})
        auc, ci = c.get("auc"), c.get("ci") or [None, None]
        p = "ref" if name == "lvm_ai_lvmi" else _fmt_p(metrics["delong_p"].get(name, c.get("delong_p_vs_lvm_ai_lvmi")))
        rows.append(
            {
                "name": name,
                "method": SCORE_DISPLAY_NAMES[metrics.get("continuous_score") or "lvmi_pred"]
                if name == "lvm_ai_lvmi"
                else DISPLAY_NAMES.get(name, name),
                "c_statistic": _fmt_auc_ci(auc, ci),
                "p_vs_lvm_ai": p,
                "sensitivity": _fmt_pct_ci(calls.get("sensitivity"), calls.get("sensitivity_ci")),
                "specificity": _fmt_pct_ci(calls.get("specificity"), calls.get("specificity_ci")),
                "ppv": _fmt_pct_ci(calls.get("ppv"), calls.get("ppv_ci")),
                "npv": _fmt_pct_ci(calls.get("npv"), calls.get("npv_ci")),
                "auc": auc,
                "ci": ci,
            }
        )
    return rows


TABLE_HEADERS = (
    ("method", "ECG method"),
    ("c_statistic", "c-statistic (95% CI)"),
    ("p_vs_lvm_ai", "P (DeLong vs LVM-AI LVMI)"),
    ("sensitivity", "Sensitivity (95% CI)"),
    ("specificity", "Specificity (95% CI)"),
    ("ppv", "PPV (95% CI)"),
    ("npv", "NPV (95% CI)"),
)


def table_markdown(metrics: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    r_ci = metrics["pearson_r_ci"]
    lines = [
        f"# LVM-AI evaluation (n = {metrics['n']}, {'LVH' if metrics.get('reference') == 'lvh_column' else 'CMR LVH'} "
        f"{metrics['n_lvh']}, "
        f"prevalence {_fmt_pct_ci(metrics['prevalence'], None)})",
        "",
        f"Pearson r (predicted vs CMR LV mass) = {_fmt(metrics['pearson_r'])} "
        f"({_fmt(r_ci[0])}-{_fmt(r_ci[1])}); MAE = {_fmt(metrics['mae_g'], 1)} g.",
        "",
        "| " + " | ".join(h for _, h in TABLE_HEADERS) + " |",
        "|" + "|".join("---" for _ in TABLE_HEADERS) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(str(row[k]) for k, _ in TABLE_HEADERS) + " |")
    lines += [
        "",
        "c-statistics with 95% CIs by DeLong; for a binary call c = (sensitivity + specificity) / 2. "
        "P: paired DeLong test against the continuous LVM-AI prediction (predicted LVMI). "
        "Proportions with Wilson 95% CIs.",
        "",
    ]
    return "\n".join(lines)


def _unique_values(df: pd.DataFrame, column: str) -> list[str]:
    if column not in df.columns:
        return []
    return sorted({str(v) for v in df[column].dropna().unique()})


def evaluate(
    predictions: str | pd.DataFrame,
    out: str,
    lvh_config: LVHConfig = LVHConfig(),
    ci_method: str = "plain",
    lvh_column: str | None = None,
    subgroup_bands: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, Any]:
    """Evaluate predictions against CMR labels; write metrics.json, tables and plot data to ``out``.

    ``predictions``: a DataFrame, or a parquet file / folder of parquet files on any fsspec URL,
    with at least ecg_id, lv_mass_pred_g, lv_mass_g, bsa_m2 and sex (ValueError naming what is
    missing otherwise); lvmi_pred, lvh_prob, the rule flags, model_preset and model_version are
    used where present. Rows with a missing label or prediction are excluded and counted
    ("n_excluded", "exclusions"). Returns the metrics dict (as written to metrics.json).

    ``lvh_column``: a reference LVH column (0/1, e.g. PTB-XL's cardiologist statement) used when
    no row has a CMR lv_mass_g (:func:`prepare_lvh_reference_frame`); metrics["notes"] says what
    that changes ("reference": "lvh_column").

    Also written: "interval" (coverage of the prediction intervals), "subgroups" (by sex and by
    bands of age and BMI; ``subgroup_bands`` maps a column to cut points, default
    :data:`DEFAULT_BANDS`) and "calibration" (LV mass and the LVH probabilities).
    """
    raw = store.read_any_table(
        predictions,
        columns=None
        if isinstance(predictions, pd.DataFrame)
        else [*PREDICTION_COLUMNS, *([lvh_column] if lvh_column else [])],
    )
    n_input = len(raw)
    notes: list[str] = []
    score_column = "lvmi_pred"
    by_column = lvh_column is not None and not has_cmr_mass(raw)
    if by_column:
        df, exclusions, mismatch, score_column, notes = prepare_lvh_reference_frame(raw, lvh_config, str(lvh_column))
    else:
        df, exclusions, mismatch = prepare_evaluation_frame(raw, lvh_config)
        if lvh_column is not None:
            notes.append(f"The labels have CMR LV mass: the reference is CMR LVH; column {lvh_column!r} is not used.")
    metrics, roc = compute_metrics(df, ci_method=ci_method, score_column=score_column)
    metrics["interval"] = interval_metrics(df)
    metrics["subgroups"] = subgroup_metrics(df, lvh_config, subgroup_bands, ci_method, score_column)
    metrics["calibration"] = calibration_metrics(df)
    if "lvh_prob_calibrated" in df.columns:
        prob = pd.to_numeric(df["lvh_prob_calibrated"], errors="coerce").to_numpy(dtype=float)
        c = _c_stat_or_null(df["lvh"].to_numpy(dtype=bool), prob, ci_method)
        if c["auc"] is not None:
            metrics["c_statistics_extra"]["lvm_ai_prob_calibrated"] = c
    metrics.update(
        {
            "reference": "lvh_column" if by_column else "cmr_lvmi",
            "lvh_column": lvh_column if by_column else None,
            "continuous_score": score_column,
            "notes": notes,
        }
    )
    metrics.update(
        {
            "n_input": n_input,
            "n_excluded": int(sum(exclusions.values())),
            "exclusions": exclusions,
            "lvh_pred_recomputed_mismatch": mismatch,
            "lvh_thresholds_g_m2": dict(lvh_config.thresholds_g_m2),
            "lvh_definition": "LVMI = LV mass / BSA (Mosteller) strictly above the sex threshold",
            "model_preset": _unique_values(raw, "model_preset"),
            "model_version": _unique_values(raw, "model_version"),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": predictions if isinstance(predictions, str) else "DataFrame",
        }
    )
    rows = paper_table(store.jsonable(metrics))
    store.write_json(store.join_url(out, METRICS_JSON), metrics)
    store.write_json(store.join_url(out, TABLE_JSON), {"columns": dict(TABLE_HEADERS), "rows": rows})
    markdown = table_markdown(store.jsonable(metrics), rows) + "".join(f"Note: {note}\n\n" for note in notes)
    store.write_bytes(store.join_url(out, TABLE_MD), markdown.encode())
    pair_columns = ["ecg_id", "sex", "lv_mass_g", "lv_mass_pred_g", "bsa_m2", "lvmi", "lvmi_pred", "lvh", "lvh_pred"]
    pairs = df[pair_columns].copy()
    pairs["lvh"] = pairs["lvh"].astype(bool)
    # Unknown without a BSA (lvh_column): kept nullable there.
    pairs["lvh_pred"] = pairs["lvh_pred"].astype(bool if pairs["lvh_pred"].notna().all() else "boolean")
    store.write_table(store.join_url(out, PAIRS_PARQUET), pairs)
    store.write_table(store.join_url(out, ROC_PARQUET), roc)
    return store.jsonable(metrics)
