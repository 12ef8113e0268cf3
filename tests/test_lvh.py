"""lvm_ray.lvh: BSA, BMI, LVMI and LVH, and that every stage derives them through it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lvm_ray import lvh
from lvm_ray.lvh import LVHConfig, body_surface_area, derive, lv_mass_index, lvh_from_lvmi


def test_mosteller_bsa_and_bmi_known_values() -> None:
    assert body_surface_area(180, 80) == pytest.approx(2.0)
    np.testing.assert_allclose(body_surface_area([170, 160], [85, 60]), np.sqrt([170 * 85 / 3600, 160 * 60 / 3600]))
    assert lvh.bmi(180, 81) == pytest.approx(25.0)
    np.testing.assert_allclose(lvh.weight_for_bmi([180, 150], lvh.bmi([180, 150], [81, 50])), [81, 50])
    # Unknown or impossible sizes give NaN, never a number (sqrt of a product of two negatives).
    assert np.isnan(body_surface_area([np.nan, 0, -170], [80, 80, -80])).all()
    assert np.isnan(lvh.bmi([np.nan, 0, 180], [80, 80, -1])).all()


def test_lvmi_and_sex_specific_lvh() -> None:
    lvmi = lv_mass_index(np.array([150.0, 150.0, 100.0, np.nan, 100.0]), np.array([2.0, 2.0, 2.0, 2.0, 0.0]))
    np.testing.assert_allclose(lvmi[:3], [75, 75, 50])
    assert np.isnan(lvmi[3:]).all()
    calls = lvh_from_lvmi(np.append(lvmi[:4], 72.0), np.array(["M", "F", "F", "M", "M"], dtype=object))
    # Strictly above the threshold: LVMI 72 in a man is not LVH.
    assert calls[:3].tolist() == [True, True, False] and calls.isna()[3] and not bool(calls[4])
    assert lvh_from_lvmi(np.array([80.0]), np.array([None], dtype=object)).isna().all()


def test_derive_prefers_given_values_and_fills_the_rest() -> None:
    frame = pd.DataFrame(
        {
            "height_cm": [180.0, 180.0, np.nan, 160.0, 170.0],
            "weight_kg": [80.0, 80.0, 70.0, 64.0, 70.0],
            "bsa_m2": [1.9, np.nan, np.nan, 0.0, np.nan],
            "bmi": [np.nan, 30.0, np.nan, np.nan, np.nan],
            "lv_mass_g": [152.0, 150.0, 120.0, 100.0, 150.0],
            "sex": ["M", "male", "F", "F", None],
        },
        index=[10, 11, 12, 13, 14],
    )
    out = derive(frame)
    assert list(out.columns) == ["bsa_m2", "bmi", "lvmi", "lvh"] and list(out.index) == [10, 11, 12, 13, 14]
    # Given BSA wins; missing (or non-positive) BSA is Mosteller's; unknown height leaves it unknown.
    np.testing.assert_allclose(out["bsa_m2"], [1.9, 2.0, np.nan, np.sqrt(160 * 64 / 3600), np.sqrt(170 * 70 / 3600)])
    np.testing.assert_allclose(out["bmi"], [80 / 1.8**2, 30.0, np.nan, 25.0, 70 / 1.7**2])
    np.testing.assert_allclose(
        out["lvmi"], [80.0, 75.0, np.nan, 100 / np.sqrt(160 * 64 / 3600), 150 / out["bsa_m2"][14]]
    )
    assert out["lvh"].dtype == "boolean"
    assert out["lvh"].tolist()[:2] == [True, True]  # 'male' is a man: 75 > 72
    assert out["lvh"].isna().tolist() == [False, False, True, False, True]  # no BSA; no sex
    assert bool(out["lvh"][13]) is True  # woman, 100 / 1.69 = 59.2 > 55


def test_derive_predicted_mass_given_lvmi_and_mappings() -> None:
    table = {"lv_mass_pred_g": [150.0, 150.0], "bsa_m2": [2.0, None], "sex": ["M", "F"], "lvmi_pred": [None, 50.0]}
    out = derive(table, LVHConfig({"M": 74.0, "F": 49.0}), mass_column="lv_mass_pred_g", lvmi_column="lvmi_pred")
    np.testing.assert_allclose(out["lvmi"], [75.0, 50.0])  # computed where lvmi_pred is unknown, else given
    assert out["lvh"].tolist() == [True, True]
    empty = derive({"sex": None}, n=3)
    assert len(empty) == 3 and empty["lvh"].isna().all() and np.isnan(empty["bsa_m2"]).all()
    with pytest.raises(ValueError, match="'bsa_m2' has shape"):
        derive({"lv_mass_g": [1.0, 2.0], "bsa_m2": [1.0]})
    with pytest.raises(ValueError, match="needs n"):
        derive({})


def test_training_labels_and_covariates_use_the_same_derivation() -> None:
    from lvm_ray.presets import covariate_values, lvh_labels

    table = {
        "lv_mass_g": [150.0, 100.0, 100.0, np.nan],
        "bsa_m2": [np.nan, 2.0, np.nan, 2.0],
        "height_cm": [180.0, np.nan, np.nan, 170.0],
        "weight_kg": [80.0, np.nan, np.nan, 60.0],
        "bmi": [np.nan, 27.0, np.nan, np.nan],
        "sex": ["M", "F", "F", "M"],
    }
    expected = derive(table)
    assert lvh_labels(table, 4).tolist() == [1, 0, -1, -1]
    assert lvh_labels(table, 4).tolist() == expected["lvh"].astype("Int64").fillna(-1).tolist()
    # BMI row by row: the given value where known, else weight / height^2.
    np.testing.assert_allclose(covariate_values(table, "bmi", 4), [80 / 1.8**2, 27.0, np.nan, 60 / 1.7**2])


def test_synthetic_cohort_sizes_are_the_derived_ones() -> None:
    from lvm_ray.synth import generate_people

    table, _ = generate_people(200, seed=3)
    out = derive(table.drop(columns=["bsa_m2", "bmi"]))
    np.testing.assert_array_equal(table["bsa_m2"].to_numpy(), out["bsa_m2"].to_numpy())
    np.testing.assert_array_equal(table["bmi"].to_numpy(), out["bmi"].to_numpy())
    assert out["lvh"].notna().all()
