"""`lvm-ray report`: the evaluation (and outcome) results as ONE self-contained HTML file.

Reads only what :func:`lvm_ray.evaluate.evaluate` wrote to ``--eval DIR`` (metrics.json,
table.json, pairs.parquet, roc.parquet) and, optionally, what :func:`lvm_ray.outcomes.outcomes`
wrote to ``--outcomes DIR`` (outcomes.json, outcomes_meta.json, cumulative_incidence.parquet).
Figures are matplotlib PNGs embedded as base64 data URIs; CSS is inline; there is no script and
no external resource, so the file can be mailed, archived or opened offline.

Matplotlib is used through ``Figure`` + the Agg canvas directly, not pyplot: no global backend
switch, no figure manager, safe to call from a worker thread or a server.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, NullFormatter

from lvm_ray import store
from lvm_ray.evaluate import (
    DISPLAY_NAMES,
    METRICS_JSON,
    PAIRS_PARQUET,
    ROC_PARQUET,
    TABLE_HEADERS,
    TABLE_JSON,
)
from lvm_ray.outcomes import (
    CUMULATIVE_INCIDENCE_PARQUET,
    OUTCOME_NAMES,
    OUTCOMES_JSON,
    OUTCOMES_META_JSON,
    format_hr,
)

#: Scatter plots switch to hexagonal binning above this many points (readable and small).
HEXBIN_ABOVE = 5000
RULE_MARKERS = {"lvm_ai_lvh": "*", "sokolow_lyon": "o", "cornell": "s", "avl": "^", "any_rule": "D"}
LVH_COLOURS = {"lvh": "#c0392b", "no_lvh": "#2c7fb8"}

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; background: #fff; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
.meta { color: #555; font-size: 0.95em; }
.meta span { margin-right: 1.5em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; }
th { background: #f0f3f6; }
tr:nth-child(even) td { background: #fafafa; }
.figs { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0.5em 0; }
figcaption { font-size: 0.85em; color: #555; max-width: 520px; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.note { color: #8a6d3b; background: #fcf8e3; padding: 0.4em 0.8em; border-radius: 4px; }
.small { font-size: 0.85em; color: #555; }
"""


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _p(value: Any) -> str:
    if value is None:
        return "-"
    return "&lt;0.001" if value < 0.001 else f"{value:.3f}"


def _thresholds(thresholds: Any) -> str:
    if not isinstance(thresholds, dict):
        return "the configured thresholds"
    return f"{_num(thresholds.get('M'), 0)} g/m&sup2; in men, {_num(thresholds.get('F'), 0)} g/m&sup2; in women"


def _png(fig: Figure) -> str:
    """Render a Figure with the Agg canvas and return it as a base64 string."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", facecolor="white")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure_html(fig_id: str, alt: str, fig: Figure, caption: str) -> str:
    return (
        f'<figure><img id="{_esc(fig_id)}" alt="{_esc(alt)}" src="data:image/png;base64,{_png(fig)}">'
        f"<figcaption>{_esc(caption)}</figcaption></figure>"
    )


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """A table; cells are already HTML (escape before passing)."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def scatter_figure(pairs: pd.DataFrame, metrics: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(5.2, 5.0))
    ax = fig.add_subplot()
    x, y = pairs["lv_mass_g"].to_numpy(float), pairs["lv_mass_pred_g"].to_numpy(float)
    if len(x) > HEXBIN_ABOVE:
        hb = ax.hexbin(x, y, gridsize=60, bins="log", cmap="viridis", mincnt=1)
        fig.colorbar(hb, ax=ax, label="ECGs (log scale)")
    else:
        ax.scatter(x, y, s=6, alpha=0.45, color="#2c7fb8", edgecolors="none")
    lo = float(np.nanmin([x.min(), y.min()])) if len(x) else 0.0
    hi = float(np.nanmax([x.max(), y.max()])) if len(x) else 1.0
    ax.plot([lo, hi], [lo, hi], color="#444", lw=1, ls="--", label="identity")
    r, ci = metrics.get("pearson_r"), metrics.get("pearson_r_ci") or [None, None]
    ax.text(
        0.04,
        0.96,
        f"r = {_num(r)} ({_num(ci[0])}-{_num(ci[1])})\nMAE = {_num(metrics.get('mae_g'), 1)} g\nn = {len(x)}",
        transform=ax.transAxes,
        va="top",
        fontsize=10,
        bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "#ccc"},
    )
    ax.set_xlabel("CMR LV mass (g)")
    ax.set_ylabel("LVM-AI predicted LV mass (g)")
    ax.set_title("Predicted vs CMR LV mass")
    ax.legend(loc="lower right", fontsize=9)
    return fig


def bland_altman_figure(pairs: pd.DataFrame, metrics: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(5.2, 5.0))
    ax = fig.add_subplot()
    ref, pred = pairs["lv_mass_g"].to_numpy(float), pairs["lv_mass_pred_g"].to_numpy(float)
    mean, diff = (ref + pred) / 2, pred - ref
    if len(mean) > HEXBIN_ABOVE:
        ax.hexbin(mean, diff, gridsize=60, bins="log", cmap="viridis", mincnt=1)
    else:
        ax.scatter(mean, diff, s=6, alpha=0.45, color="#2c7fb8", edgecolors="none")
    ba = metrics.get("bland_altman") or {}
    for key, style, label in (
        ("mean_diff", "-", "mean difference"),
        ("loa_lower", "--", "95% limits of agreement"),
        ("loa_upper", "--", None),
    ):
        if ba.get(key) is not None:
            ax.axhline(ba[key], color="#c0392b", ls=style, lw=1.2, label=label)
            ax.annotate(
                f"{ba[key]:.1f}",
                xy=(1.0, ba[key]),
                xycoords=("axes fraction", "data"),
                fontsize=8,
                va="bottom",
                ha="right",
            )
    ax.axhline(0, color="#888", lw=0.8)
    ax.set_xlabel("Mean of predicted and CMR LV mass (g)")
    ax.set_ylabel("Predicted - CMR LV mass (g)")
    ax.set_title("Bland-Altman")
    ax.legend(loc="lower right", fontsize=9)
    return fig


def roc_figure(roc: pd.DataFrame, metrics: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(5.2, 5.0))
    ax = fig.add_subplot()
    c_stats = metrics.get("c_statistics", {})
    auc = (c_stats.get("lvm_ai_lvmi") or {}).get("auc")
    ax.plot([0, 1], [0, 1], color="#aaa", lw=0.8, ls=":")
    score = "LV mass" if metrics.get("continuous_score") == "lv_mass_pred_g" else "LVMI"  # LV mass: no BSA known
    if len(roc):
        ax.plot(roc["fpr"], roc["tpr"], color="#2c7fb8", lw=2, label=f"LVM-AI predicted {score} (c = {_num(auc)})")
    for name, call in (metrics.get("binary_calls") or {}).items():
        if name not in RULE_MARKERS or call.get("sensitivity") is None or call.get("specificity") is None:
            continue
        c = (c_stats.get(name) or {}).get("auc")
        ax.scatter(
            1 - call["specificity"],
            call["sensitivity"],
            marker=RULE_MARKERS[name],
            s=90 if name == "lvm_ai_lvh" else 55,
            zorder=3,
            edgecolors="black",
            linewidths=0.6,
            label=f"{DISPLAY_NAMES.get(name, name)} (c = {_num(c)})",
        )
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("Sensitivity")
    reference = "Reference LVH" if metrics.get("reference") == "lvh_column" else "CMR LVH"
    ax.set_title(f"{reference}: ROC of predicted {score}; binary calls as points")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def cumulative_incidence_figure(curves: pd.DataFrame, name: str, result: dict[str, Any], label: str) -> Figure:
    fig = Figure(figsize=(5.2, 4.2))
    ax = fig.add_subplot()
    for group, text in (("lvh", label), ("no_lvh", f"No {label}")):
        part = curves[curves["group"] == group].sort_values("time_years")
        if len(part):
            ax.step(
                part["time_years"],
                100 * part["cumulative_incidence"],
                where="post",
                color=LVH_COLOURS[group],
                lw=2,
                label=text,
            )
    hr_text = f"HR {format_hr(result.get('hr'), result.get('ci'))}, P {_p(result.get('p')).replace('&lt;', '<')}"
    ax.text(0.03, 0.95, hr_text, transform=ax.transAxes, va="top", fontsize=9)
    ax.set_xlabel("Years from ECG")
    ax.set_ylabel("Cumulative incidence (%)")
    ax.set_title(f"{OUTCOME_NAMES.get(name, name)} (events {result.get('events')}, n {result.get('n')})")
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right", fontsize=9)
    return fig


def _hr_ticks(ax: Any, values: list[float]) -> None:
    """Readable ticks on a log hazard-ratio axis (matplotlib's log labels crowd on short ranges)."""
    finite = [v for v in values if v is not None and 0 < v < math.inf]  # a log axis cannot show 0 or inf
    lo = min([1.0, *finite]) / 1.15
    hi = max([1.0, *finite]) * 1.15
    ax.set_xlim(lo, hi)
    candidates = [0.1, 0.2, 0.25, 0.33, 0.5, 0.67, 0.75, 1, 1.25, 1.5, 2, 3, 4, 5, 8, 10, 20, 50]
    ticks = [t for t in candidates if lo <= t <= hi]
    if len(ticks) > 7:
        ticks = sorted({*ticks[:: math.ceil(len(ticks) / 7)], 1})
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def forest_figure(results: dict[str, Any], label: str) -> Figure:
    names = list(results)
    fig = Figure(figsize=(8.5, 0.55 * len(names) + 1.6))
    axes = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(names))[::-1]
    for ax, (hr_key, ci_key, title, colour) in zip(
        axes,
        (("hr", "ci", f"{label} (binary)", "#c0392b"), ("hr_per_sd", "ci_per_sd", "Per SD of LV mass", "#2c7fb8")),
        strict=True,
    ):
        for yi, name in zip(y, names, strict=True):
            r = results[name]
            hr, ci = r.get(hr_key), r.get(ci_key) or [None, None]
            if hr is None or ci[0] is None or ci[1] is None:
                ax.text(1.0, yi, "not estimated", ha="center", va="center", fontsize=8, color="#888")
                continue
            ax.plot([ci[0], ci[1]], [yi, yi], color=colour, lw=2)
            ax.plot([hr], [yi], marker="s", color=colour, ms=7)
        ax.axvline(1.0, color="#555", lw=0.8, ls="--")
        ax.set_xscale("log")
        _hr_ticks(ax, [v for r in results.values() for v in (r.get(ci_key) or []) if v is not None])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("Hazard ratio (95% CI), log scale")
    axes[0].set_yticks(y)
    axes[0].set_yticklabels([OUTCOME_NAMES.get(n, n) for n in names])
    axes[0].set_ylim(-0.7, len(names) - 0.3)
    fig.suptitle("Cox models adjusted for age and sex", fontsize=11)
    return fig


def _subgroup_rows(metrics: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, statistics) of each subgroup in metrics["subgroups"], in display order."""
    groups = metrics.get("subgroups") or {}
    rows: list[tuple[str, dict[str, Any]]] = []
    for sex, label in (("M", "Men"), ("F", "Women")):
        if sex in groups.get("sex", {}):
            rows.append((label, groups["sex"][sex]))
    for name, title in (("age", "Age"), ("bmi", "BMI")):
        for band, stats in (groups.get(name) or {}).items():
            if band != "unknown":
                rows.append((f"{title} {band}", stats))
    for name, bands in groups.items():  # further bands a user configured
        if name not in ("sex", "age", "bmi", "bands") and isinstance(bands, dict):
            rows += [(f"{name} {band}", stats) for band, stats in bands.items() if band != "unknown"]
    return rows


def subgroup_forest_figure(metrics: dict[str, Any]) -> Figure:
    """Pearson r and the c-statistic of predicted LVMI (95% CIs) in each subgroup, the whole cohort on top."""
    overall = {
        "n": metrics.get("n"),
        "pearson_r": metrics.get("pearson_r"),
        "pearson_r_ci": metrics.get("pearson_r_ci"),
        "c_statistics": {"lvm_ai_lvmi": (metrics.get("c_statistics") or {}).get("lvm_ai_lvmi") or {}},
    }
    rows = [("All", overall), *_subgroup_rows(metrics)]
    fig = Figure(figsize=(8.5, 0.42 * len(rows) + 1.6))
    axes = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(rows))[::-1]
    panels = (
        ("Pearson r, predicted vs CMR LV mass", lambda r: (r.get("pearson_r"), r.get("pearson_r_ci")), "#2c7fb8"),
        (
            "c-statistic of predicted LVMI for CMR LVH",
            lambda r: (
                (r.get("c_statistics") or {}).get("lvm_ai_lvmi", {}).get("auc"),
                (r.get("c_statistics") or {}).get("lvm_ai_lvmi", {}).get("ci"),
            ),
            "#c0392b",
        ),
    )
    for ax, (title, get, colour) in zip(axes, panels, strict=True):
        values = []
        for yi, (_, stats) in zip(y, rows, strict=True):
            value, ci = get(stats)
            ci = ci or [None, None]
            if value is None or (isinstance(value, float) and not math.isfinite(value)):
                ax.text(
                    0.5,
                    yi,
                    "not estimated",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="#888",
                    transform=ax.get_yaxis_transform(),
                )
                continue
            values += [value, *(c for c in ci if c is not None)]
            if ci[0] is not None and ci[1] is not None:
                ax.plot([ci[0], ci[1]], [yi, yi], color=colour, lw=2)
            ax.plot([value], [yi], marker="D" if yi == y[0] else "s", color=colour, ms=7)
        if values:
            lo, hi = min(values), max(values)
            pad = max(0.02, 0.1 * (hi - lo))
            ax.set_xlim(lo - pad, min(1.0, hi + pad) if hi <= 1 else hi + pad)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("estimate (95% CI)")
        ax.grid(axis="x", color="#eee")
    axes[0].set_yticks(y)
    axes[0].set_yticklabels([f"{label} (n {stats.get('n')})" for label, stats in rows])
    axes[0].set_ylim(-0.7, len(rows) - 0.3)
    fig.suptitle("Performance by subgroup", fontsize=11)
    return fig


def calibration_figure(metrics: dict[str, Any]) -> Figure:
    """Left: mean CMR vs mean predicted LV mass by decile; right: observed vs predicted P(LVH) by bin."""
    calibration = metrics.get("calibration") or {}
    fig = Figure(figsize=(10.4, 4.9))
    mass_ax, prob_ax = fig.subplots(1, 2)
    mass = calibration.get("lv_mass") or {}
    deciles = mass.get("deciles") or []
    if deciles:
        x = np.array([d["pred_mean_g"] for d in deciles])
        y = np.array([d["cmr_mean_g"] for d in deciles])
        err = np.array(
            [
                [
                    d["cmr_mean_g"] - (d["cmr_mean_ci_g"][0] or d["cmr_mean_g"]),
                    (d["cmr_mean_ci_g"][1] or d["cmr_mean_g"]) - d["cmr_mean_g"],
                ]
                for d in deciles
            ]
        ).T.clip(min=0)
        lo, hi = float(min(x.min(), y.min())) * 0.95, float(max(x.max(), y.max())) * 1.05
        mass_ax.plot([lo, hi], [lo, hi], color="#444", lw=1, ls="--", label="identity")
        mass_ax.errorbar(x, y, yerr=err, fmt="o", color="#2c7fb8", capsize=3, label="decile of prediction")
        if mass.get("slope") is not None:
            grid = np.array([lo, hi])
            mass_ax.plot(
                grid,
                mass["intercept"] + mass["slope"] * grid,
                color="#c0392b",
                lw=1.2,
                label=f"CMR = {mass['intercept']:.1f} + {mass['slope']:.2f} x predicted",
            )
        mass_ax.set_xlim(lo, hi)
        mass_ax.set_ylim(lo, hi)
        mass_ax.legend(loc="upper left", fontsize=8)
    else:
        mass_ax.text(0.5, 0.5, "no CMR LV mass", ha="center", va="center", transform=mass_ax.transAxes)
    mass_ax.set_xlabel("Mean predicted LV mass (g)")
    mass_ax.set_ylabel("Mean CMR LV mass (g, 95% CI)")
    mass_ax.set_title("LV mass calibration")
    prob_ax.plot([0, 1], [0, 1], color="#444", lw=1, ls="--", label="identity")
    top = 0.05
    for column, label, colour, marker in (
        ("lvh_prob_calibrated", "lvh_prob_calibrated (conformal)", "#2c7fb8", "o"),
        ("lvh_prob", "lvh_prob (LVH head, raw)", "#e67e22", "s"),
    ):
        bins = (calibration.get(column) or {}).get("bins") or []
        if not bins:
            continue
        px = np.array([b["mean_predicted"] for b in bins])
        py = np.array([b["observed"] for b in bins])
        # Clipped at 0: a Wilson bound can sit a rounding error on the wrong side of the estimate.
        err = np.clip(
            [[b["observed"] - b["observed_ci"][0], b["observed_ci"][1] - b["observed"]] for b in bins], 0, 1
        ).T
        stats = calibration[column]
        text = f"{label}: slope {_num(stats.get('slope'), 2)}, Brier {_num(stats.get('brier'), 3)}"
        prob_ax.errorbar(px, py, yerr=err, fmt=marker + "-", color=colour, capsize=3, lw=1, label=text)
        top = max(top, float(np.nanmax(np.concatenate([px, py + err[1]]))))
    top = min(1.0, top * 1.1)
    prob_ax.set_xlim(0, top)
    prob_ax.set_ylim(0, top)
    prob_ax.set_xlabel("Mean predicted probability of CMR LVH")
    prob_ax.set_ylabel("Observed CMR LVH (95% CI)")
    prob_ax.set_title("LVH probability calibration (bins of equal size)")
    prob_ax.legend(loc="upper left", fontsize=8)
    return fig


def interval_figure(metrics: dict[str, Any]) -> Figure:
    """Coverage of the prediction intervals overall, by sex and by decile of predicted LV mass."""
    interval = metrics.get("interval") or {}
    level = interval.get("level")
    deciles = ((metrics.get("calibration") or {}).get("lv_mass") or {}).get("deciles") or []
    fig = Figure(figsize=(8.5, 4.2))
    ax = fig.add_subplot()
    labels, values, cis = [], [], []
    by_sex = interval.get("by_sex") or {}
    for label, stats in (("All", interval), ("Men", by_sex.get("M") or {}), ("Women", by_sex.get("F") or {})):
        labels.append(label)
        values.append(stats.get("coverage"))
        cis.append(stats.get("coverage_ci") or [None, None])
    for d in deciles:
        labels.append(f"D{d['bin']}")
        values.append(d.get("interval_coverage"))
        cis.append(d.get("interval_coverage_ci") or [None, None])
    x = np.arange(len(labels))
    for xi, value, ci in zip(x, values, cis, strict=True):
        if value is None:
            continue
        colour = "#c0392b" if xi < 3 else "#2c7fb8"
        if ci[0] is not None:
            ax.plot([xi, xi], [100 * ci[0], 100 * ci[1]], color=colour, lw=2)
        ax.plot([xi], [100 * value], marker="o", color=colour, ms=6)
    if level is not None:
        ax.axhline(100 * level, color="#444", ls="--", lw=1, label=f"nominal {100 * level:g}%")
        ax.legend(loc="lower right", fontsize=8)
    ax.axvline(2.5, color="#ccc", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("ECGs whose CMR LV mass is inside the interval (%)")
    ax.set_xlabel("whole cohort, by sex, and by decile of predicted LV mass (D1 lowest)")
    ax.set_title("Coverage of the LV mass prediction intervals (Wilson 95% CI)")
    return fig


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def _pct_ci(value: Any, ci: Any) -> str:
    if value is None:
        return "-"
    lo, hi = ci if ci else (None, None)
    inner = f" ({_num(100 * lo, 1)}-{_num(100 * hi, 1)})" if lo is not None and hi is not None else ""
    return f"{_num(100 * value, 1)}%{inner}"


def _est_ci(value: Any, ci: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    lo, hi = ci if ci else (None, None)
    return f"{_num(value, digits)} ({_num(lo, digits)}-{_num(hi, digits)})" if lo is not None else _num(value, digits)


def _intervals_section(metrics: dict[str, Any]) -> str:
    """Subgroups (forest plot, table), interval coverage and calibration; notes where absent."""
    if "subgroups" not in metrics:
        return '<h2>Subgroups and calibration</h2><p class="note">This evaluation predates subgroup analysis.</p>'
    interval = metrics.get("interval") or {}
    figures = [
        _figure_html(
            "fig-subgroups",
            "Forest plot of Pearson r and c-statistic by subgroup",
            subgroup_forest_figure(metrics),
            "Pearson r (Fisher-z 95% CI) and the c-statistic of predicted LVMI (DeLong 95% CI) by sex, age and BMI.",
        )
    ]
    rows = []
    for label, stats in _subgroup_rows(metrics):
        c = stats.get("c_statistics") or {}
        rows.append(
            [
                _esc(label),
                _esc(stats.get("n")),
                _esc(stats.get("n_lvh")),
                _est_ci(stats.get("pearson_r"), stats.get("pearson_r_ci")),
                _num(stats.get("mae_g"), 1),
                _pct_ci(stats.get("interval_coverage"), stats.get("interval_coverage_ci")),
                _est_ci((c.get("lvm_ai_lvmi") or {}).get("auc"), (c.get("lvm_ai_lvmi") or {}).get("ci")),
                _est_ci((c.get("any_rule") or {}).get("auc"), (c.get("any_rule") or {}).get("ci")),
                _esc("; ".join(stats.get("notes") or [])),
            ]
        )
    subgroup_table = _table(
        [
            "Subgroup",
            "n",
            "LVH",
            "Pearson r (95% CI)",
            "MAE (g)",
            "Interval coverage",
            "c LVMI (95% CI)",
            "c any rule (95% CI)",
            "Note",
        ],
        rows,
    )
    if interval.get("coverage") is not None:
        by_sex = interval.get("by_sex") or {}
        interval_html = _table(
            ["Level", "ECGs", "Coverage (95% CI)", "Men", "Women", "Mean width (g)", "Median width (g)"],
            [
                [
                    f"{_num(100 * interval['level'], 0)}%" if interval.get("level") else "mixed",
                    _esc(interval.get("n")),
                    _pct_ci(interval.get("coverage"), interval.get("coverage_ci")),
                    _pct_ci((by_sex.get("M") or {}).get("coverage"), (by_sex.get("M") or {}).get("coverage_ci")),
                    _pct_ci((by_sex.get("F") or {}).get("coverage"), (by_sex.get("F") or {}).get("coverage_ci")),
                    _num(interval.get("mean_width_g"), 1),
                    _num(interval.get("median_width_g"), 1),
                ]
            ],
        )
        interval_html += _figure_html(
            "fig-interval-coverage",
            "Coverage of the LV mass prediction intervals overall, by sex and by decile",
            interval_figure(metrics),
            "Share of ECGs whose CMR LV mass lies inside its prediction interval; dashed: the nominal level.",
        )
    else:
        interval_html = f'<p class="note">{_esc(interval.get("note") or "No prediction intervals.")}</p>'
    calibration = metrics.get("calibration") or {}
    mass = calibration.get("lv_mass") or {}
    cal_rows = [
        [
            "LV mass (CMR on predicted, OLS)",
            _esc(mass.get("n")),
            "-",
            "-",
            _est_ci(mass.get("slope"), mass.get("slope_ci")),
            _est_ci(mass.get("intercept"), mass.get("intercept_ci"), 1) + " g",
            "-",
        ]
    ]
    for column in ("lvh_prob_calibrated", "lvh_prob"):
        stats = calibration.get(column)
        if stats is None:
            continue
        cal_rows.append(
            [
                _esc(column) + ("" if stats.get("brier") is not None else f" ({_esc(stats.get('note', ''))})"),
                _esc(stats.get("n")),
                _num(stats.get("brier"), 4),
                _num(stats.get("brier_prevalence_only"), 4),
                _est_ci(stats.get("slope"), stats.get("slope_ci")),
                _est_ci(stats.get("intercept"), stats.get("intercept_ci")),
                _num(stats.get("ece"), 4),
            ]
        )
    calibration_table = _table(
        ["Prediction", "n", "Brier", "Brier (prevalence only)", "Slope (95% CI)", "Intercept (95% CI)", "ECE"],
        cal_rows,
    )
    figures.append(
        _figure_html(
            "fig-calibration",
            "Calibration plots of LV mass and of the probability of LVH",
            calibration_figure(metrics),
            "Left: mean CMR against mean predicted LV mass by decile of prediction. Right: observed CMR LVH "
            "against the mean predicted probability in bins of equal size; on the identity line, calibrated.",
        )
    )
    return f"""
<h2>Prediction intervals</h2>
<p class="small">Split-conformal intervals by sex (lvm-ray calibrate): at the stated level they should
cover that share of the CMR LV masses in men and in women alike.</p>
{interval_html}
<h2>Performance by subgroup</h2>
{subgroup_table}
<div class="figs">{figures[0]}</div>
<h2>Calibration</h2>
<p class="small">Probability slope: logistic regression of CMR LVH on logit(p) (1 = calibrated, below 1 =
too extreme); intercept: calibration-in-the-large (0 = calibrated); ECE: expected calibration error over
10 bins of equal size.</p>
{calibration_table}
<div class="figs">{figures[1]}</div>
"""


def _evaluation_section(eval_dir: str) -> tuple[str, dict[str, Any]]:
    metrics = store.read_json(store.join_url(eval_dir, METRICS_JSON))
    table = (
        store.read_json(store.join_url(eval_dir, TABLE_JSON))
        if store.exists(store.join_url(eval_dir, TABLE_JSON))
        else {"rows": []}
    )
    pairs = store.read_parquet(store.join_url(eval_dir, PAIRS_PARQUET))
    roc_url = store.join_url(eval_dir, ROC_PARQUET)
    roc = store.read_parquet(roc_url) if store.exists(roc_url) else pd.DataFrame(columns=["fpr", "tpr"])

    ba = metrics.get("bland_altman") or {}
    ci = metrics.get("pearson_r_ci") or [None, None]
    summary = _table(
        [
            "n",
            f"{'Reference' if metrics.get('reference') == 'lvh_column' else 'CMR'} LVH (prevalence)",
            "Pearson r (95% CI)",
            "MAE (g)",
            "Mean difference (g)",
            "LoA (g)",
        ],
        [
            [
                _esc(metrics.get("n")),
                f"{_esc(metrics.get('n_lvh'))} ({_num(100 * (metrics.get('prevalence') or float('nan')), 1)}%)",
                f"{_num(metrics.get('pearson_r'))} ({_num(ci[0])}-{_num(ci[1])})",
                _num(metrics.get("mae_g"), 1),
                _num(ba.get("mean_diff"), 1),
                f"{_num(ba.get('loa_lower'), 1)} to {_num(ba.get('loa_upper'), 1)}",
            ]
        ],
    )
    paper = _table(
        [_esc(h) for _, h in TABLE_HEADERS],
        [[_esc(row.get(key)) for key, _ in TABLE_HEADERS] for row in table.get("rows", [])],
    )
    calls = metrics.get("binary_calls") or {}
    call_rows = [
        [
            _esc(DISPLAY_NAMES.get(name, name)),
            _esc(c.get("n")),
            _esc(c.get("tp")),
            _esc(c.get("fp")),
            _esc(c.get("fn")),
            _esc(c.get("tn")),
            _esc(c.get("n_not_measurable", 0)),
        ]
        for name, c in calls.items()
    ]
    counts = _table(["Binary call", "n", "TP", "FP", "FN", "TN", "Not measurable"], call_rows)
    exclusions = metrics.get("exclusions") or {}
    excl_text = ", ".join(f"{_esc(k.replace('_', ' '))}: {_esc(v)}" for k, v in exclusions.items()) or "none"

    # Without CMR LV mass the labels' LVH column is the reference (evaluate --lvh-column): no mass plots.
    by_column = metrics.get("reference") == "lvh_column"
    reference = "the reference LVH" if by_column else "CMR LVH"
    score = "predicted LV mass" if metrics.get("continuous_score") == "lv_mass_pred_g" else "predicted LVMI"
    notes = "".join(f'<p class="note">{_esc(note)}</p>' for note in metrics.get("notes") or [])
    figures = []
    if by_column:
        figures += ['<p class="note">No CMR LV mass: no scatter or Bland-Altman plot.</p>', ""]
    elif len(pairs):
        figures.append(
            _figure_html(
                "fig-scatter",
                "Scatter plot of LVM-AI predicted versus CMR LV mass",
                scatter_figure(pairs, metrics),
                "Each point an ECG; dashed line: identity. r by Pearson with Fisher-z 95% CI.",
            )
        )
        figures.append(
            _figure_html(
                "fig-bland-altman",
                "Bland-Altman plot of predicted minus CMR LV mass",
                bland_altman_figure(pairs, metrics),
                "Difference (predicted - CMR) against the mean; red: mean difference and 95% limits of agreement.",
            )
        )
    if len(roc):
        figures.append(
            _figure_html(
                "fig-roc",
                f"ROC curve of {score} for {reference} with voltage rules as points",
                roc_figure(roc, metrics),
                f"ROC of the continuous prediction ({score}) for {reference}; each binary call (dichotomised "
                "LVM-AI, voltage rules) is one operating point, its c-statistic (sensitivity + specificity) / 2.",
            )
        )
    else:
        figures.append(f'<p class="note">No ROC curve: {reference} has a single class in this data.</p>')

    thresholds = _thresholds(metrics.get("lvh_thresholds_g_m2"))
    reference_text = (
        f"Reference LVH: the labels' column {_esc(metrics.get('lvh_column'))} (no CMR LV mass); "
        f"LVM-AI LVH: predicted LVMI above {thresholds} (strict)."
        if by_column
        else f"CMR LVH: LVMI above {thresholds} (strict)."
    )
    section = f"""
{notes}
<h2>Agreement with CMR LV mass</h2>
{summary}
<p class="small">Excluded (missing label or prediction): {_esc(metrics.get("n_excluded", 0))} ({excl_text}).</p>
<div class="figs">{"".join(figures[:2])}</div>
<h2>Discrimination of {reference}</h2>
<p class="small">{reference_text}
{_esc(metrics.get("ci_method", ""))} 95% CIs.</p>
{paper}
<div class="figs">{"".join(figures[2:])}</div>
<h3>Binary calls: counts</h3>
{counts}
"""
    return section, metrics


def _outcomes_section(outcomes_dir: str) -> str:
    results = store.read_json(store.join_url(outcomes_dir, OUTCOMES_JSON))
    meta_url = store.join_url(outcomes_dir, OUTCOMES_META_JSON)
    meta = store.read_json(meta_url) if store.exists(meta_url) else {}
    label = meta.get("binary_exposure_label", "LVM-AI LVH")
    curves_url = store.join_url(outcomes_dir, CUMULATIVE_INCIDENCE_PARQUET)
    curves = store.read_parquet(curves_url) if store.exists(curves_url) else pd.DataFrame(columns=["outcome", "group"])

    rows = []
    for name, r in results.items():
        rows.append(
            [
                _esc(OUTCOME_NAMES.get(name, name)),
                _esc(r.get("n")),
                _esc(r.get("events")),
                _num(r.get("person_years"), 0),
                format_hr(r.get("hr"), r.get("ci")),
                _p(r.get("p")),
                format_hr(r.get("hr_per_sd"), r.get("ci_per_sd")),
                _p(r.get("p_per_sd")),
                _p(r.get("ph_test_min_p")),
                _esc(r.get("note", "")),
            ]
        )
    cox = _table(
        [
            "Outcome",
            "n",
            "Events",
            "Person-years",
            f"HR {_esc(label)} (95% CI)",
            "P",
            "HR per SD (95% CI)",
            "P",
            "PH test min P",
            "Note",
        ],
        rows,
    )
    figures = [
        _figure_html(
            "fig-forest",
            "Forest plot of hazard ratios for each outcome",
            forest_figure(results, label),
            f"Hazard ratios for {label} and per SD of LV mass, adjusted for age and sex.",
        )
    ]
    for name, r in results.items():
        part = curves[curves["outcome"] == name]
        if part.empty:
            continue
        figures.append(
            _figure_html(
                f"fig-cuminc-{name}",
                f"Cumulative incidence of {OUTCOME_NAMES.get(name, name)} by {label}",
                cumulative_incidence_figure(part, name, r, label),
                f"{meta.get('cumulative_incidence_method', 'Cumulative incidence')}; prevalent cases excluded.",
            )
        )
    sd = meta.get("exposure_sd")
    return f"""
<h2>Outcomes</h2>
<p class="small">n = {_esc(meta.get("n_cohort"))}; exposure {_esc(meta.get("exposure_column"))}
(SD {_num(sd, 1)} g, {_esc(meta.get("exposure_sd_source", ""))}); binary exposure: {_esc(meta.get("binary_exposure"))}.
{_esc(meta.get("model", ""))}.</p>
{cox}
<div class="figs">{"".join(figures)}</div>
"""


class ReportError(ValueError):
    """The report cannot be made from these inputs (the message names the folder and what is missing)."""


def check_report_inputs(eval_dir: str, outcomes_dir: str | None, out: str) -> None:
    """One-line errors for every input mistake, before anything is read or written."""
    if not store.exists(store.join_url(eval_dir, METRICS_JSON)):
        what = "does not exist" if not store.exists(eval_dir) else f"has no {METRICS_JSON}"
        raise ReportError(f"--eval {eval_dir} {what}: give a folder written by `lvm-ray evaluate`")
    if outcomes_dir is not None and not store.exists(store.join_url(outcomes_dir, OUTCOMES_JSON)):
        what = "does not exist" if not store.exists(outcomes_dir) else f"has no {OUTCOMES_JSON}"
        raise ReportError(f"--outcomes {outcomes_dir} {what}: give a folder written by `lvm-ray outcomes`")
    fs, path = store.filesystem(out)
    if fs.exists(path) and fs.isdir(path):
        raise ReportError(f"--out {out} is a folder: give the path of an HTML file, e.g. {out.rstrip('/')}/report.html")
    metrics = store.read_json(store.join_url(eval_dir, METRICS_JSON))
    if not metrics.get("n"):
        raise ReportError(f"the evaluation in {eval_dir} has n = 0 (no ECG with a CMR label): nothing to report")


def _explanations_section(explanations: str | None) -> str:
    """Three example ECGs (highest, median, lowest predicted LVMI) with their attribution bands."""
    if explanations is None:
        return ""
    from lvm_ray.explain import ExplainError, example_figures

    try:
        figures = example_figures(explanations)
    except (ExplainError, store.StoreError) as exc:
        raise ReportError(f"--explanations {explanations}: {exc}") from exc
    body = "".join(_figure_html(fig_id, alt, fig, caption) for fig_id, alt, fig, caption in figures)
    return (
        '<h2 id="explanations">Why the model said what it said: example ECGs</h2>'
        '<p class="small">Integrated gradients of the predicted LV mass over each lead and sample, against a '
        "flat (isoelectric) ECG; the attributions of an ECG sum to its prediction minus the baseline's. "
        "Percentages: each lead's share of the absolute attribution.</p>"
        f'<div class="figs">{body}</div>'
    )


def _model_card_section(run: str | None) -> str:
    """The model card of ``run`` (written from its checkpoint and run record), or nothing."""
    if run is None:
        return ""
    from lvm_ray.model import CheckpointError
    from lvm_ray.modelcard import card_html, load_or_build

    try:
        return card_html(load_or_build(run))
    except CheckpointError as exc:
        raise ReportError(f"--run {run}: {exc}") from exc


def render_report(
    eval_dir: str,
    outcomes_dir: str | None,
    out: str,
    *,
    explanations: str | None = None,
    run: str | None = None,
) -> str:
    """Write the HTML report to ``out`` (path or fsspec URL) and return ``out``.

    ``eval_dir``: the output folder of :func:`lvm_ray.evaluate.evaluate`; ``outcomes_dir``: that of
    :func:`lvm_ray.outcomes.outcomes`, or None to leave the outcomes section out; ``explanations``:
    a folder of ``lvm-ray explain`` (three example ECGs are shown); ``run``: the model's run folder
    (its model card is shown). The file is written under a temporary name and renamed, so a
    half-written report never appears.
    """
    check_report_inputs(eval_dir, outcomes_dir, out)
    extra_html = _explanations_section(explanations) + _model_card_section(run)
    eval_html, metrics = _evaluation_section(eval_dir)
    outcomes_html = (
        _outcomes_section(outcomes_dir)
        if outcomes_dir
        else '<h2>Outcomes</h2><p class="note">No outcome analysis given (--outcomes).</p>'
    )
    presets = ", ".join(metrics.get("model_preset") or []) or "unknown"
    versions = ", ".join(metrics.get("model_version") or []) or "unknown"
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    document = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>LVM-AI report: {_esc(presets)} {_esc(versions)}</title>
<style>{CSS}</style>
</head>
<body>
<header>
<h1>LVM-AI: LV mass and LVH from the 12-lead ECG</h1>
<p class="meta"><span>Model preset: <b id="model-preset">{_esc(presets)}</b></span>
<span>Model version: <b id="model-version">{_esc(versions)}</b></span>
<span>n = <b id="n">{_esc(metrics.get("n"))}</b></span>
<span>Report date: {_esc(now)}</span>
<span>Evaluated: {_esc(metrics.get("created", ""))}</span></p>
</header>
<main>
{eval_html}
{_intervals_section(metrics)}
{outcomes_html}
{extra_html}
</main>
<footer><p class="small">Generated by lvm-ray. Method after Khurshid et al., Circ Cardiovasc Imaging
2021;14:e012281. c-statistics by DeLong; hazard ratios by Cox proportional hazards (lifelines).</p></footer>
</body>
</html>
"""
    store.write_atomic(out, document.encode("utf-8"))
    return out
