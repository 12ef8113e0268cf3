"""`lvm-ray outcomes`: predictions + follow-up -> Cox models and cumulative incidence per outcome.

Follow-up table (as ``lvm_ray.synth`` writes it; any fsspec URL, parquet or CSV): ecg_id,
patient_id, and for each OUTCOME: <o>_prevalent (event at or before the ECG), <o>_event and
<o>_time_years (ECG date to event or censoring). Joined to the predictions on ecg_id.

Per outcome (docs/method.md, "Statistics"): individuals with a prevalent event are excluded (flagged
<o>_prevalent, or an event at time 0: at or before the ECG, as the paper counts it; a negative
time on an unflagged row is an input error, :class:`FollowupError`); Cox proportional hazards
(lifelines, Efron ties, fitted to a tight tolerance: :data:`COX_FIT_OPTIONS`) adjusted for age
(per year, linear) and sex:

(a) the binary exposure, LVM-AI LVH (predicted LVMI over the sex thresholds) -> hr, ci, p;
(b) the continuous exposure per SD (predicted LV mass by default) -> hr_per_sd, ci_per_sd.

The proportional-hazards assumption is checked with lifelines' Schoenfeld-residual test (rank
time transform); the p-values are recorded, never enforced. One ECG per individual: where a
patient has several, the earliest (by ecg_datetime when known) is kept, so that no one is counted
twice (the paper analyses one ECG per person).

Cumulative incidence by LVH group is the Aalen-Johansen estimator with death as a competing
risk when the follow-up has death columns (for death itself, and without them, it is 1 - Kaplan-
Meier). 1 - KM treats death as censoring and so overstates the incidence of non-fatal events in
older cohorts; Aalen-Johansen does not (:func:`lvm_ray.stats.cumulative_incidence`, numpy, no
tie jittering). ``competing_risks=False`` gives 1 - KM throughout.

Writes DIR/outcomes.json ({OUTCOME: {"n", "events", "hr", "ci", "p", "hr_per_sd", "ci_per_sd",
...extras}} exactly as fixed by docs/method.md; run-level information goes to DIR/outcomes_meta.json so
that outcomes.json holds outcomes only), DIR/cumulative_incidence.parquet and DIR/outcomes.md.
"""

from __future__ import annotations

import datetime as _dt
import math
import warnings
from typing import Any

import numpy as np
import pandas as pd

from lvm_ray import store
from lvm_ray.evaluate import (
    normalise_sex,
)
from lvm_ray.lvh import LVHConfig, derive
from lvm_ray.stats import cumulative_incidence

#: The paper's outcomes, in report order (death optional); others found in the table follow.
OUTCOMES: tuple[str, ...] = ("af", "mi", "hf", "va", "death")
OUTCOME_NAMES: dict[str, str] = {
    "af": "Atrial fibrillation",
    "mi": "Myocardial infarction",
    "hf": "Heart failure",
    "va": "Ventricular arrhythmia",
    "death": "Death",
}
#: Below this many incident events a Cox model is not fitted (reported with a note instead).
MIN_EVENTS = 5
#: Newton-Raphson stopping rules for the Cox fits. lifelines' defaults (precision 1e-7, relative
#: log-likelihood change 1e-9) stop while log hazard ratios are still ~1e-5 off the maximum;
#: these reach it to ~1e-10 (checked against statsmodels PHReg, Efron ties) in a few more steps.
COX_FIT_OPTIONS: dict[str, float] = {"precision": 1e-14, "r_precision": 1e-15, "max_steps": 500}


class FollowupError(ValueError):
    """The follow-up table is inconsistent (e.g. negative times); the message says where."""


OUTCOMES_JSON = "outcomes.json"
OUTCOMES_META_JSON = "outcomes_meta.json"
OUTCOMES_MD = "outcomes.md"
CUMULATIVE_INCIDENCE_PARQUET = "cumulative_incidence.parquet"


def detect_outcomes(followup: pd.DataFrame) -> list[str]:
    """Outcome names with both <o>_event and <o>_time_years columns (paper's order first)."""
    names = [c[: -len("_event")] for c in followup.columns if c.endswith("_event")]
    present = [n for n in names if f"{n}_time_years" in followup.columns]
    return [n for n in OUTCOMES if n in present] + sorted(n for n in present if n not in OUTCOMES)


# --------------------------------------------------------------------------------------------
# Cumulative incidence (the Aalen-Johansen estimator itself is lvm_ray.stats.cumulative_incidence)
# --------------------------------------------------------------------------------------------


def _step_at(times: np.ndarray, values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Right-continuous step function (0 before the first time) evaluated on ``grid``."""
    idx = np.searchsorted(times, grid, side="right") - 1
    return np.where(idx >= 0, values[np.clip(idx, 0, None)] if len(values) else 0.0, 0.0)


# --------------------------------------------------------------------------------------------
# Cox models
# --------------------------------------------------------------------------------------------


def _fit_cox(data: pd.DataFrame, exposure: str) -> dict[str, Any]:
    """Cox PH of time/event on ``exposure`` + age + male; HR for the exposure and the PH test."""
    from lifelines import CoxPHFitter
    from lifelines.statistics import proportional_hazard_test

    columns = ["time", "event", exposure, "age", "male"]
    result: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cph = CoxPHFitter()
        cph.fit(data[columns], duration_col="time", event_col="event", fit_options=dict(COX_FIT_OPTIONS))
        row = cph.summary.loc[exposure]
        result.update(
            {
                "coef": float(row["coef"]),
                "se": float(row["se(coef)"]),
                "hr": float(row["exp(coef)"]),
                "ci": [float(row["exp(coef) lower 95%"]), float(row["exp(coef) upper 95%"])],
                "p": float(row["p"]),
                "covariates": {
                    name: {"hr": float(cph.summary.loc[name, "exp(coef)"]), "p": float(cph.summary.loc[name, "p"])}
                    for name in ("age", "male")
                },
            }
        )
        try:
            ph = proportional_hazard_test(cph, data[columns], time_transform="rank")
            result["ph_test_p"] = {str(k): float(v) for k, v in ph.summary["p"].items()}
        except Exception as exc:  # the PH check is informative only: never fail the analysis on it
            result["ph_test_p"] = {}
            result["ph_test_error"] = f"{type(exc).__name__}: {exc}"
    messages = sorted({str(w.message).splitlines()[0] for w in caught if "convergence" in str(w.message).lower()})
    if messages:
        result["warnings"] = messages
    return result


def _none_result(note: str) -> dict[str, Any]:
    return {"hr": None, "ci": [None, None], "p": None, "note": note}


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def _join(
    predictions: pd.DataFrame, followup: pd.DataFrame, exposure_column: str
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Inner join on ecg_id; predictions win on shared columns, follow-up fills their gaps."""
    for name, table in (("predictions", predictions), ("follow-up", followup)):
        if "ecg_id" not in table.columns:
            raise ValueError(f"the {name} table has no ecg_id column")
    if exposure_column not in predictions.columns and exposure_column not in followup.columns:
        raise ValueError(f"exposure column {exposure_column!r} is in neither the predictions nor the follow-up")
    counts: dict[str, int] = {}
    predictions = predictions.drop_duplicates("ecg_id")
    followup = followup.drop_duplicates("ecg_id")
    merged = predictions.merge(followup, on="ecg_id", how="inner", suffixes=("", "__fu"))
    counts["predictions_without_followup"] = int(len(predictions) - len(merged))
    counts["followup_without_predictions"] = int(len(followup) - len(merged))
    for column in [c for c in merged.columns if c.endswith("__fu")]:
        base = column[: -len("__fu")]
        merged[base] = merged[base].where(merged[base].notna(), merged[column])
        merged = merged.drop(columns=column)
    # One ECG per individual: the earliest when dates are known, else the first listed.
    if "patient_id" in merged.columns and merged["patient_id"].notna().any():
        if "ecg_datetime" in merged.columns:
            merged = merged.sort_values(["ecg_datetime", "ecg_id"], kind="stable", na_position="last")
        has_id = merged["patient_id"].notna()
        dup = has_id & merged["patient_id"].duplicated(keep="first")
        counts["later_ecgs_of_same_patient"] = int(dup.sum())
        merged = merged.loc[~dup]
    return merged.reset_index(drop=True), counts


def _as_boolean(series: pd.Series) -> pd.Series:
    values = series.astype(object).where(series.notna(), None)
    return pd.Series(pd.array([None if v is None else bool(v) for v in values], dtype="boolean"))


def _binary_exposure(
    df: pd.DataFrame, exposure_column: str, binary_column: str | None, lvh_config: LVHConfig
) -> tuple[pd.Series, str]:
    """The binary exposure (LVH) as a nullable boolean Series, and how it was defined.

    By default LVH is recomputed from exposure / BSA (predicted LVMI where the table has it) with
    ``lvh_config``, as evaluate does, so both stages use one definition; for predicted mass the
    table's own lvh_pred fills rows where BSA or sex is unknown.
    """
    if binary_column is not None:
        if binary_column not in df.columns:
            raise ValueError(f"binary exposure column {binary_column!r} not found")
        return _as_boolean(df[binary_column]), f"column {binary_column}"
    predicted = exposure_column == "lv_mass_pred_g"
    given_call = _as_boolean(df["lvh_pred"]) if predicted and "lvh_pred" in df else None
    if "bsa_m2" in df.columns or {"height_cm", "weight_kg"} <= set(df.columns):
        derived = derive(df, lvh_config, mass_column=exposure_column, lvmi_column="lvmi_pred" if predicted else None)
        lvh = derived["lvh"].reset_index(drop=True)
        if given_call is not None:
            lvh = lvh.fillna(given_call)
        return lvh, f"{exposure_column} / bsa_m2 over the sex thresholds"
    if given_call is not None:
        return given_call, "column lvh_pred"
    raise ValueError(
        "cannot define the binary LVH exposure: need bsa_m2 (with sex) or an lvh_pred column, or pass binary_column"
    )


def analyse_outcome(
    cohort: pd.DataFrame, name: str, years: np.ndarray, grid_points: int = 200, competing_risks: bool = True
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Cox models and cumulative incidence for one outcome on a prepared cohort.

    ``cohort`` has columns exposure_sd_units, lvh (bool), age, male, sex, and the outcome's
    <o>_prevalent/_event/_time_years (plus death_event/death_time_years for competing risks,
    used unless ``competing_risks`` is False). Prevalent (excluded): flagged <o>_prevalent, or an
    event at time 0 (at the ECG). Raises :class:`FollowupError` for negative times on rows not
    flagged prevalent; rows without a time are excluded and counted.
    """
    prevalent_col = f"{name}_prevalent"
    flagged = (
        cohort[prevalent_col].fillna(False).astype(bool).to_numpy()
        if prevalent_col in cohort.columns
        else np.zeros(len(cohort), dtype=bool)
    )
    time = pd.to_numeric(cohort[f"{name}_time_years"], errors="coerce").to_numpy(dtype=float)
    event = cohort[f"{name}_event"].fillna(False).astype(bool).to_numpy()
    negative = ~flagged & (time < 0)
    if negative.any():
        raise FollowupError(
            f"{name}_time_years is negative in {int(negative.sum())} rows not flagged {prevalent_col}: times run "
            f"from the ECG date (an event before the ECG is prevalent: flag it in {prevalent_col})"
        )
    # An event at or before the ECG is prevalent, flagged or not (the paper excludes these).
    at_ecg = ~flagged & event & (time <= 0)
    prevalent = flagged | at_ecg
    valid_time = np.isfinite(time)
    keep = ~prevalent & valid_time
    data = pd.DataFrame(
        {
            "time": time[keep],
            "event": event[keep].astype(int),
            "lvh": cohort["lvh"].to_numpy(dtype=bool)[keep].astype(float),
            "exposure_per_sd": cohort["exposure_sd_units"].to_numpy(dtype=float)[keep],
            "age": cohort["age"].to_numpy(dtype=float)[keep],
            "male": cohort["male"].to_numpy(dtype=float)[keep],
        }
    )
    competing = None
    if competing_risks and name != "death" and {"death_event", "death_time_years"} <= set(cohort.columns):
        # The follow-up censors non-fatal outcomes at death: a censored time equal to the death
        # time of someone who died is a competing death.
        death_event = cohort["death_event"].fillna(False).astype(bool).to_numpy()[keep]
        death_time = pd.to_numeric(cohort["death_time_years"], errors="coerce").to_numpy(dtype=float)[keep]
        competing = death_event & ~data["event"].astype(bool).to_numpy() & np.isclose(death_time, data["time"])
    events = int(data["event"].sum())
    result: dict[str, Any] = {
        "n": int(len(data)),
        "events": events,
        "hr": None,
        "ci": [None, None],
        "p": None,
        "hr_per_sd": None,
        "ci_per_sd": [None, None],
        "p_per_sd": None,
        "person_years": float(data["time"].sum()),
        "n_prevalent_excluded": int(prevalent.sum()),
        "n_event_at_ecg_excluded": int(at_ecg.sum()),
        "n_invalid_time_excluded": int((~prevalent & ~valid_time).sum()),
        "n_lvh": int(data["lvh"].sum()),
        "events_lvh": int(data.loc[data["lvh"] == 1, "event"].sum()),
        "events_no_lvh": int(data.loc[data["lvh"] == 0, "event"].sum()),
        "competing_deaths": int(competing.sum()) if competing is not None else None,
    }
    result["incidence_per_1000_py"] = 1000 * events / result["person_years"] if result["person_years"] > 0 else None
    notes: list[str] = []
    if events < MIN_EVENTS:
        notes.append(f"only {events} incident events (< {MIN_EVENTS}): Cox models not fitted")
    else:
        ph: dict[str, Any] = {}
        binary = _none_result("")
        if data["lvh"].nunique() < 2:
            notes.append("everyone has the same LVH status: no hazard ratio for LVH")
        else:
            try:
                binary = _fit_cox(data, "lvh")
                ph["lvh_model"] = binary.get("ph_test_p", {})
            except Exception as exc:  # report, never crash the whole stage on one outcome
                notes.append(f"Cox model for LVH failed: {type(exc).__name__}: {exc}")
        continuous = _none_result("")
        try:
            continuous = _fit_cox(data, "exposure_per_sd")
            ph["per_sd_model"] = continuous.get("ph_test_p", {})
        except Exception as exc:
            notes.append(f"Cox model per SD failed: {type(exc).__name__}: {exc}")
        result.update(
            {
                "hr": binary.get("hr"),
                "ci": binary.get("ci", [None, None]),
                "p": binary.get("p"),
                "log_hr": binary.get("coef"),
                "se_log_hr": binary.get("se"),
                "hr_per_sd": continuous.get("hr"),
                "ci_per_sd": continuous.get("ci", [None, None]),
                "p_per_sd": continuous.get("p"),
                "log_hr_per_sd": continuous.get("coef"),
                "se_log_hr_per_sd": continuous.get("se"),
                "covariates_lvh_model": binary.get("covariates"),
                "covariates_per_sd_model": continuous.get("covariates"),
                "ph_test_p": ph,
            }
        )
        all_p = [p for model in ph.values() for p in model.values() if p is not None and math.isfinite(p)]
        result["ph_test_min_p"] = min(all_p) if all_p else None
        for label, fit in (("LVH", binary), ("per SD", continuous)):
            for message in fit.get("warnings", []):
                notes.append(f"{label} model: {message}")
    if notes:
        result["note"] = "; ".join(notes)

    # Cumulative incidence by LVH group, on a fine grid (for curves) and at whole years (tables).
    tmax = float(data["time"].max()) if len(data) else 0.0
    grid = np.unique(np.concatenate([np.linspace(0.0, tmax, grid_points + 1), years[years <= tmax]]))
    rows = []
    yearly: dict[str, Any] = {"years": [float(y) for y in years if y <= tmax]}
    for group, flag in (("lvh", 1.0), ("no_lvh", 0.0)):
        mask = (data["lvh"] == flag).to_numpy()
        t, cif, _ = cumulative_incidence(
            data["time"].to_numpy()[mask],
            data["event"].to_numpy(dtype=bool)[mask],
            None if competing is None else competing[mask],
        )
        group_times = np.sort(data["time"].to_numpy()[mask])
        values = _step_at(t, cif, grid)
        at_risk = len(group_times) - np.searchsorted(group_times, grid, side="left")
        # Stop each curve at its group's last follow-up time: beyond it nothing is observed.
        observed = grid <= (group_times[-1] if len(group_times) else -1.0)
        rows.append(
            pd.DataFrame(
                {
                    "outcome": name,
                    "group": group,
                    "time_years": grid[observed],
                    "cumulative_incidence": values[observed],
                    "n_at_risk": at_risk[observed],
                }
            )
        )
        year_grid = np.asarray(yearly["years"], dtype=float)
        year_values = _step_at(t, cif, year_grid)
        yearly[group] = [
            float(v) if len(group_times) and y <= group_times[-1] else None
            for v, y in zip(year_values, year_grid, strict=True)
        ]
        yearly[f"n_at_risk_{group}"] = [int(len(group_times) - np.searchsorted(group_times, y)) for y in year_grid]
    result["cumulative_incidence_yearly"] = yearly
    return result, pd.concat(rows, ignore_index=True)


def format_hr(hr: Any, ci: Any) -> str:
    """'1.23 (1.01-1.50)'; '-' when not estimated; open bounds (no events in a group) shown as such."""
    if hr is None:
        return "-"
    lo, hi = ci if ci else (None, None)
    lo_text = "?" if lo is None else f"{lo:.2f}"
    hi_text = "inf" if hi is None else f"{hi:.2f}"
    return f"{hr:.2f} ({lo_text}-{hi_text})"


def format_p(p: Any) -> str:
    if p is None:
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def outcomes_markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    label = meta["binary_exposure_label"]
    lines = [
        f"# Outcomes by {label} (n = {meta['n_cohort']})",
        "",
        f"Cox proportional hazards adjusted for age and sex. Exposures: {label} (binary) and "
        f"{meta['exposure_column']} per SD ({meta['exposure_sd']:.1f} g). Prevalent cases excluded.",
        "",
        f"| Outcome | N | Events | Person-years | HR {label} (95% CI) | P | HR per SD (95% CI) | P | PH test min P |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {OUTCOME_NAMES.get(name, name)} | {r['n']} | {r['events']} | {r['person_years']:.0f} | "
            f"{format_hr(r['hr'], r['ci'])} | {format_p(r['p'])} | {format_hr(r['hr_per_sd'], r['ci_per_sd'])} | "
            f"{format_p(r.get('p_per_sd'))} | {format_p(r.get('ph_test_min_p'))} |"
        )
    notes = [f"- {OUTCOME_NAMES.get(n, n)}: {r['note']}" for n, r in results.items() if r.get("note")]
    if notes:
        lines += ["", "Notes:", *notes]
    lines += [
        "",
        f"Cumulative incidence: {meta['cumulative_incidence_method']}. Yearly values by {label}:",
        "",
    ]
    for name, r in results.items():
        yearly = r["cumulative_incidence_yearly"]
        if not yearly["years"]:
            continue
        cells = [
            f"{int(y)} y: {_pct(a)} vs {_pct(b)}"
            for y, a, b in zip(yearly["years"], yearly["lvh"], yearly["no_lvh"], strict=True)
        ]
        lines.append(f"- {OUTCOME_NAMES.get(name, name)} (LVH vs no LVH): " + "; ".join(cells))
    return "\n".join(lines) + "\n"


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def outcomes(
    predictions: str | pd.DataFrame,
    followup: str | pd.DataFrame,
    out: str,
    exposure_column: str = "lv_mass_pred_g",
    exposure_sd: float | None = None,
    binary_column: str | None = None,
    lvh_config: LVHConfig = LVHConfig(),
    outcome_names: list[str] | None = None,
    competing_risks: bool = True,
) -> dict[str, Any]:
    """Run the outcome analyses and write outcomes.json, outcomes_meta.json, outcomes.md and curves.

    ``exposure_column``: the continuous exposure (predicted LV mass by default; ``'lv_mass_g'`` runs
    the same models on true CMR LV mass). ``exposure_sd``: grams per SD for the per-SD hazard
    ratio (default: the SD of the exposure in the joined cohort). ``binary_column``: a boolean
    column to use as the binary exposure; by default LVH = exposure / bsa_m2 over the sex
    thresholds of ``lvh_config`` (for predictions, lvmi_pred where given). ``competing_risks``:
    Aalen-Johansen with death as competing risk (when death columns exist) rather than 1 - KM.
    Returns {OUTCOME: result} as written to outcomes.json.
    """
    wanted = dict.fromkeys(
        [
            "ecg_id",
            "patient_id",
            "ecg_datetime",
            exposure_column,
            "lvmi_pred",
            "lvh_pred",
            "bsa_m2",
            "height_cm",
            "weight_kg",
            "age",
            "sex",
            "model_preset",
            "model_version",
            *([binary_column] if binary_column else []),
        ]
    )
    # Read only what the models need: a predictions table may carry many rule/amplitude columns.
    preds = store.read_any_table(predictions, columns=None if isinstance(predictions, pd.DataFrame) else list(wanted))
    fu = store.read_any_table(followup)
    cohort, counts = _join(preds, fu, exposure_column)
    if cohort.empty:
        raise ValueError("no ECG of the predictions has a follow-up row (join on ecg_id is empty)")
    names = outcome_names or detect_outcomes(cohort)
    if not names:
        raise ValueError("the follow-up table has no <outcome>_event / <outcome>_time_years columns")
    missing = [c for c in ("age", "sex") if c not in cohort.columns]
    if missing:
        raise ValueError(f"the Cox models adjust for age and sex, but {missing} is in neither table")

    cohort["sex"] = normalise_sex(cohort["sex"])
    cohort["age"] = pd.to_numeric(cohort["age"], errors="coerce").astype(float)
    cohort[exposure_column] = pd.to_numeric(cohort[exposure_column], errors="coerce").astype(float)
    lvh, binary_definition = _binary_exposure(cohort, exposure_column, binary_column, lvh_config)
    cohort["lvh"] = lvh.array
    usable = (
        np.isfinite(cohort[exposure_column].to_numpy())
        & np.isfinite(cohort["age"].to_numpy())
        & cohort["sex"].notna().to_numpy()
        & cohort["lvh"].notna().to_numpy()
    )
    counts["missing_exposure_or_covariates"] = int((~usable).sum())
    cohort = cohort.loc[usable].reset_index(drop=True)
    cohort["lvh"] = cohort["lvh"].astype(bool)
    cohort["male"] = (cohort["sex"] == "M").astype(float)
    sd_source = "given"
    if exposure_sd is None:
        exposure_sd = float(cohort[exposure_column].std(ddof=1))
        sd_source = "cohort SD"
    if not (exposure_sd and math.isfinite(exposure_sd) and exposure_sd > 0):
        raise ValueError(f"the SD of {exposure_column} is {exposure_sd}: cannot express hazard ratios per SD")
    cohort["exposure_sd_units"] = cohort[exposure_column] / exposure_sd

    max_time = max((pd.to_numeric(cohort[f"{n}_time_years"], errors="coerce").max() for n in names), default=0.0)
    years = np.arange(1.0, math.floor(max_time) + 1.0) if math.isfinite(max_time) else np.zeros(0)
    results: dict[str, Any] = {}
    curves = []
    for name in names:
        result, curve = analyse_outcome(cohort, name, years, competing_risks=competing_risks)
        results[name] = result
        curves.append(curve)

    predicted = exposure_column == "lv_mass_pred_g"
    has_death = {"death_event", "death_time_years"} <= set(cohort.columns)
    if not has_death:
        ci_method = "1 - Kaplan-Meier (no death columns: deaths treated as censoring)"
    elif competing_risks:
        ci_method = "Aalen-Johansen with death as a competing risk (1 - Kaplan-Meier for death)"
    else:
        ci_method = "1 - Kaplan-Meier (competing_risks=False: deaths treated as censoring)"
    meta = {
        "n_cohort": int(len(cohort)),
        "exclusions": counts,
        "outcomes": names,
        "exposure_column": exposure_column,
        "exposure_sd": exposure_sd,
        "exposure_sd_source": sd_source,
        "binary_exposure": binary_definition,
        "binary_exposure_label": "LVM-AI LVH" if predicted else f"LVH ({exposure_column})",
        "n_lvh": int(cohort["lvh"].sum()),
        "lvh_thresholds_g_m2": dict(lvh_config.thresholds_g_m2),
        "adjustment": ["age (per year)", "sex (male)"],
        "model": "Cox proportional hazards (lifelines CoxPHFitter, Efron ties); "
        "PH check: Schoenfeld residual test, rank time transform",
        "cox_fit_options": dict(COX_FIT_OPTIONS),
        "cumulative_incidence_method": ci_method,
        "min_events": MIN_EVENTS,
        "model_preset": sorted({str(v) for v in preds.get("model_preset", pd.Series(dtype=object)).dropna()}),
        "model_version": sorted({str(v) for v in preds.get("model_version", pd.Series(dtype=object)).dropna()}),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    store.write_json(store.join_url(out, OUTCOMES_JSON), results)
    store.write_json(store.join_url(out, OUTCOMES_META_JSON), meta)
    store.write_table(store.join_url(out, CUMULATIVE_INCIDENCE_PARQUET), pd.concat(curves, ignore_index=True))
    store.write_bytes(
        store.join_url(out, OUTCOMES_MD), outcomes_markdown(store.jsonable(results), store.jsonable(meta)).encode()
    )
    return store.jsonable(results)
