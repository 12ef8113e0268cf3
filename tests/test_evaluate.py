"""lvm_ray.evaluate: metrics.json keys and numbers, exclusions, folder input, tables and plot data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.optimize import brentq
from scipy.special import expit
from sklearn.metrics import roc_auc_score

from lvm_ray import stats
from lvm_ray.conformal import fit_calibration
from lvm_ray.evaluate import C_STATISTIC_NAMES, band_labels, evaluate
from lvm_ray.lvh import LVHConfig
from lvm_ray.store import read_any_table

FIXED_KEYS = {"n", "pearson_r", "pearson_r_ci", "mae_g", "c_statistics", "delong_p"}


def make_predictions(n: int = 1500, seed: int = 0) -> pd.DataFrame:
    """A predictions table with labels, built to look like LVM-AI vs the rules in UK Biobank."""
    rng = np.random.default_rng(seed)
    male = rng.random(n) < 0.48
    bsa = np.where(male, rng.normal(2.0, 0.15, n), rng.normal(1.75, 0.13, n))
    lvmi = np.where(male, rng.normal(55, 10, n), rng.normal(43, 8, n))
    lv_mass = lvmi * bsa
    pred = 0.75 * lv_mass + 0.25 * lv_mass.mean() + rng.normal(0, 11, n)
    cmr_lvh = lvmi > np.where(male, 72.0, 55.0)
    # Rules: weak, specific, with a few ECGs not measurable (<NA>).
    voltage = 0.6 * (lvmi - lvmi.mean()) / lvmi.std() + rng.normal(size=n)
    sokolow = voltage + rng.normal(scale=0.6, size=n) > 1.8
    cornell = voltage + rng.normal(scale=0.6, size=n) > 1.9
    avl = voltage + rng.normal(scale=0.8, size=n) > 2.2
    flags = {}
    for name, values in (("lvh_sokolow_lyon", sokolow), ("lvh_cornell", cornell), ("lvh_avl", avl)):
        arr = pd.array(values, dtype="boolean")
        arr[rng.random(n) < 0.02] = pd.NA
        flags[name] = arr
    any_rule = flags["lvh_sokolow_lyon"] | flags["lvh_cornell"] | flags["lvh_avl"]
    frame = pd.DataFrame(
        {
            "ecg_id": [f"e{i:05d}" for i in range(n)],
            "patient_id": [f"p{i:05d}" for i in range(n)],
            "lv_mass_pred_g": pred,
            "lvmi_pred": pred / bsa,
            "lvh_pred": pred / bsa > np.where(male, 72.0, 55.0),
            "lvh_prob": 1 / (1 + np.exp(-(pred / bsa - np.where(male, 72.0, 55.0)) / 5)),
            "sokolow_lyon_uv": 2500 + 600 * voltage,
            "cornell_uv": 1500 + 500 * voltage,
            "ravl_uv": 500 + 300 * voltage,
            **flags,
            "lvh_any_rule": any_rule,
            "model_preset": "lvm-ai-2021",
            "model_version": "test-1",
            "lv_mass_g": lv_mass,
            "bsa_m2": bsa,
            "sex": np.where(male, "M", "F"),
            "age": rng.normal(63, 7, n),
        }
    )
    assert 0.03 < cmr_lvh.mean() < 0.2
    return frame


def with_intervals(frame: pd.DataFrame, seed: int = 100) -> pd.DataFrame:
    """``frame`` with height/weight (for BMI) and the columns a calibrated checkpoint adds.

    The calibration is fitted on an independent table from the same simulation (another seed), as
    `lvm-ray calibrate` fits it on a validation split.
    """
    out = frame.copy()
    rng = np.random.default_rng(seed)
    out["height_cm"] = np.where(out["sex"] == "M", 176.0, 163.0) + rng.normal(0, 7, len(out))
    out["weight_kg"] = out["bsa_m2"] ** 2 * 3600 / out["height_cm"]  # Mosteller gives back bsa_m2
    cal = make_predictions(n=2000, seed=seed)
    calibration = fit_calibration(cal["lv_mass_pred_g"], cal["lv_mass_g"], cal["sex"], cal["bsa_m2"])
    bands = calibration.predict(out["lv_mass_pred_g"], out["sex"], out["bsa_m2"], LVHConfig().thresholds_g_m2)
    out["lv_mass_pred_lo_g"], out["lv_mass_pred_hi_g"] = bands["lo"], bands["hi"]
    out["interval_level"] = 0.9
    out["lvh_prob_calibrated"] = bands["lvh_prob"]
    return out


@pytest.fixture(scope="module")
def predictions() -> pd.DataFrame:
    return make_predictions()


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, predictions) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("eval")
    frame = predictions.copy()
    # Rows that cannot be evaluated: missing label, BSA, sex, prediction.
    frame.loc[0, "lv_mass_g"] = np.nan
    frame.loc[1, "bsa_m2"] = np.nan
    frame.loc[2, "sex"] = None
    frame.loc[3, "lv_mass_pred_g"] = np.nan
    frame.loc[3, "lvmi_pred"] = np.nan
    return out, evaluate(frame, str(out))


def test_metrics_json_has_the_design_keys(evaluated) -> None:
    out, metrics = evaluated
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == metrics
    assert FIXED_KEYS <= set(on_disk)
    assert set(on_disk["c_statistics"]) == set(C_STATISTIC_NAMES)
    assert set(on_disk["delong_p"]) == set(C_STATISTIC_NAMES)
    for name, c in on_disk["c_statistics"].items():
        assert set(c) >= {"auc", "ci"}, name
        lo, hi = c["ci"]
        assert 0 <= lo <= c["auc"] <= hi <= 1, name
    for name in ("sokolow_lyon", "cornell", "avl", "any_rule"):
        assert 0 <= on_disk["delong_p"][name] <= 1
    assert len(on_disk["pearson_r_ci"]) == 2
    assert on_disk["n"] == 1496 and on_disk["n_excluded"] == 4
    assert on_disk["exclusions"] == {
        "missing_lv_mass_g": 1,
        "missing_bsa_m2": 1,
        "missing_sex": 1,
        "missing_prediction": 1,
    }
    assert on_disk["model_preset"] == ["lvm-ai-2021"] and on_disk["model_version"] == ["test-1"]


def test_metrics_equal_direct_computations(evaluated, predictions) -> None:
    _, m = evaluated
    df = predictions.iloc[4:].reset_index(drop=True)
    lvmi = df["lv_mass_g"] / df["bsa_m2"]
    y = (lvmi > np.where(df["sex"] == "M", 72.0, 55.0)).to_numpy()
    assert m["n_lvh"] == int(y.sum())
    assert m["pearson_r"] == pytest.approx(np.corrcoef(df["lv_mass_pred_g"], df["lv_mass_g"])[0, 1], abs=1e-12)
    assert m["pearson_r_ci"] == pytest.approx(list(stats.fisher_z_ci(m["pearson_r"], len(df))))
    assert m["mae_g"] == pytest.approx(np.mean(np.abs(df["lv_mass_pred_g"] - df["lv_mass_g"])))
    assert m["c_statistics"]["lvm_ai_lvmi"]["auc"] == pytest.approx(roc_auc_score(y, df["lvmi_pred"]), abs=1e-12)
    lvh_call = m["binary_calls"]["lvm_ai_lvh"]
    assert m["c_statistics"]["lvm_ai_lvh"]["auc"] == pytest.approx(
        (lvh_call["sensitivity"] + lvh_call["specificity"]) / 2
    )
    for name, column in (("sokolow_lyon", "lvh_sokolow_lyon"), ("any_rule", "lvh_any_rule")):
        known = df[column].notna().to_numpy()
        flag = df[column][known].astype(bool).to_numpy()
        call = m["binary_calls"][name]
        assert call["n_not_measurable"] == int((~known).sum())
        sens = flag[y[known]].mean()
        spec = (~flag[~y[known]]).mean()
        assert call["sensitivity"] == pytest.approx(sens) and call["specificity"] == pytest.approx(spec)
        assert m["c_statistics"][name]["auc"] == pytest.approx((sens + spec) / 2)
        direct = stats.delong_paired_test(y[known], df["lvmi_pred"].to_numpy()[known], flag.astype(float))
        assert m["delong_p"][name] == pytest.approx(direct["p"])
    # The simulated rules are weaker than the continuous prediction, as in the paper.
    assert m["c_statistics"]["lvm_ai_lvmi"]["auc"] > m["c_statistics"]["any_rule"]["auc"]
    assert m["c_statistics_extra"]["lvm_ai_prob"]["auc"] == pytest.approx(roc_auc_score(y, df["lvh_prob"]), abs=1e-12)
    assert m["bland_altman"]["mean_diff"] == pytest.approx(np.mean(df["lv_mass_pred_g"] - df["lv_mass_g"]))
    assert m["lvh_pred_recomputed_mismatch"] == 0


def test_tables_and_plot_data_written(evaluated) -> None:
    out, m = evaluated
    md = (out / "table.md").read_text()
    assert "| ECG method |" in md and "Any ECG rule" in md and "Sokolow-Lyon" in md
    table = json.loads((out / "table.json").read_text())
    names = [row["name"] for row in table["rows"]]
    assert names[: len(C_STATISTIC_NAMES)] == list(C_STATISTIC_NAMES)
    pairs = pd.read_parquet(out / "pairs.parquet")
    assert len(pairs) == m["n"] and {"lv_mass_g", "lv_mass_pred_g", "lvh", "lvmi_pred"} <= set(pairs.columns)
    roc = pd.read_parquet(out / "roc.parquet")
    assert roc["fpr"].iloc[0] == 0 and roc["tpr"].iloc[-1] == 1 and roc["fpr"].is_monotonic_increasing


def test_missing_labels_column_is_a_clear_error(tmp_path, predictions) -> None:
    with pytest.raises(ValueError, match="lv_mass_g"):
        evaluate(predictions.drop(columns=["lv_mass_g"]), str(tmp_path))


def test_folder_of_parquet_files_and_fsspec_output(tmp_path, predictions) -> None:
    folder = tmp_path / "preds"
    folder.mkdir()
    half = len(predictions) // 2
    predictions.iloc[:half].to_parquet(folder / "part-0.parquet", index=False)
    # As Ray Data or another Arrow writer might: no pandas metadata (nullable booleans come back as
    # object columns of True/False/None) and an all-null column typed 'null'.
    second = pa.Table.from_pandas(predictions.iloc[half:], preserve_index=False).replace_schema_metadata(None)
    second = second.set_column(second.schema.get_field_index("lvh_prob"), "lvh_prob", pa.nulls(len(second)))
    pq.write_table(second, folder / "part-1.parquet")
    (folder / "_SUCCESS").write_text("")
    assert len(read_any_table(str(folder))) == len(predictions)
    from_folder = evaluate(str(folder), "memory://lvm-ray-test/eval")
    from_frame = evaluate(predictions, str(tmp_path / "eval"))
    assert from_folder["n"] == from_frame["n"] == len(predictions)
    assert from_folder["c_statistics"] == from_frame["c_statistics"]
    assert from_folder["binary_calls"] == from_frame["binary_calls"]
    # lvh_prob is null in half the rows: its c-statistic uses the rows that have it.
    assert from_folder["c_statistics_extra"]["lvm_ai_prob"]["n"] == half
    assert from_folder["delong_p"] == from_frame["delong_p"]
    import fsspec

    fs = fsspec.filesystem("memory")
    assert fs.exists("/lvm-ray-test/eval/metrics.json") and fs.exists("/lvm-ray-test/eval/pairs.parquet")


def test_thresholds_apply_to_both_sides_and_single_class_is_reported(tmp_path, predictions) -> None:
    # Thresholds so high that no one has LVH: no discrimination to measure, no crash.
    config = LVHConfig(thresholds_g_m2={"M": 500.0, "F": 500.0})
    m = evaluate(predictions, str(tmp_path), lvh_config=config)
    assert m["n_lvh"] == 0
    assert (
        m["c_statistics"]["lvm_ai_lvmi"]["auc"] is None and "single class" in m["c_statistics"]["lvm_ai_lvmi"]["note"]
    )
    assert m["delong_p"]["any_rule"] is None
    # The table's lvh_pred used the default thresholds: every predicted LVH now disagrees.
    assert m["lvh_pred_recomputed_mismatch"] == int(predictions["lvh_pred"].sum())
    assert m["pearson_r"] > 0.5


def test_single_lvh_case_gives_an_auc_without_a_ci(tmp_path, predictions) -> None:
    """One CMR LVH case: the AUC exists, its DeLong variance does not: null CIs and P, no crash."""
    lvmi = np.sort((predictions["lv_mass_g"] / predictions["bsa_m2"]).to_numpy())
    config = LVHConfig(thresholds_g_m2={"M": lvmi[-2], "F": lvmi[-2]})  # only the largest LVMI is above
    m = evaluate(predictions, str(tmp_path), lvh_config=config)
    assert m["n_lvh"] == 1
    c = m["c_statistics"]["lvm_ai_lvmi"]
    assert 0 <= c["auc"] <= 1 and c["ci"] == [None, None] and c["se"] is None
    assert m["delong_p"]["lvm_ai_lvh"] is None
    assert all(m["delong_p"][name] is None for name in ("sokolow_lyon", "cornell", "avl", "any_rule"))
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["c_statistics"]["lvm_ai_lvmi"]["ci"] == [None, None]
    table = json.loads((tmp_path / "table.json").read_text())["rows"]
    assert table[0]["c_statistic"] == f"{c['auc']:.3f} (no CI)"
    assert "(no CI)" in (tmp_path / "table.md").read_text()


def test_missing_bsa_is_mosteller_from_height_and_weight(tmp_path, predictions) -> None:
    frame = predictions.copy()
    frame["height_cm"] = 170.0
    frame["weight_kg"] = frame["bsa_m2"] ** 2 * 3600 / 170.0  # Mosteller gives back bsa_m2
    reference = evaluate(frame, str(tmp_path / "given"))
    frame.loc[:49, "bsa_m2"] = np.nan
    derived = evaluate(frame, str(tmp_path / "derived"))
    assert derived["n"] == reference["n"] == len(frame) and derived["n_excluded"] == 0
    assert derived["n_lvh"] == reference["n_lvh"]
    for name in ("lvm_ai_lvmi", "lvm_ai_lvh", "any_rule"):
        assert derived["c_statistics"][name]["auc"] == pytest.approx(reference["c_statistics"][name]["auc"], abs=1e-12)
    pairs = pd.read_parquet(tmp_path / "derived" / "pairs.parquet")
    np.testing.assert_allclose(pairs["bsa_m2"], predictions["bsa_m2"], rtol=1e-12)


# --- prediction intervals, subgroups, calibration -----------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> tuple[pd.DataFrame, dict]:
    frame = with_intervals(make_predictions(n=3000, seed=5))
    return frame, evaluate(frame, str(tmp_path_factory.mktemp("eval_cal")))


def test_interval_coverage_and_width_are_the_direct_numbers(calibrated) -> None:
    frame, m = calibrated
    inside = (frame.lv_mass_pred_lo_g <= frame.lv_mass_g) & (frame.lv_mass_g <= frame.lv_mass_pred_hi_g)
    interval = m["interval"]
    assert set(interval) >= {"level", "coverage", "coverage_ci", "mean_width_g"}
    assert interval["level"] == 0.9 and interval["n"] == len(frame)
    assert interval["coverage"] == pytest.approx(inside.mean())
    assert interval["coverage_ci"] == pytest.approx(list(stats.wilson_ci(int(inside.sum()), len(frame))))
    width = frame.lv_mass_pred_hi_g - frame.lv_mass_pred_lo_g
    assert interval["mean_width_g"] == pytest.approx(width.mean())
    for sex in ("M", "F"):
        rows = (frame.sex == sex).to_numpy()
        assert interval["by_sex"][sex]["coverage"] == pytest.approx(inside[rows].mean())
    # Calibrated on an independent sample of the same population: 90% intervals cover about 90%.
    assert 0.87 <= interval["coverage"] <= 0.93


def test_subgroups_have_the_keys_and_the_direct_numbers(calibrated) -> None:
    frame, m = calibrated
    groups = m["subgroups"]
    assert set(groups["sex"]) == {"M", "F"}
    assert set(groups["age"]) == {"<55", "55-65", ">=65"} and set(groups["bmi"]) == {"<25", "25-30", ">=30"}
    keys = {"n", "pearson_r", "pearson_r_ci", "mae_g", "interval_coverage", "c_statistics"}
    for name in ("sex", "age", "bmi"):
        assert sum(g["n"] for g in groups[name].values()) == len(frame), name
        for label, g in groups[name].items():
            assert keys <= set(g), (name, label)
            assert set(g["c_statistics"]) == {"lvm_ai_lvmi", "any_rule"}
            assert set(g["c_statistics"]["any_rule"]) >= {"auc", "ci"}
    women = frame[frame.sex == "F"]
    f = groups["sex"]["F"]
    assert f["n"] == len(women)
    assert f["pearson_r"] == pytest.approx(np.corrcoef(women.lv_mass_pred_g, women.lv_mass_g)[0, 1])
    assert f["mae_g"] == pytest.approx(np.mean(np.abs(women.lv_mass_pred_g - women.lv_mass_g)))
    y = (women.lv_mass_g / women.bsa_m2 > 55.0).to_numpy()
    assert f["c_statistics"]["lvm_ai_lvmi"]["auc"] == pytest.approx(roc_auc_score(y, women.lvmi_pred))
    known = women.lvh_any_rule.notna().to_numpy()
    rule = women.lvh_any_rule[known].astype(float).to_numpy()
    assert f["c_statistics"]["any_rule"]["auc"] == pytest.approx(roc_auc_score(y[known], rule))
    middle = frame[(frame.age >= 55) & (frame.age < 65)]
    assert groups["age"]["55-65"]["n"] == len(middle)
    bmi = frame.weight_kg / (frame.height_cm / 100) ** 2
    assert groups["bmi"][">=30"]["n"] == int((bmi >= 30).sum())
    inside = (middle.lv_mass_pred_lo_g <= middle.lv_mass_g) & (middle.lv_mass_g <= middle.lv_mass_pred_hi_g)
    assert groups["age"]["55-65"]["interval_coverage"] == pytest.approx(inside.mean())


def test_calibration_metrics_equal_independent_fits(calibrated) -> None:
    from sklearn.linear_model import LogisticRegression

    frame, m = calibrated
    mass = m["calibration"]["lv_mass"]
    slope, intercept = np.polyfit(frame.lv_mass_pred_g, frame.lv_mass_g, 1)
    assert mass["slope"] == pytest.approx(slope) and mass["intercept"] == pytest.approx(intercept)
    assert len(mass["deciles"]) == 10 and sum(d["n"] for d in mass["deciles"]) == len(frame)
    top = frame.nlargest(len(frame) // 10, "lv_mass_pred_g")
    assert mass["deciles"][-1]["cmr_mean_g"] == pytest.approx(top.lv_mass_g.mean())
    y = (frame.lv_mass_g / frame.bsa_m2 > np.where(frame.sex == "M", 72.0, 55.0)).to_numpy()
    for column in ("lvh_prob_calibrated", "lvh_prob"):
        p = frame[column].to_numpy(dtype=float)
        c = m["calibration"][column]
        assert c["brier"] == pytest.approx(np.mean((p - y) ** 2))
        assert c["brier_prevalence_only"] == pytest.approx(y.mean() * (1 - y.mean()))
        logit = np.log(np.clip(p, 1e-6, 1 - 1e-6) / (1 - np.clip(p, 1e-6, 1 - 1e-6)))
        fit = LogisticRegression(C=np.inf).fit(logit[:, None], y)
        assert c["slope"] == pytest.approx(fit.coef_[0, 0], rel=1e-3)
        order = np.argsort(p, kind="stable")
        ece = sum(len(b) * abs(y[b].mean() - p[b].mean()) for b in np.array_split(order, 10)) / len(p)
        assert c["ece"] == pytest.approx(ece, rel=1e-9)
        # Calibration-in-the-large: the intercept a solving sum(y - expit(a + logit p)) = 0 (its score equation).
        root = brentq(lambda a, offset=logit: np.sum(y - expit(a + offset)), -10, 10, xtol=1e-12)
        assert c["intercept"] == pytest.approx(root, abs=1e-6)
    calibrated_prob = m["calibration"]["lvh_prob_calibrated"]
    assert 0.8 <= calibrated_prob["slope"] <= 1.2
    assert calibrated_prob["brier"] < calibrated_prob["brier_prevalence_only"]
    assert m["c_statistics_extra"]["lvm_ai_prob_calibrated"]["auc"] > 0.8


def test_small_subgroups_get_nulls_with_reasons_and_bands_are_configurable(tmp_path) -> None:
    frame = with_intervals(make_predictions(n=400, seed=8))
    frame.loc[frame.index[:3], "age"] = 30.0  # a band holding three ECGs
    frame.loc[frame.index[3:5], "age"] = np.nan
    m = evaluate(frame, str(tmp_path), subgroup_bands={"age": (40, 60), "bmi": (18.5, 25, 30, 35)})
    age = m["subgroups"]["age"]
    assert set(age) == {"<40", "40-60", ">=60", "unknown"} and age["unknown"]["n"] == 2
    small = age["<40"]
    assert small["n"] == 3 and small["pearson_r"] is None and small["pearson_r_ci"] == [None, None]
    assert any("at least 10" in note for note in small["notes"])
    assert small["c_statistics"]["lvm_ai_lvmi"]["auc"] is None
    assert set(m["subgroups"]["bmi"]) >= set(band_labels((18.5, 25, 30, 35)))
    assert m["subgroups"]["bands"]["bmi"] == [18.5, 25.0, 30.0, 35.0]
    with pytest.raises(ValueError, match="no such column"):
        evaluate(frame, str(tmp_path / "bad"), subgroup_bands={"creatinine": (1.0,)})


def test_uncalibrated_predictions_give_null_intervals_with_a_note(tmp_path, predictions) -> None:
    m = evaluate(predictions, str(tmp_path))
    assert m["interval"]["coverage"] is None and "uncalibrated" in m["interval"]["note"]
    assert m["subgroups"]["sex"]["M"]["interval_coverage"] is None
    assert m["calibration"]["lvh_prob_calibrated"]["brier"] is None
    assert m["calibration"]["lvh_prob"]["brier"] is not None  # the raw head's output is still assessed


def test_cli_prints_r_with_its_ci_and_each_c_statistic(tmp_path) -> None:
    import re

    from typer.testing import CliRunner

    from lvm_ray.cli import app

    (tmp_path / "preds" / "parts").mkdir(parents=True)
    make_predictions(n=400, seed=5).to_parquet(tmp_path / "preds" / "parts" / "part-0.parquet")
    command = ["evaluate", "--predictions", str(tmp_path / "preds"), "--out", str(tmp_path / "e")]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    low, high = metrics["pearson_r_ci"]
    assert f"Pearson r {metrics['pearson_r']:.3f} ({low:.3f}-{high:.3f}), MAE" in result.output
    assert re.search(r"c lvm_ai_lvmi\s+0\.\d{3} \(0\.\d{3}-[01]\.\d{3}\)", result.output)
