"""Synthetic UK-Biobank-like cohorts with known truth: a vectorcardiographic ECG model.

Why a physiological model: the synthetic cohort is both the demo data and the test oracle of
the whole study (docs/method.md, "Synthetic cohorts"). A label glued onto noise would let a CNN
reach r = 0.99 and make the voltage rules either useless or perfect; real cohorts do neither.
Here every ECG is the surface projection of a beating heart vector, so the 12 leads are
mutually consistent, the voltage rules behave about as poorly as they do in UK Biobank, and the
LV mass signal is spread over voltage, QRS duration, timing, axis and ST-T strain, where a CNN
can find it (but not perfectly: the heart's *electrical* size differs from its CMR mass).

The model, per person
---------------------
1. Covariates (age, sex, height, BMI -> weight, Mosteller BSA, hypertension) and CMR LV mass
   (log-linear in sex, BSA, age and hypertension plus individual variation).
2. A heart vector v(t) = (X, Y, Z) in Frank orientation (X left, Y feet, Z back), a sum of
   smooth lobes: each lobe is a compact Gaussian-like bump in time, (1 - u^2)^3 for |u| < 1
   (u = (t - centre) / half-width, the half-widths may differ on either side for asymmetric
   waves), times a fixed 3-D direction and an amplitude. Compact support makes the wave
   boundaries exact: the PR and ST segments of the noise-free beat are truly isoelectric.
   P: right- then left-atrial lobe. QRS: septal, apical, LV lateral, LV posterobasal and
   terminal basal lobes. ST: a strain lobe (present at high LV mass). T: one asymmetric lobe.
3. LV mass acts through an "electrically visible" mass (CMR mass times individual noise): it
   scales the LV lobes (voltage), lengthens the QRS, delays the LV lobes, turns the axis left
   and the loop posterior, flattens the T wave and, above the LVH threshold in susceptible
   people, adds lateral ST depression with T inversion (strain). Habitus attenuates every
   wave: higher BMI, older age and (in the chest leads) female sex lower the voltages.
4. Projection to the 8 independent leads (I, II, V1-V6) with the Dower matrix; III, aVR, aVL,
   aVF follow from I and II (:func:`lvm_ray.signals.complete_leads`), after the noise is added,
   so Einthoven's law holds to the int16 rounding (|I + III - II| <= 1 uV).
5. A 10-s rhythm: sinus beats at 50-100 bpm with respiratory sinus arrhythmia and random RR
   jitter, a few per cent of beat-to-beat amplitude change and a small respiratory rotation of
   the heart vector. Noise: baseline wander, mains hum (50 Hz by default) with a harmonic,
   band-limited muscle (EMG) noise, and in ~1.5% of ECGs one bad electrode (a lead with much
   more noise that still passes :func:`lvm_ray.signals.check_quality`).
6. Follow-up for AF, MI, HF, VA and death: Weibull proportional hazards with known log-hazard
   ratios per SD of CMR LV mass, per *year* of age and for male sex, prevalent cases before the
   ECG, administrative censoring at 10 years, random loss to follow-up, and (for the non-fatal
   outcomes) censoring at death. Cause-specific Cox models on the true covariates therefore
   recover the generating log-HRs.

Truth recorded per ECG: true_r_uv_<LEAD> / true_s_uv_<LEAD> on the noise-free template relative
to its isoelectric baseline (0), R = max(QRS, 0) and S = max(-QRS, 0) over the QRS window, the
true QRS duration and the heart rate, and ``true_qrs_onsets``: the sample (500 Hz) of every QRS
onset inside the 10 s, so each QRS complex lies at [onset, onset + true_qrs_ms).

Determinism: every person draws all their random numbers from their own stream,
``SeedSequence(seed, spawn_key=(index,))``, so an ECG depends only on (seed, index, config),
never on the batch or chunk it was generated in.

Dower matrix: G. E. Dower, H. B. Machado, J. A. Osborne, "On deriving the electrocardiogram
from vectorcardiographic leads", Clin Cardiol 1980;3:87-95. Inverse Dower matrix: L. Edenbrandt,
O. Pahlm, "Vectorcardiogram synthesized from a 12-lead ECG: superiority of the inverse Dower
matrix", J Electrocardiol 1988;21:361-7 (it is the pseudo-inverse of the Dower matrix).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy.special import expit, logit
from scipy.stats import truncnorm

from lvm_ray.lvh import LVHConfig, bmi, body_surface_area, derive, weight_for_bmi
from lvm_ray.machine import local_cores
from lvm_ray.schema import (
    INDEPENDENT_LEADS,
    INT16_MAX,
    INT16_MIN,
    LEADS,
    N_SAMPLES,
    SAMPLE_RATE_HZ,
    TRUE_AMPLITUDE_FIELDS,
    true_column,
)
from lvm_ray.signals import complete_leads

GENERATOR_VERSION = "synth-1.0.0"
OUTCOMES: tuple[str, ...] = ("af", "mi", "hf", "va", "death")

# --------------------------------------------------------------------------------------------
# Lead transforms
# --------------------------------------------------------------------------------------------

#: Dower matrix (Dower, Machado & Osborne, Clin Cardiol 1980;3:87-95): Frank X, Y, Z (mV) ->
#: leads I, II, V1..V6 (mV). Rows in :data:`lvm_ray.schema.INDEPENDENT_LEADS` order, columns X, Y, Z.
DOWER_MATRIX: np.ndarray = np.array(
    [
        [0.632, -0.235, 0.059],  # I
        [0.235, 1.066, -0.132],  # II
        [-0.515, 0.157, -0.917],  # V1
        [0.044, 0.164, -1.387],  # V2
        [0.882, 0.098, -1.277],  # V3
        [1.213, 0.127, -0.601],  # V4
        [1.125, 0.127, -0.086],  # V5
        [0.831, 0.076, 0.230],  # V6
    ]
)
DOWER_MATRIX.setflags(write=False)

#: Inverse Dower matrix (Edenbrandt & Pahlm, J Electrocardiol 1988;21:361-7): leads I, II,
#: V1..V6 -> Frank X, Y, Z. Rows X, Y, Z; columns in INDEPENDENT_LEADS order (the paper lists
#: V1..V6, I, II). It is the Moore-Penrose pseudo-inverse of :data:`DOWER_MATRIX` to 3 decimals;
#: the generator projects with DOWER_MATRIX and keeps this one for analysis (VCG from a 12-lead).
INVERSE_DOWER_MATRIX: np.ndarray = np.array(
    [
        # I      II     V1      V2      V3      V4      V5     V6
        [0.156, -0.010, -0.172, -0.074, 0.122, 0.231, 0.239, 0.194],  # X
        [-0.227, 0.887, 0.057, -0.019, -0.106, -0.022, 0.041, 0.048],  # Y
        [0.022, 0.102, -0.229, -0.310, -0.246, -0.063, 0.055, 0.108],  # Z
    ]
)
INVERSE_DOWER_MATRIX.setflags(write=False)

_LIMB = np.array([lead in ("I", "II") for lead in INDEPENDENT_LEADS])


def vcg_to_leads(vcg: np.ndarray) -> np.ndarray:
    """Frank X, Y, Z [..., 3, t] -> the 8 independent leads [..., 8, t] by the Dower matrix."""
    return np.einsum("lk,...kt->...lt", DOWER_MATRIX, vcg)


def leads_to_vcg(leads8: np.ndarray) -> np.ndarray:
    """The 8 independent leads [..., 8, t] -> Frank X, Y, Z [..., 3, t] by the inverse Dower matrix."""
    return np.einsum("kl,...lt->...kt", INVERSE_DOWER_MATRIX, leads8)


def twelve_leads(leads8: np.ndarray) -> np.ndarray:
    """[..., 8, t] in INDEPENDENT_LEADS order -> [..., 12, t] in LEADS order (limb leads derived)."""
    signals = complete_leads({lead: leads8[..., i, :] for i, lead in enumerate(INDEPENDENT_LEADS)})
    return np.stack([signals[lead] for lead in LEADS], axis=-2)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutcomeModel:
    """One outcome's Weibull proportional-hazards model.

    Hazard h(t) = rate * shape * t^(shape-1) * exp(lp), t in years from the ECG, with
    lp = log_hr_per_sd_lv_mass * (lv_mass - lv_mass_mean_g) / lv_mass_sd_g
       + log_hr_age_per_year * (age - age_reference) + log_hr_male * male.
    ``prevalence`` is the probability of a prevalent case (event before/at the ECG) at lp = 0;
    it shifts with the same lp on the logit scale.
    """

    name: str
    rate_per_year: float
    weibull_shape: float
    log_hr_per_sd_lv_mass: float
    log_hr_age_per_year: float
    log_hr_male: float
    prevalence: float


DEFAULT_OUTCOMES: tuple[OutcomeModel, ...] = (
    # Rates are at the reference person (age 63, woman, LV mass 90 g); HF has the largest LV
    # mass effect, as in the LVM-AI outcome analyses. Death is never prevalent.
    OutcomeModel("af", 0.0032, 1.15, 0.30, 0.075, 0.45, 0.020),
    OutcomeModel("mi", 0.0022, 1.05, 0.20, 0.050, 0.70, 0.015),
    OutcomeModel("hf", 0.0016, 1.20, 0.45, 0.085, 0.40, 0.006),
    OutcomeModel("va", 0.0018, 1.00, 0.35, 0.045, 0.60, 0.004),
    OutcomeModel("death", 0.0035, 1.20, 0.25, 0.090, 0.40, 0.0),
)


@dataclass(frozen=True)
class SynthConfig:
    """Every parameter of the generator (units in the names; log_* are natural-log scales)."""

    # --- covariates (UK Biobank imaging visit) ---
    age_mean: float = 63.5
    age_sd: float = 7.6
    age_range: tuple[float, float] = (45.0, 80.0)
    male_fraction: float = 0.48
    height_mean_cm: tuple[float, float] = (175.8, 162.8)  # (men, women)
    height_sd_cm: tuple[float, float] = (6.8, 6.2)
    height_per_year_age_cm: float = -0.10  # older cohorts are shorter
    bmi_median: tuple[float, float] = (27.0, 26.0)
    bmi_log_sd: float = 0.15
    bmi_range: tuple[float, float] = (16.0, 55.0)
    hypertension_logit_intercept: float = -0.85  # at the reference covariates; ~35% overall
    hypertension_log_or_age_per_year: float = 0.06
    hypertension_log_or_male: float = 0.45
    hypertension_log_or_bmi: float = 0.09
    # --- CMR LV mass: log(mass) = log(ref_sex) + b_bsa*log(BSA/bsa_ref_sex) + ... + N(0, sd) ---
    lv_mass_ref_g: tuple[float, float] = (100.0, 71.0)  # at the reference BSA, men/women
    lv_mass_bsa_ref_m2: tuple[float, float] = (2.0, 1.75)
    lv_mass_bsa_exponent: float = 0.9
    lv_mass_log_per_year_age: float = 0.001
    lv_mass_log_hypertension: float = 0.10
    lv_mass_log_sd: float = 0.19
    #: Population mean and SD of LV mass: the 'per SD' scale of the outcome log-HRs.
    lv_mass_mean_g: float = 90.0
    lv_mass_sd_g: float = 25.0
    lvh_thresholds_g_m2: tuple[float, float] = (72.0, 55.0)  # LVMI, men/women (strict >)
    age_reference: float = 63.0
    bmi_reference: float = 26.5

    # --- how LV mass shows on the ECG ---
    #: SD of log(electrical mass / CMR mass): what no ECG can see (caps any model's r).
    electrical_log_sd: float = 0.11
    #: Log scale that turns log(electrical mass / lv_mass_mean_g) into the mass z-score ze.
    mass_log_scale: float = 0.28
    voltage_mass_exponent: float = 0.65  # LV lobe amplitude ~ electrical mass ** exponent
    voltage_log_sd: float = 0.17  # individual conductivity / geometry (all waves)
    voltage_limb_log_sd: float = 0.12
    voltage_precordial_log_sd: float = 0.15
    voltage_log_per_bmi: float = -0.015  # habitus: per kg/m^2 above bmi_reference
    voltage_log_per_log_bsa: float = -0.7  # bigger bodies put the electrodes further away
    bsa_reference_m2: float = 1.9
    voltage_log_per_year_age: float = -0.004
    voltage_female_precordial: float = 0.88  # breast tissue attenuates the chest leads
    qrs_base_ms: float = 91.0  # QRS onset to offset (the support of the QRS lobes)
    qrs_per_ze_ms: float = 3.5
    qrs_male_ms: float = 3.0
    qrs_sd_ms: float = 7.0
    qrs_range_ms: tuple[float, float] = (70.0, 150.0)
    lv_delay_per_ze: float = 0.03  # LV lobe centre shift (fraction of QRS) per mass z
    axis_mean_deg: float = 38.0
    axis_sd_deg: float = 22.0
    axis_per_year_age_deg: float = -0.5
    axis_per_bmi_deg: float = -1.2
    axis_per_ze_deg: float = -6.0
    axis_range_deg: tuple[float, float] = (-60.0, 105.0)
    posterior_mean_deg: float = 8.0
    posterior_sd_deg: float = 10.0
    posterior_per_ze_deg: float = 5.0
    # Peak amplitude of each lobe of the heart vector (uV) for the reference person; the LV
    # lobes scale with electrical mass, every lobe with habitus.
    p_ra_uv: float = 110.0
    p_la_uv: float = 100.0
    septal_uv: float = 230.0
    apical_uv: float = 420.0
    lv_lateral_uv: float = 1180.0
    lv_posterior_uv: float = 850.0
    terminal_uv: float = 300.0
    t_uv: float = 500.0
    lobe_log_sd: float = 0.25  # per-person variation of each non-LV lobe
    t_log_per_ze: float = -0.10  # T flattening with mass
    t_turn_per_ze: float = 0.08  # T vector turning away from the QRS with mass (blend weight)
    strain_fraction: float = 0.55  # fraction of people who develop strain when hypertrophied
    strain_offset_log: float = 0.05  # log(LVMI_e / threshold) where strain is half-developed
    strain_scale_log: float = 0.06
    st_depression_uv: float = 150.0

    # --- rhythm ---
    hr_mean_bpm: float = 67.0
    hr_sd_bpm: float = 11.0
    hr_range_bpm: tuple[float, float] = (50.0, 100.0)
    rr_jitter_sd: float = 0.015  # random beat-to-beat RR change (fraction of RR)
    rsa_amplitude: float = 0.03  # respiratory sinus arrhythmia (fraction of RR)
    respiration_hz: tuple[float, float] = (0.2, 0.33)
    beat_amplitude_sd: float = 0.02
    respiratory_amplitude: float = 0.025
    respiratory_rotation_rad: float = 0.03
    pr_mean_ms: float = 158.0
    pr_sd_ms: float = 18.0
    pr_range_ms: tuple[float, float] = (120.0, 200.0)
    p_duration_ms: tuple[float, float] = (100.0, 10.0)  # mean, sd
    qtc_ms: tuple[float, float] = (405.0, 18.0)  # Framingham-corrected QT, mean, sd
    qt_per_qrs: float = 0.5  # QT lengthens by this much per ms of extra QRS

    # --- noise ---
    mains_hz: float = 50.0
    hum_median_uv: float = 5.0
    emg_median_uv: float = 7.0  # RMS, precordial; limb leads get emg_limb_factor more
    emg_limb_factor: float = 1.4
    emg_band_hz: tuple[float, float] = (20.0, 150.0)
    wander_median_uv: float = 60.0  # RMS of the slow baseline wander
    #: ECGs with one bad electrode (one of I, II, V1..V6; a bad I or II also spoils the limb
    #: leads derived from it, as on a real cart).
    bad_lead_fraction: float = 0.015
    bad_lead_noise_factor: float = 6.0

    # --- follow-up ---
    outcomes: tuple[OutcomeModel, ...] = DEFAULT_OUTCOMES
    admin_censor_years: float = 10.0
    loss_rate_per_year: float = 0.01
    ecg_date_range: tuple[str, str] = ("2014-08-01", "2020-02-29")

    #: People generated together inside generate_batch (memory bound; results do not depend on it).
    block_size: int = 250

    def outcome(self, name: str) -> OutcomeModel:
        for model in self.outcomes:
            if model.name == name:
                return model
        raise KeyError(name)


@dataclass
class SynthBatch:
    """A generated batch: waveforms, the per-ECG table and the follow-up table (same row order)."""

    ecg: np.ndarray  # int16 [n, 12, 5000] microvolts, LEADS order
    table: pd.DataFrame
    followup: pd.DataFrame


# --------------------------------------------------------------------------------------------
# Random draws: one stream per person
# --------------------------------------------------------------------------------------------

_TEMPLATE_PRE_MS = 250.0  # the beat template spans -250 .. +600 ms around QRS onset
_TEMPLATE_POST_MS = 600.0
_DT_MS = 1000.0 / SAMPLE_RATE_HZ
_PRE = int(round(_TEMPLATE_PRE_MS / _DT_MS))
_L = _PRE + int(round(_TEMPLATE_POST_MS / _DT_MS))
_NFFT = 6000  # >= N_SAMPLES + 2 * template; 500 Hz / 6000 = 1/12 Hz bins, 50 and 60 Hz on a bin
_NBIN = _NFFT // 2 + 1
_MAX_BEATS = 26  # 10.6 s at up to 100 bpm * (1 + RSA)
_N8 = len(INDEPENDENT_LEADS)

# Named slots of each person's standard-normal and uniform vectors (order is part of the
# generator version: never reorder, only append).
_Z_NAMES = (
    "height",
    "bmi",
    "lvm",
    "electrical",
    "qrs",
    "qtc",
    "axis",
    "posterior",
    "volt",
    "volt_limb",
    "volt_prec",
    "septal",
    "apical",
    "lv_post",
    "terminal",
    "t",
    "p_ra",
    "p_la",
    "emg",
    "hum",
    "wander",
    "p_dur",
    "t_dx",
    "t_dy",
    "t_dz",
    "septal_dx",
    "terminal_dx",
    "terminal_dy",
    *(f"emg_{lead}" for lead in INDEPENDENT_LEADS),
)
_U_NAMES = (
    "male",
    "age",
    "htn",
    "hr",
    "pr",
    "strain",
    "phase",
    "resp_hz",
    "resp_phase",
    "bad",
    "bad_lead",
    "date",
    "hour",
    "hum_phase",
)
_Z = {name: i for i, name in enumerate(_Z_NAMES)}
_U = {name: i for i, name in enumerate(_U_NAMES)}


@dataclass
class _Draws:
    z: np.ndarray  # [n, len(_Z_NAMES)]
    u: np.ndarray  # [n, len(_U_NAMES)]
    beat_z: np.ndarray  # [n, 2, _MAX_BEATS]: RR jitter, amplitude jitter
    spectra: np.ndarray  # [n, 2, 8, _NBIN] float32: real/imag parts of the noise spectrum
    followup_u: np.ndarray  # [n, 2 * n_outcomes + 1]

    def zv(self, name: str) -> np.ndarray:
        return self.z[:, _Z[name]]

    def uv(self, name: str) -> np.ndarray:
        return self.u[:, _U[name]]


def _person_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of person ``index`` of cohort ``seed`` (the index-th spawned child)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def _draw(seed: int, indices: np.ndarray, n_outcomes: int, noise: bool = True) -> _Draws:
    """Each person's random numbers; the noise spectra (the bulk) come last, so ``noise=False``
    gives the same covariates, heart and follow-up without drawing them."""
    n = len(indices)
    z = np.empty((n, len(_Z_NAMES)))
    u = np.empty((n, len(_U_NAMES)))
    beat_z = np.empty((n, 2, _MAX_BEATS))
    spectra = np.empty((n if noise else 0, 2, _N8, _NBIN), dtype=np.float32)
    followup_u = np.empty((n, 2 * n_outcomes + 1))
    # A loop per person (not per sample): per-person streams make each ECG independent of batching.
    for i, index in enumerate(indices):
        rng = _person_rng(seed, int(index))
        z[i] = rng.standard_normal(len(_Z_NAMES))
        u[i] = rng.random(len(_U_NAMES))
        beat_z[i] = rng.standard_normal((2, _MAX_BEATS))
        followup_u[i] = rng.random(2 * n_outcomes + 1)
        if noise:
            spectra[i] = rng.standard_normal((2, _N8, _NBIN), dtype=np.float32)
    return _Draws(z, u, beat_z, spectra, followup_u)


def _truncnorm(u: np.ndarray, mean: float, sd: float, bounds: tuple[float, float]) -> np.ndarray:
    """Inverse-CDF draw from a normal truncated to ``bounds`` (no pile-up at the limits)."""
    a, b = (bounds[0] - mean) / sd, (bounds[1] - mean) / sd
    return mean + sd * truncnorm.ppf(u, a, b)


def _by_sex(male: np.ndarray, pair: tuple[float, float]) -> np.ndarray:
    return np.where(male, pair[0], pair[1])


# --------------------------------------------------------------------------------------------
# Covariates and LV mass
# --------------------------------------------------------------------------------------------


def _covariates(d: _Draws, cfg: SynthConfig) -> dict[str, np.ndarray]:
    male = d.uv("male") < cfg.male_fraction
    age = _truncnorm(d.uv("age"), cfg.age_mean, cfg.age_sd, cfg.age_range)
    height = (
        _by_sex(male, cfg.height_mean_cm)
        + _by_sex(male, cfg.height_sd_cm) * d.zv("height")
        + cfg.height_per_year_age_cm * (age - cfg.age_reference)
    )
    height = np.clip(height, 140.0, 205.0)
    bmi_values = np.clip(_by_sex(male, cfg.bmi_median) * np.exp(cfg.bmi_log_sd * d.zv("bmi")), *cfg.bmi_range)
    weight = weight_for_bmi(height, bmi_values)
    bsa = body_surface_area(height, weight)
    htn_lp = (
        cfg.hypertension_logit_intercept
        + cfg.hypertension_log_or_age_per_year * (age - cfg.age_reference)
        + cfg.hypertension_log_or_male * male
        + cfg.hypertension_log_or_bmi * (bmi_values - cfg.bmi_reference)
    )
    htn = d.uv("htn") < expit(htn_lp)
    log_mass = (
        np.log(_by_sex(male, cfg.lv_mass_ref_g))
        + cfg.lv_mass_bsa_exponent * np.log(bsa / _by_sex(male, cfg.lv_mass_bsa_ref_m2))
        + cfg.lv_mass_log_per_year_age * (age - cfg.age_reference)
        + cfg.lv_mass_log_hypertension * htn
        + cfg.lv_mass_log_sd * d.zv("lvm")
    )
    return {
        "male": male,
        "age": age,
        "height_cm": height,
        "weight_kg": weight,
        "bmi": bmi_values,
        "bsa_m2": bsa,
        "hypertension": htn,
        "lv_mass_g": np.exp(log_mass),
    }


# --------------------------------------------------------------------------------------------
# The heart vector
# --------------------------------------------------------------------------------------------


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _direction(base: tuple[float, float, float], n: int, *jitter: tuple[int, np.ndarray, float]) -> np.ndarray:
    """Unit vectors [n, 3]: ``base`` plus per-person jitter (axis index, z-scores, scale)."""
    v = np.tile(np.asarray(base, dtype=float), (n, 1))
    for axis, zs, scale in jitter:
        v[:, axis] += scale * zs
    return _unit(v)


_LOBE_POWER = 3


def _lobe(t_ms: np.ndarray, centre: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Compact Gaussian-like bump [n, t]: (1 - u^2)^3 inside the support, 0 outside.

    u = (t - centre) / half-width, with separate half-widths left and right of the peak (an
    asymmetric T wave). Smooth (C^2), close to a Gaussian of SD half-width / sqrt(6), and exactly
    zero outside [centre - left, centre + right].
    """
    dt = t_ms[None, :] - centre[:, None]
    half = np.where(dt < 0, left[:, None], right[:, None])
    u2 = np.minimum((dt / half) ** 2, 1.0)
    return (1.0 - u2) ** _LOBE_POWER


@dataclass
class _Heart:
    """Per-person ECG parameters, everything in ms, uV and unit vectors."""

    qrs_ms: np.ndarray  # onset of the first QRS lobe to the end of the last: the true QRS duration
    hr_bpm: np.ndarray
    pr_ms: np.ndarray
    qt_ms: np.ndarray
    strain: np.ndarray
    lobes: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]  # amp, dir, c, l, r
    lead_gain: np.ndarray  # [n, 8]: habitus and individual gain of each independent lead


def _heart(cov: dict[str, np.ndarray], d: _Draws, cfg: SynthConfig) -> _Heart:
    n = len(cov["age"])
    male = cov["male"]
    # Electrically visible mass: CMR mass times what the ECG cannot see (fibrosis, geometry of
    # the conduction system, CMR measurement error). ze is its z-score on a log scale.
    log_mass_e = np.log(cov["lv_mass_g"]) + cfg.electrical_log_sd * d.zv("electrical")
    ze = (log_mass_e - np.log(cfg.lv_mass_mean_g)) / cfg.mass_log_scale
    # Strain appears in susceptible people once the electrical LVMI passes the LVH threshold.
    lvmi_excess = log_mass_e - np.log(cov["bsa_m2"]) - np.log(_by_sex(male, cfg.lvh_thresholds_g_m2))
    susceptible = d.uv("strain") < cfg.strain_fraction
    strain = susceptible * expit((lvmi_excess - cfg.strain_offset_log) / cfg.strain_scale_log)

    # --- timing ---
    qrs = np.clip(
        cfg.qrs_base_ms + cfg.qrs_per_ze_ms * ze + cfg.qrs_male_ms * male + cfg.qrs_sd_ms * d.zv("qrs"),
        *cfg.qrs_range_ms,
    )
    hr = _truncnorm(d.uv("hr"), cfg.hr_mean_bpm, cfg.hr_sd_bpm, cfg.hr_range_bpm)
    rr_s = 60.0 / hr
    pr = _truncnorm(d.uv("pr"), cfg.pr_mean_ms, cfg.pr_sd_ms, cfg.pr_range_ms)
    # P wave ends at least 30 ms before the QRS: an isoelectric PR segment for the baseline.
    p_dur = np.minimum(np.clip(cfg.p_duration_ms[0] + cfg.p_duration_ms[1] * d.zv("p_dur"), 75.0, 125.0), pr - 30.0)
    # Framingham: QTc = QT + 154 ms * (1 - RR), so QT shortens at faster rates; a wider QRS
    # lengthens the QT.
    qt = cfg.qtc_ms[0] + cfg.qtc_ms[1] * d.zv("qtc") - 154.0 * (1.0 - rr_s) + cfg.qt_per_qrs * (qrs - cfg.qrs_base_ms)
    qt = np.clip(qt, qrs + 200.0, _TEMPLATE_POST_MS - 20.0)

    # --- voltage ---
    habitus = np.exp(
        cfg.voltage_log_per_bmi * (cov["bmi"] - cfg.bmi_reference)
        + cfg.voltage_log_per_log_bsa * np.log(cov["bsa_m2"] / cfg.bsa_reference_m2)
        + cfg.voltage_log_per_year_age * (cov["age"] - cfg.age_reference)
        + cfg.voltage_log_sd * d.zv("volt")
    )
    lead_gain = np.empty((n, _N8))
    lead_gain[:, _LIMB] = (habitus * np.exp(cfg.voltage_limb_log_sd * d.zv("volt_limb")))[:, None]
    lead_gain[:, ~_LIMB] = (
        habitus
        * np.exp(cfg.voltage_precordial_log_sd * d.zv("volt_prec"))
        * np.where(male, 1.0, cfg.voltage_female_precordial)
    )[:, None]
    mass_gain = np.exp(cfg.voltage_mass_exponent * (log_mass_e - np.log(cfg.lv_mass_mean_g)))

    # --- directions (Frank: X left, Y feet, Z back) ---
    axis = np.deg2rad(
        np.clip(
            cfg.axis_mean_deg
            + cfg.axis_sd_deg * d.zv("axis")
            + cfg.axis_per_year_age_deg * (cov["age"] - cfg.age_reference)
            + cfg.axis_per_bmi_deg * (cov["bmi"] - cfg.bmi_reference)
            + cfg.axis_per_ze_deg * ze,
            *cfg.axis_range_deg,
        )
    )
    back = np.deg2rad(
        np.clip(
            cfg.posterior_mean_deg + cfg.posterior_sd_deg * d.zv("posterior") + cfg.posterior_per_ze_deg * ze,
            -15.0,
            50.0,
        )
    )
    main_dir = np.stack([np.cos(axis) * np.cos(back), np.sin(axis) * np.cos(back), np.sin(back)], axis=1)
    # The posterobasal LV lobe follows the frontal axis loosely but points mostly backwards.
    post_dir = _unit(np.stack([0.25 * np.cos(axis), 0.25 * np.sin(axis) - 0.2, np.full(n, 0.95)], axis=1))
    septal_dir = _direction((-0.45, 0.30, -0.85), n, (0, d.zv("septal_dx"), 0.15))
    apical_dir = _direction((0.30, 0.70, -0.65), n)
    terminal_dir = _direction((-0.55, -0.55, 0.60), n, (0, d.zv("terminal_dx"), 0.2), (1, d.zv("terminal_dy"), 0.3))
    p_ra_dir = _direction((0.15, 0.85, -0.50), n)
    p_la_dir = _direction((0.75, 0.35, 0.55), n)
    t_normal = _direction(
        (0.65, 0.55, -0.45), n, (0, d.zv("t_dx"), 0.15), (1, d.zv("t_dy"), 0.15), (2, d.zv("t_dz"), 0.2)
    )
    # Repolarisation turns away from the depolarisation with mass; fully so with strain.
    turn = np.clip(cfg.t_turn_per_ze * np.maximum(ze, 0.0) + strain, 0.0, 1.0)[:, None]
    t_dir = _unit((1.0 - turn) * t_normal - turn * main_dir + 1e-9)

    def lobe_amp(name: str) -> np.ndarray:
        # Each non-LV lobe varies log-normally from person to person around its reference.
        return getattr(cfg, f"{name}_uv") * np.exp(cfg.lobe_log_sd * d.zv(name))

    delay = np.clip(cfg.lv_delay_per_ze * ze, -0.06, 0.08)  # keeps the LV lobes inside [0, qrs]
    p_on = -pr
    t_end = qt
    t_width = 0.72 * (qt - qrs)
    t_peak = t_end - 0.4 * t_width
    st_centre = qrs + 0.45 * (t_peak - qrs)
    lobes = [
        # P wave: right atrium then left atrium, inside [-PR, -PR + P duration].
        (lobe_amp("p_ra"), p_ra_dir, p_on + 0.38 * p_dur, 0.38 * p_dur, 0.38 * p_dur),
        (lobe_amp("p_la"), p_la_dir, p_on + 0.62 * p_dur, 0.38 * p_dur, 0.38 * p_dur),
        # QRS, inside [0, qrs]: septum, apex, LV lateral wall, LV posterobasal wall, basal RV/LV.
        (lobe_amp("septal") * np.exp(-0.1 * np.maximum(ze, 0)), septal_dir, 0.14 * qrs, 0.14 * qrs, 0.14 * qrs),
        (lobe_amp("apical"), apical_dir, 0.32 * qrs, 0.22 * qrs, 0.22 * qrs),
        (cfg.lv_lateral_uv * mass_gain, main_dir, (0.45 + delay) * qrs, (0.30 + delay) * qrs, 0.27 * qrs),
        (
            cfg.lv_posterior_uv * mass_gain * np.exp(cfg.lobe_log_sd * d.zv("lv_post")),
            post_dir,
            (0.60 + delay) * qrs,
            0.25 * qrs,
            0.25 * qrs,
        ),
        (lobe_amp("terminal"), terminal_dir, 0.82 * qrs, 0.18 * qrs, 0.18 * qrs),
        # ST strain: starts at the J point, opposite the main QRS vector (lateral depression).
        (cfg.st_depression_uv * strain, -main_dir, st_centre, st_centre - qrs, t_peak - st_centre),
        # T wave: asymmetric, ends at QT; flatter with mass.
        (
            lobe_amp("t") * np.exp(cfg.t_log_per_ze * ze) * (1.0 - 0.25 * strain),
            t_dir,
            t_peak,
            0.6 * t_width,
            0.4 * t_width,
        ),
    ]
    return _Heart(qrs, hr, pr, qt, strain, lobes, lead_gain)


_T_MS = (np.arange(_L) - _PRE) * _DT_MS


def _vcg(h: _Heart) -> np.ndarray:
    """The noise-free beat as a heart vector [n, 3, L] (uV) on the template grid."""
    n = len(h.hr_bpm)
    vcg = np.zeros((n, 3, _L))
    for amplitude, direction, centre, left, right in h.lobes:
        vcg += (amplitude[:, None] * direction)[:, :, None] * _lobe(_T_MS, centre, left, right)[:, None, :]
    return vcg


# Respiration rotates the heart about the antero-posterior (Z) axis: d(R v)/d(theta) = G v.
_ROTATION_GENERATOR = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def _true_amplitudes(template8: np.ndarray, qrs_ms: np.ndarray) -> dict[str, np.ndarray]:
    """True R and S of every lead (uV) on the noise-free template, over the QRS [0, qrs_ms]."""
    t12 = twelve_leads(template8)  # [n, 12, L]
    in_qrs = (_T_MS[None, :] >= 0.0) & (_T_MS[None, :] <= qrs_ms[:, None])  # [n, L]
    qrs = np.where(in_qrs[:, None, :], t12, 0.0)
    out = {}
    r = np.maximum(qrs.max(axis=2), 0.0)
    s = np.maximum(-qrs.min(axis=2), 0.0)
    for j, lead in enumerate(LEADS):
        out[true_column("r", lead)] = r[:, j]
        out[true_column("s", lead)] = s[:, j]
    return out


# --------------------------------------------------------------------------------------------
# Rhythm and noise, in the frequency domain
# --------------------------------------------------------------------------------------------


def _beat_schedule(h: _Heart, d: _Draws, cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray]:
    """Each beat's QRS onset as a recording sample [n, _MAX_BEATS] (may lie outside the 10 s) and
    its respiratory phase value sin(...) [n, _MAX_BEATS]: the one rhythm that the waveform
    (:func:`_beat_trains`) and the truth (``true_qrs_onsets``) both use."""
    n = len(h.hr_bpm)
    rr = 60.0 / h.hr_bpm
    resp_hz = cfg.respiration_hz[0] + (cfg.respiration_hz[1] - cfg.respiration_hz[0]) * d.uv("resp_hz")
    resp_phase = 2 * np.pi * d.uv("resp_phase")
    onsets = np.empty((n, _MAX_BEATS), dtype=int)
    breaths = np.empty((n, _MAX_BEATS))
    # Start up to one RR before the recording (minus the T wave) so the first beat is random.
    t = -d.uv("phase") * rr - _TEMPLATE_POST_MS / 1000.0 * 0.5
    for k in range(_MAX_BEATS):
        breath = np.sin(2 * np.pi * resp_hz * t + resp_phase)
        onsets[:, k] = np.rint(t * SAMPLE_RATE_HZ).astype(int)
        breaths[:, k] = breath
        t = t + rr * (1.0 + cfg.rsa_amplitude * breath + cfg.rr_jitter_sd * d.beat_z[:, 0, k])
    return onsets, breaths


def _qrs_onsets(onsets: np.ndarray) -> list[list[int]]:
    """Per person, the QRS onsets (samples at 500 Hz) that fall inside the 10-s recording."""
    return [[int(s) for s in row if 0 <= s < N_SAMPLES] for row in onsets]


def _beat_trains(h: _Heart, d: _Draws, cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray]:
    """Amplitude and rotation impulse trains [n, _NFFT] at each beat's QRS onset."""
    n = len(h.hr_bpm)
    amp_train = np.zeros((n, _NFFT))
    rot_train = np.zeros((n, _NFFT))
    rows = np.arange(n)
    onsets, breaths = _beat_schedule(h, d, cfg)
    for k in range(_MAX_BEATS):
        breath = breaths[:, k]
        # A QRS onset at recording sample s puts its impulse at index L + s (see _render).
        pos = onsets[:, k] + _L
        ok = (pos >= 0) & (pos < _NFFT - _L)
        amp_train[rows[ok], pos[ok]] = (
            1.0 + cfg.beat_amplitude_sd * d.beat_z[ok, 1, k] + cfg.respiratory_amplitude * breath[ok]
        )
        rot_train[rows[ok], pos[ok]] = cfg.respiratory_rotation_rad * breath[ok]
    return amp_train, rot_train


def _bad_lead(d: _Draws, cfg: SynthConfig) -> np.ndarray:
    """Index (in INDEPENDENT_LEADS) of each person's bad electrode, -1 for none."""
    bad = d.uv("bad") < cfg.bad_lead_fraction
    return np.where(bad, np.minimum((d.uv("bad_lead") * _N8).astype(int), _N8 - 1), -1)


def _noise_spectrum(d: _Draws, cfg: SynthConfig) -> np.ndarray:
    """Noise of the 8 independent leads as an rfft spectrum [n, 8, _NBIN] (uV)."""
    n = d.z.shape[0]
    freqs = np.fft.rfftfreq(_NFFT, 1.0 / SAMPLE_RATE_HZ)
    white = (d.spectra[:, 0] + 1j * d.spectra[:, 1]).astype(np.complex64)  # [n, 8, bins]

    def scale(shape: np.ndarray, rms_uv: np.ndarray) -> np.ndarray:
        # Parseval: rfft bins of complex normals (real and imaginary parts N(0, 1)) times a shape
        # g give a time-domain RMS of 2 * sqrt(sum g^2) / N (both spectrum halves); scale to rms_uv.
        norm = 2.0 * np.sqrt(np.sum(shape**2)) / _NFFT
        return rms_uv[..., None] * (shape / norm)[None, None, :]

    # Per-lead levels: each person has an overall level, each lead varies around it.
    lead_z = np.stack([d.zv(f"emg_{lead}") for lead in INDEPENDENT_LEADS], axis=1)
    emg_rms = (
        cfg.emg_median_uv
        * np.exp(0.4 * d.zv("emg")[:, None] + 0.25 * lead_z)
        * np.where(_LIMB, cfg.emg_limb_factor, 1.0)
    )
    wander_rms = cfg.wander_median_uv * np.exp(0.4 * d.zv("wander"))[:, None] * np.ones(_N8)
    hum_amp = cfg.hum_median_uv * np.exp(0.5 * d.zv("hum"))[:, None] * np.ones(_N8)
    # A bad electrode: every kind of noise several times larger in that lead.
    bad_lead = _bad_lead(d, cfg)
    bad = bad_lead >= 0
    factor = np.ones((n, _N8))
    factor[bad, bad_lead[bad]] = cfg.bad_lead_noise_factor
    lo, hi = cfg.emg_band_hz
    # EMG: band-limited, smooth roll-off (2nd-order-like) outside the band.
    emg_shape = 1.0 / np.sqrt((1.0 + (lo / np.maximum(freqs, 1e-3)) ** 4) * (1.0 + (freqs / hi) ** 4))
    # Wander: 1/f below 0.6 Hz (respiration and electrode drift), nothing at DC.
    wander_shape = np.where((freqs > 0) & (freqs <= 0.6), 1.0 / np.maximum(freqs, 1e-3), 0.0)
    shape = scale(emg_shape, emg_rms * factor)
    shape += scale(wander_shape, wander_rms * factor)
    spectrum = white * shape
    # Mains hum: one exact bin (the window holds a whole number of cycles) plus a 3rd harmonic.
    for harmonic, rel in ((1, 1.0), (3, 0.25)):
        k = int(round(harmonic * cfg.mains_hz * _NFFT / SAMPLE_RATE_HZ))
        if k < _NBIN - 1:
            phase = 2 * np.pi * (d.uv("hum_phase")[:, None] + np.arange(_N8) / _N8 * 0.3)
            spectrum[:, :, k] += (rel * hum_amp * factor * _NFFT / 2.0) * np.exp(1j * phase)
    return spectrum


def _render(template8: np.ndarray, rotated8: np.ndarray, h: _Heart, d: _Draws, cfg: SynthConfig) -> np.ndarray:
    """Beats placed on the 10-s grid plus noise: 8 independent leads [n, 8, N_SAMPLES] (uV)."""
    amp_train, rot_train = _beat_trains(h, d, cfg)
    noise = _noise_spectrum(d, cfg)
    # template * amp + rotated * rot + noise, in place (the same operations in the same order:
    # identical output, without four temporaries of [n, 8, _NBIN] complex numbers).
    spectrum = np.fft.rfft(template8, _NFFT, axis=-1)
    spectrum *= np.fft.rfft(amp_train, axis=-1)[:, None, :]
    rotated = np.fft.rfft(rotated8, _NFFT, axis=-1)
    rotated *= np.fft.rfft(rot_train, axis=-1)[:, None, :]
    spectrum += rotated
    del rotated
    spectrum += noise
    # A beat with QRS onset at recording sample s has its impulse at L + s; its template sample
    # j (time j - PRE around the onset) lands at L + s + j = L + PRE + (recording sample). The
    # impulses sit in [0, NFFT - L), so the circular convolution never wraps a beat around.
    full = np.fft.irfft(spectrum, _NFFT, axis=-1)
    return full[:, :, _L + _PRE : _L + _PRE + N_SAMPLES]


# --------------------------------------------------------------------------------------------
# Follow-up
# --------------------------------------------------------------------------------------------


def _followup(cov: dict[str, np.ndarray], d: _Draws, cfg: SynthConfig) -> dict[str, np.ndarray]:
    """Prevalent flags, incident events and times (years from the ECG) for every outcome."""
    n = len(cov["age"])
    z_mass = (cov["lv_mass_g"] - cfg.lv_mass_mean_g) / cfg.lv_mass_sd_g
    age_c = cov["age"] - cfg.age_reference
    male = cov["male"].astype(float)
    u = d.followup_u
    loss = -np.log1p(-u[:, -1]) / cfg.loss_rate_per_year if cfg.loss_rate_per_year > 0 else np.full(n, np.inf)
    censor = np.minimum(cfg.admin_censor_years, loss)
    latent: dict[str, np.ndarray] = {}
    prevalent: dict[str, np.ndarray] = {}
    for k, model in enumerate(cfg.outcomes):
        lp = model.log_hr_per_sd_lv_mass * z_mass + model.log_hr_age_per_year * age_c + model.log_hr_male * male
        # Weibull PH by inversion: S(t) = exp(-rate * t^shape * e^lp).
        e = -np.log1p(-u[:, 2 * k])
        latent[model.name] = (e / (model.rate_per_year * np.exp(lp))) ** (1.0 / model.weibull_shape)
        if model.prevalence > 0:
            prevalent[model.name] = u[:, 2 * k + 1] < expit(logit(model.prevalence) + lp)
        else:
            prevalent[model.name] = np.zeros(n, dtype=bool)
    death_time = latent.get("death", np.full(n, np.inf))
    out: dict[str, np.ndarray] = {}
    for model in cfg.outcomes:
        name = model.name
        # Non-fatal outcomes are also censored at death (cause-specific hazards, which Cox models
        # on the true covariates recover); death only by administrative censoring or loss.
        end = censor if name == "death" else np.minimum(censor, death_time)
        event = (latent[name] <= end) & ~prevalent[name]
        # Prevalent cases are not at risk: censored at the ECG (time 0, no event) so that a Cox
        # fit that forgets to exclude them is not distorted; analyses exclude them anyway.
        out[f"{name}_prevalent"] = prevalent[name]
        out[f"{name}_event"] = event
        out[f"{name}_time_years"] = np.where(prevalent[name], 0.0, np.minimum(latent[name], end))
    return out


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _ids(seed: int, indices: np.ndarray) -> tuple[list[str], list[str]]:
    return [f"syn-{seed}-{i:07d}" for i in indices], [f"synp-{seed}-{i:07d}" for i in indices]


def _ecg_datetimes(d: _Draws, cfg: SynthConfig) -> np.ndarray:
    start = np.datetime64(cfg.ecg_date_range[0], "D")
    days = (np.datetime64(cfg.ecg_date_range[1], "D") - start).astype(int)
    day = start + np.floor(d.uv("date") * days).astype("timedelta64[D]")
    # Clinic hours 08:00-18:00, to the second.
    seconds = (8 * 3600 + np.floor(d.uv("hour") * 10 * 3600)).astype("timedelta64[s]")
    return (day.astype("datetime64[s]") + seconds).astype("datetime64[us]")


def _generate_block(
    seed: int, indices: np.ndarray, cfg: SynthConfig, waveforms: bool = True
) -> tuple[np.ndarray | None, dict[str, Any], dict[str, Any]]:
    d = _draw(seed, indices, len(cfg.outcomes), noise=waveforms)
    cov = _covariates(d, cfg)
    h = _heart(cov, d, cfg)
    vcg = _vcg(h)
    template8 = vcg_to_leads(vcg) * h.lead_gain[:, :, None]
    truth = _true_amplitudes(template8, h.qrs_ms)
    ecg = None
    if waveforms:
        rotated8 = vcg_to_leads(np.einsum("kj,njt->nkt", _ROTATION_GENERATOR, vcg)) * h.lead_gain[:, :, None]
        leads8 = _render(template8, rotated8, h, d, cfg)
        # Limb leads are derived from the *noisy* I and II (as carts do), then each lead is
        # rounded on its own: |I + III - II| <= 1 uV after rounding.
        ecg = np.clip(np.rint(twelve_leads(leads8)), INT16_MIN, INT16_MAX).astype(np.int16)
    seed_ids, patient_ids = _ids(seed, indices)
    columns: dict[str, Any] = {
        "ecg_id": seed_ids,
        "patient_id": patient_ids,
        "ecg_datetime": _ecg_datetimes(d, cfg),
        "source_format": "synthetic",
        "source_uri": [f"synthetic://{seed}/{i}" for i in indices],
        "original_fs": float(SAMPLE_RATE_HZ),
        "age": np.round(cov["age"], 2),
        "sex": np.where(cov["male"], "M", "F"),
        "height_cm": np.round(cov["height_cm"], 1),
        "weight_kg": np.round(cov["weight_kg"], 1),
    }
    # BSA from the rounded height and weight, so a consumer recomputing it gets the same value.
    columns["bsa_m2"] = body_surface_area(columns["height_cm"], columns["weight_kg"])
    columns["lv_mass_g"] = np.round(cov["lv_mass_g"], 2)
    columns["hypertension"] = cov["hypertension"]
    columns["bmi"] = bmi(columns["height_cm"], columns["weight_kg"])
    columns["true_qrs_ms"] = h.qrs_ms
    # Every beat's QRS onset in the recording: with true_qrs_ms, where the QRS complexes lie.
    columns["true_qrs_onsets"] = _qrs_onsets(_beat_schedule(h, d, cfg)[0])
    columns["true_hr_bpm"] = h.hr_bpm
    columns.update(truth)
    extras = {"true_strain": h.strain, "true_pr_ms": h.pr_ms, "true_qt_ms": h.qt_ms, "bad_lead": _bad_lead(d, cfg)}
    followup = {"ecg_id": seed_ids, "patient_id": patient_ids, "ecg_datetime": columns["ecg_datetime"]}
    followup.update(_followup(cov, d, cfg))
    return ecg, {**columns, **extras}, followup


def _generate(
    n: int, seed: int, start_index: int, config: SynthConfig, waveforms: bool
) -> tuple[np.ndarray | None, pd.DataFrame, pd.DataFrame]:
    if n < 0 or start_index < 0 or seed < 0:
        raise ValueError("n, seed and start_index must be non-negative")
    ecgs: list[np.ndarray] = []
    tables: list[pd.DataFrame] = []
    followups: list[pd.DataFrame] = []
    block = max(1, config.block_size)
    # An empty batch still builds (and then drops) one row.
    blocks = [
        np.arange(start_index + lo, start_index + max(min(n, lo + block), lo + 1)) for lo in range(0, max(n, 1), block)
    ]
    threads = min(len(blocks), local_cores()) if waveforms else 1
    # Blocks are independent (per-person streams) and their bulk (FFTs, array arithmetic, random
    # fills) runs in NumPy without the GIL, so threads use every core; the output is identical.
    with ThreadPoolExecutor(threads) as pool:
        for ecg, columns, followup in pool.map(lambda idx: _generate_block(seed, idx, config, waveforms), blocks):
            if ecg is not None:
                ecgs.append(ecg)
            tables.append(pd.DataFrame(columns))
            followups.append(pd.DataFrame(followup))
    table = pd.concat(tables, ignore_index=True).iloc[:n]
    table["bad_lead"] = pd.Series(
        [INDEPENDENT_LEADS[i] if i >= 0 else None for i in table["bad_lead"]], index=table.index, dtype=object
    )
    followup = pd.concat(followups, ignore_index=True).iloc[:n]
    return (np.concatenate(ecgs)[:n] if waveforms else None), table, followup


def generate_batch(n: int, seed: int, start_index: int = 0, config: SynthConfig = SynthConfig()) -> SynthBatch:
    """Generate people ``start_index .. start_index + n - 1`` of cohort ``seed``.

    Deterministic in (seed, index, config): each person has their own random stream, so the
    same person is identical whatever batch they are generated in. Vectorised over blocks of
    ``config.block_size`` people (a loop over lobes and beats, never over samples).
    """
    ecg, table, followup = _generate(n, seed, start_index, config, waveforms=True)
    assert ecg is not None
    return SynthBatch(ecg, table, followup)


def generate_people(
    n: int, seed: int, start_index: int = 0, config: SynthConfig = SynthConfig()
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The table and follow-up of :func:`generate_batch` without rendering the waveforms.

    Identical rows to generate_batch's (covariates, LV mass, true amplitudes, follow-up) at a
    small fraction of the cost: for outcome and covariate work that needs no ECG.
    """
    _, table, followup = _generate(n, seed, start_index, config, waveforms=False)
    return table, followup


def truth(config: SynthConfig, n: int, seed: int) -> dict[str, Any]:
    """The generating parameters of a cohort, JSON-serialisable (written as truth.json)."""
    params = asdict(config)
    params["outcomes"] = {m.name: asdict(m) for m in config.outcomes}
    return {
        "generator": "lvm_ray.synth",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "n": n,
        "outcomes": [m.name for m in config.outcomes],
        "log_hr_per_sd_lv_mass": {m.name: m.log_hr_per_sd_lv_mass for m in config.outcomes},
        "log_hr_age_per_year": {m.name: m.log_hr_age_per_year for m in config.outcomes},
        "log_hr_male": {m.name: m.log_hr_male for m in config.outcomes},
        "age_scale": "per year (log_hr_age_per_year); centred at age_reference",
        "lv_mass_mean_g": config.lv_mass_mean_g,
        "lv_mass_sd_g": config.lv_mass_sd_g,
        "lvh_thresholds_g_m2": {"M": config.lvh_thresholds_g_m2[0], "F": config.lvh_thresholds_g_m2[1]},
        "hazard_model": "Weibull proportional hazards, h(t) = rate*shape*t^(shape-1)*exp(lp); "
        "non-fatal outcomes censored at death; prevalent cases have time 0 and no event",
        "amplitude_definition": "R = max(QRS, 0), S = max(-QRS, 0) over the QRS window of the noise-free mean "
        "beat, relative to its isoelectric (0) baseline, in uV",
        "qrs_definition": "onset of the first to the end of the last QRS lobe of the noise-free beat (ms)",
        "qrs_onsets_definition": "true_qrs_onsets: recording samples (500 Hz) of every beat's QRS onset in the 10 s",
        "lead_transform": "Dower (Clin Cardiol 1980;3:87-95) for VCG->I,II,V1-V6; III, aVR, aVL, aVF derived",
        "parameters": json.loads(json.dumps(params)),
    }


def extra_fields() -> list[pa.Field]:
    """The Arrow fields of the synthetic-only columns, beyond the core schema (for DatasetWriter)."""
    return [
        pa.field("hypertension", pa.bool_()),
        pa.field("bmi", pa.float64()),
        pa.field("true_qrs_ms", pa.float64()),
        pa.field("true_qrs_onsets", pa.list_(pa.int32())),
        pa.field("true_hr_bpm", pa.float64()),
        *TRUE_AMPLITUDE_FIELDS,
        pa.field("true_strain", pa.float64()),
        pa.field("true_pr_ms", pa.float64()),
        pa.field("true_qt_ms", pa.float64()),
        pa.field("bad_lead", pa.string()),
    ]


_SUMMARY_COLUMNS = ("sex", "lv_mass_g", "bsa_m2")


def _batches_ahead(n: int, seed: int, chunk_size: int, config: SynthConfig) -> Iterator[SynthBatch]:
    """People 0..n-1 in chunks, the next chunk generated (in a thread) while the caller writes this
    one: Parquet encoding also runs without the GIL. At most two chunks are held."""
    with ThreadPoolExecutor(1) as ahead:
        step = max(1, chunk_size)
        futures = (ahead.submit(generate_batch, min(step, n - lo), seed, lo, config) for lo in range(0, n, step))
        pending = next(futures, None)
        while pending is not None:
            following = next(futures, None)  # submitted before this chunk is handed over
            yield pending.result()
            pending = following


def _write_chunk(writer: Any, batch: SynthBatch) -> np.ndarray:
    """Write the ECGs of ``batch`` that pass the quality checks, quarantine the rest; the kept mask."""
    from lvm_ray.signals import Rejection, check_quality

    reasons = [check_quality(e.astype(np.float64)) for e in batch.ecg]
    keep = np.array([r is None for r in reasons], dtype=bool)
    if not keep.all():  # never expected; quarantined rather than silently dropped
        writer.quarantine(
            [
                Rejection(ecg_id, uri, "synthetic", reason)
                for ecg_id, uri, reason in zip(batch.table.ecg_id, batch.table.source_uri, reasons, strict=True)
                if reason
            ]
        )
    writer.write(batch.table.loc[keep].reset_index(drop=True), batch.ecg[keep])
    return keep


def write_cohort(
    n: int,
    seed: int,
    out: str,
    config: SynthConfig = SynthConfig(),
    chunk_size: int = 1000,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Generate a cohort chunk by chunk and write it as a dataset at ``out`` (any fsspec URL).

    An existing dataset at ``out`` is refused unless ``overwrite`` (then only its own files are
    replaced); a folder of anything else is always refused.

    Writes the ECG shards (one per chunk) and manifest through :class:`lvm_ray.store.DatasetWriter`,
    ``out/followup.parquet`` and ``out/truth.json``. Memory stays bounded by ``chunk_size``.
    Returns a summary: n, LVH prevalence by sex, LV mass mean/SD, incident events per outcome, seconds.
    """
    from lvm_ray.store import DatasetWriter, join_url, write_json, write_table

    started = time.perf_counter()
    writer = DatasetWriter(out, extra_fields=extra_fields(), overwrite=overwrite)
    followups: list[pd.DataFrame] = []
    stats: list[pd.DataFrame] = []
    rejected = 0
    done = 0
    for batch in _batches_ahead(n, seed, chunk_size, config):
        keep = _write_chunk(writer, batch)
        rejected += int((~keep).sum())
        followups.append(batch.followup.loc[keep])
        stats.append(batch.table.loc[keep, list(_SUMMARY_COLUMNS)])
        done += len(batch.table)
        if progress is not None:
            progress(done, n)
    summary_stats = pd.concat(stats, ignore_index=True) if stats else pd.DataFrame(columns=list(_SUMMARY_COLUMNS))
    followup = pd.concat(followups, ignore_index=True) if followups else pd.DataFrame()
    manifest = writer.close(extra={"kind": "synthetic", "seed": seed, "generator_version": GENERATOR_VERSION})
    write_table(join_url(out, "followup.parquet"), followup)
    write_json(join_url(out, "truth.json"), truth(config, n, seed))
    lvh_config = LVHConfig(dict(zip(("M", "F"), config.lvh_thresholds_g_m2, strict=True)))
    lvh = derive(summary_stats, lvh_config)["lvh"].astype(float)
    return {
        "n": int(manifest.get("n_rows", len(summary_stats))),
        "n_quarantined": rejected,
        "lvh_prevalence": {sex: float(lvh[summary_stats["sex"] == sex].mean()) for sex in ("M", "F")},
        "lv_mass_mean_g": float(summary_stats["lv_mass_g"].mean()),
        "lv_mass_sd_g": float(summary_stats["lv_mass_g"].std()),
        "incident_events": {m.name: int(followup[f"{m.name}_event"].sum()) for m in config.outcomes},
        "seconds": round(time.perf_counter() - started, 2),
    }


__all__ = [
    "DEFAULT_OUTCOMES",
    "DOWER_MATRIX",
    "GENERATOR_VERSION",
    "INVERSE_DOWER_MATRIX",
    "OUTCOMES",
    "OutcomeModel",
    "SynthBatch",
    "SynthConfig",
    "extra_fields",
    "generate_batch",
    "generate_people",
    "leads_to_vcg",
    "truth",
    "twelve_leads",
    "vcg_to_leads",
    "write_cohort",
]
