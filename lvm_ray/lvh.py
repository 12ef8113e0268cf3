"""LV mass index and LV hypertrophy, from CMR or from the model (DESIGN.md, "LVH")."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from lvm_ray.signals import bsa_mosteller


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


def body_surface_area(height_cm: np.ndarray | pd.Series, weight_kg: np.ndarray | pd.Series) -> np.ndarray:
    return np.asarray(bsa_mosteller(height_cm, weight_kg), dtype=float)


def lv_mass_index(lv_mass_g: np.ndarray | pd.Series, bsa_m2: np.ndarray | pd.Series) -> np.ndarray:
    """LVMI = LV mass / BSA (NaN where either is unknown or BSA is not positive)."""
    mass = np.asarray(lv_mass_g, dtype=float)
    bsa = np.asarray(bsa_m2, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(bsa > 0, mass / bsa, np.nan)


def lvh_from_lvmi(
    lvmi: np.ndarray | pd.Series, sex: np.ndarray | pd.Series, config: LVHConfig = LVHConfig()
) -> pd.Series:
    """LVH as a nullable boolean: <NA> where LVMI or sex is unknown."""
    lvmi = np.asarray(lvmi, dtype=float)
    sex_values = pd.Series(np.asarray(sex, dtype=object))
    threshold = sex_values.map(config.thresholds_g_m2).astype(float).to_numpy()
    known = np.isfinite(lvmi) & np.isfinite(threshold)
    out = pd.array([pd.NA] * len(lvmi), dtype="boolean")
    out[known] = lvmi[known] > threshold[known]
    return pd.Series(out)
