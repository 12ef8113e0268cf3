"""lvm_ray.evaluate: metrics.json keys and numbers, exclusions, folder input, tables and plot data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from lvm_ray import stats
from lvm_ray.evaluate import C_STATISTIC_NAMES, evaluate
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
