"""Body size and LV hypertrophy: BSA (Mosteller), BMI, LV mass index and the sex-specific LVH call.

The one home of these derivations (docs/method.md, "LVH"): the data generator, the training labels,
the prediction path, evaluation, outcomes and the dataset summary all call this module, so they
agree to the last bit. :func:`derive` is the table-level entry point. No Ray, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from lvm_ray.signals import normalise_sex


@dataclass(frozen=True)
class LVHConfig:
    """Sex-specific LVMI thresholds (g/m^2); LVH is LVMI strictly above the threshold."""

    thresholds_g_m2: dict[str, float] = field(default_factory=lambda: {"M": 72.0, "F": 55.0})
    bsa_formula: str = "mosteller"

    def __post_init__(self) -> None:
        if self.bsa_formula != "mosteller":
            raise ValueError(f"unknown BSA formula {self.bsa_formula!r}; supported: 'mosteller'")
        if set(self.thresholds_g_m2) != {"M", "F"}:
            raise ValueError(f"thresholds must be given for sexes 'M' and 'F', got {sorted(self.thresholds_g_m2)}")


def body_surface_area(height_cm: Any, weight_kg: Any) -> np.ndarray:
    """Body surface area (m^2) by Mosteller, sqrt(height_cm * weight_kg) / 60; NaN unless both are positive."""
    height = np.asarray(height_cm, dtype=float)
    weight = np.asarray(weight_kg, dtype=float)
    with np.errstate(invalid="ignore"):
        return np.where((height > 0) & (weight > 0), np.sqrt(height * weight / 3600.0), np.nan)


def bmi(height_cm: Any, weight_kg: Any) -> np.ndarray:
    """Body-mass index (kg/m^2): weight / (height in metres)^2; NaN unless both are positive."""
    height = np.asarray(height_cm, dtype=float)
    weight = np.asarray(weight_kg, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((height > 0) & (weight > 0), weight / (height / 100.0) ** 2, np.nan)


def weight_for_bmi(height_cm: Any, bmi_kg_m2: Any) -> np.ndarray:
    """The weight (kg) that gives ``bmi_kg_m2`` at ``height_cm``: the inverse of :func:`bmi` (the generator's)."""
    return np.asarray(bmi_kg_m2, dtype=float) * (np.asarray(height_cm, dtype=float) / 100.0) ** 2


def lv_mass_index(lv_mass_g: Any, bsa_m2: Any) -> np.ndarray:
    """LVMI = LV mass / BSA (NaN where either is unknown or BSA is not positive)."""
    mass = np.asarray(lv_mass_g, dtype=float)
    bsa = np.asarray(bsa_m2, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(bsa > 0, mass / bsa, np.nan)


def lvh_from_lvmi(lvmi: Any, sex: Any, config: LVHConfig = LVHConfig()) -> pd.Series:
    """LVH as a nullable boolean: <NA> where LVMI or sex ('M'/'F') is unknown."""
    lvmi = np.asarray(lvmi, dtype=float)
    sex_values = pd.Series(np.asarray(sex, dtype=object))
    threshold = sex_values.map(config.thresholds_g_m2).astype(float).to_numpy()
    known = np.isfinite(lvmi) & np.isfinite(threshold)
    out = pd.array([pd.NA] * len(lvmi), dtype="boolean")
    out[known] = lvmi[known] > threshold[known]
    return pd.Series(out)


#: The columns :func:`derive` returns.
DERIVED_COLUMNS: tuple[str, ...] = ("bsa_m2", "bmi", "lvmi", "lvh")


def derive(
    frame: pd.DataFrame | Mapping[str, Any],
    config: LVHConfig = LVHConfig(),
    *,
    mass_column: str = "lv_mass_g",
    lvmi_column: str | None = None,
    n: int | None = None,
) -> pd.DataFrame:
    """bsa_m2, bmi, lvmi and lvh for every row of ``frame``, from whichever inputs it has.

    ``frame``: a DataFrame, or a mapping of column name -> array (None or absent = unknown), with
    some of height_cm, weight_kg, bsa_m2, bmi, ``mass_column`` and sex. Given values win where
    known (finite and positive); otherwise BSA is Mosteller's and BMI is computed from height and
    weight. lvmi = mass / bsa, except where ``lvmi_column`` (e.g. the predictor's lvmi_pred) holds
    a finite value; lvh is lvmi over the sex thresholds of ``config`` (nullable boolean, <NA> where
    lvmi or sex is unknown; sex spellings as :func:`lvm_ray.signals.normalise_sex` reads them).
    Use ``mass_column="lv_mass_pred_g"`` for the model's LVMI/LVH. ``n``: the row count of a
    mapping without any of these columns.
    """
    index = frame.index if isinstance(frame, pd.DataFrame) else None
    rows = len(frame) if isinstance(frame, pd.DataFrame) else _mapping_rows(frame, n)

    def number(name: str | None) -> np.ndarray:
        return _numbers(frame, name, rows)

    height, weight = number("height_cm"), number("weight_kg")
    bsa = _given_else(number("bsa_m2"), lambda: body_surface_area(height, weight))
    bmi_values = _given_else(number("bmi"), lambda: bmi(height, weight))
    lvmi = lv_mass_index(number(mass_column), bsa)
    if lvmi_column is not None:
        given = number(lvmi_column)
        lvmi = np.where(np.isfinite(given), given, lvmi)
    sex = frame["sex"] if "sex" in frame else None
    sex_codes = np.full(rows, None, dtype=object) if sex is None else _sex(sex)
    if len(sex_codes) != rows:
        raise ValueError(f"column 'sex' has {len(sex_codes)} rows, expected {rows}")
    lvh = lvh_from_lvmi(lvmi, sex_codes, config)
    out = pd.DataFrame({"bsa_m2": bsa, "bmi": bmi_values, "lvmi": lvmi, "lvh": lvh.array})
    if index is not None:
        out.index = index
    return out


def _given_else(given: np.ndarray, derived: Any) -> np.ndarray:
    """The given values where known (finite and positive), else the derived ones."""
    known = np.isfinite(given) & (given > 0)
    return given if known.all() else np.where(known, given, derived())


def _mapping_rows(frame: Mapping[str, Any], n: int | None) -> int:
    if n is not None:
        return int(n)
    for value in frame.values():
        if value is not None and np.ndim(value) == 1:
            return len(value)
    raise ValueError("derive needs n for a mapping without any column")


def _numbers(frame: pd.DataFrame | Mapping[str, Any], name: str | None, n: int) -> np.ndarray:
    """Column ``name`` as float64, NaN where absent, None or not a number."""
    if name is None or name not in frame or frame[name] is None:
        return np.full(n, np.nan)
    values = frame[name]
    arr = values.to_numpy() if isinstance(values, pd.Series) else np.asarray(values)
    if arr.shape != (n,):
        raise ValueError(f"column {name!r} has shape {arr.shape}, expected ({n},)")
    if arr.dtype.kind in "fiub":
        return arr.astype(np.float64)
    return pd.to_numeric(pd.Series(arr, dtype=object), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def _sex(values: Any) -> np.ndarray:
    arr = values.to_numpy(dtype=object) if isinstance(values, pd.Series) else np.asarray(values, dtype=object)
    return np.array([normalise_sex(v) for v in arr], dtype=object)
