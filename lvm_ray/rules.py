"""Classic ECG LVH voltage rules, measured on the median beat of each lead.

Pure code (NumPy, SciPy, pandas and neurokit2's QRS detector): no Ray, no I/O, no logging of
waveforms. The batch scoring stage and ``lvm-ray rules`` call :func:`measure_batch` once per batch.

Measurement (per ECG, canonical int16/float microvolts [12, 5000] at 500 Hz):

1. Baseline wander removed from every lead by a zero-phase 0.5 Hz high-pass (the sub-hertz
   baseline is estimated on 20 ms block means, which makes it cheap).
2. QRS detection **once per ECG** on a combined signal: the root-sum-square over the 12 leads of
   a QRS band-pass (difference of 10 ms and 80 ms moving averages, roughly 6-40 Hz), each lead
   weighted by the inverse of its own noise so that one noisy lead cannot swamp it. neurokit2's
   gradient detector (``nk.ecg_findpeaks(method="neurokit")``) finds the complexes; each
   fiducial is then the maximum of the combined signal nearby. The same fiducials serve all 12
   leads. (neurokit2's full ``ecg_process`` pipeline is not used: too slow for the batch target.)
3. A window of -250 ms .. +300 ms around each fiducial; beats are re-aligned (+-10 ms) to a first
   median template by cross-correlation over the QRS, and beats whose morphology does not match
   the template (ectopics, artefacts: median over leads of the QRS correlation below
   ``min_beat_correlation``) are dropped. Each kept beat is shifted by its own median level
   before the QRS (residual wander, electrode jumps); the median across beats, sample by sample,
   is the median (representative) beat of each lead. Leads that are flat or whose median beat
   stays too noisy are not measured (NaN, named in ``rules_error``).
4. QRS onset and offset on the median beats from the spatial velocity (root-sum-square over leads
   of the first derivative): the QRS is where the velocity exceeds ``qrs_threshold_fraction`` of
   its range, bounded by runs of ``qrs_quiet_s`` below it. Vectorised over the batch.
5. Per lead, relative to the PR-segment baseline (mean of the median beat over
   ``pr_baseline_s`` before QRS onset), over the QRS window [onset, offset]:
   R = max(QRS - baseline, 0) and S = max(baseline - QRS, 0), in microvolts (S is a positive
   magnitude). This is the definition the synthetic generator records its truth with.

Rules (:func:`rules_from_amplitudes`, shared by our measurements, the cart's amplitudes and
synthetic truth), thresholds in :class:`RulesConfig`:

- Sokolow-Lyon: SV1 + max(RV5, RV6) > 3500 uV.
- Cornell voltage: RaVL + SV3 > 2800 uV (men), > 2000 uV (women).
- Lead aVL: RaVL > 1100 uV.
- Any rule: any of the three (Kleene logic: True if any is True, NA if none is True and one is NA).
- Cornell product (Molloy et al., JACC 1992;20:1180; threshold as used by the LIFE study, Okin et
  al.): (RaVL + SV3, plus 6 mm = 600 uV in women) x QRS duration > 2440 mm*ms = 244 mV*ms =
  244,000 uV*ms. (Molloy's original cut-point was 2436 mm*ms; 2440 is the usual rounding.)
- Peguero-Lo Presti (JACC 2017;69:1694): deepest S in any lead (SD) + SV4 >= 2800 uV in men,
  >= 2300 uV in women (published with '>=').

The comparison is configurable (``strict`` '>' as in the published LVM-AI code, the default, or
``inclusive`` '>='); Peguero-Lo Presti keeps its published '>=' unless told otherwise.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy.signal import butter, sosfiltfilt

from lvm_ray.schema import LEAD_INDEX, LEADS, N_LEADS, N_SAMPLES, SAMPLE_RATE_HZ, cart_column, true_column
from lvm_ray.signals import normalise_sex

Comparison = Literal["strict", "inclusive"]
AmplitudeSource = Literal["measured", "cart", "true"]

#: Rule value columns (microvolts, or microvolt-milliseconds for the Cornell product).
RULE_VALUE_COLUMNS: tuple[str, ...] = (
    "sokolow_lyon_uv",
    "cornell_uv",
    "ravl_uv",
    "cornell_product_uv_ms",
    "peguero_uv",
)
#: Rule flag columns (pandas nullable 'boolean': <NA> where not measurable).
RULE_FLAG_COLUMNS: tuple[str, ...] = (
    "lvh_sokolow_lyon",
    "lvh_cornell",
    "lvh_avl",
    "lvh_cornell_product",
    "lvh_peguero",
    "lvh_any_rule",
)
RULE_COLUMNS: tuple[str, ...] = RULE_VALUE_COLUMNS + RULE_FLAG_COLUMNS


def measured_column(kind: str, lead: str) -> str:
    """Column holding our own measured amplitude, e.g. r_uv_V5 (kind 'r' or 's')."""
    return f"{kind}_uv_{lead}"


AMPLITUDE_COLUMNS: tuple[str, ...] = tuple(measured_column(k, lead) for k in ("r", "s") for lead in LEADS)
#: The columns of :func:`measure_batch`, in order.
MEASURE_COLUMNS: tuple[str, ...] = (*AMPLITUDE_COLUMNS, "qrs_ms", "hr_bpm", *RULE_COLUMNS, "rules_error")

_SOURCES = {
    "measured": (measured_column, "qrs_ms", ""),
    "cart": (cart_column, "cart_qrs_ms", "cart_"),
    "true": (true_column, "true_qrs_ms", "true_"),
}


@dataclass(frozen=True)
class MeasurementConfig:
    """Parameters of the median-beat measurement (times in seconds, amplitudes in microvolts)."""

    highpass_hz: float = 0.5
    #: QRS detection band: a moving average over detect_smooth_s minus one over
    #: detect_background_s (about 8-45 Hz).
    detect_smooth_s: float = 0.010
    detect_background_s: float = 0.080
    #: ECGs filtered together (bounds the memory of a large batch).
    chunk_size: int = 32
    #: Floor of a lead's noise level (robust SD of its second difference, uV) when weighting it
    #: for detection: leads cleaner than this weigh the same.
    detect_noise_floor_uv: float = 2.0
    window_pre_s: float = 0.25
    window_post_s: float = 0.30
    align_max_shift_s: float = 0.010
    #: QRS region used for alignment and beat consistency, relative to the fiducial.
    qrs_region_s: tuple[float, float] = (-0.06, 0.08)
    #: Window (relative to the fiducial) whose median each beat is shifted by before the median
    #: beat is taken; the PR baseline of the median beat then sets the reference.
    beat_baseline_s: tuple[float, float] = (-0.12, -0.06)
    min_beats: int = 3
    min_beat_correlation: float = 0.7
    hr_range_bpm: tuple[float, float] = (25.0, 250.0)
    #: QRS bounds from the spatial velocity of the median beats (see _qrs_bounds).
    qrs_core_fraction: float = 0.2
    qrs_threshold_fraction: float = 0.03
    qrs_offset_threshold_fraction: float = 0.03
    qrs_quiet_s: float = 0.012
    qrs_onset_search_s: float = 0.10
    qrs_offset_search_s: float = 0.10
    #: PR baseline: mean over [onset - pr_baseline_s[0], onset - pr_baseline_s[1]].
    pr_baseline_s: tuple[float, float] = (0.020, 0.004)
    #: A lead whose peak-to-peak range is below this is flat (lead off): not measured.
    flat_peak_to_peak_uv: float = 20.0
    #: A lead whose median beat is noisier than this (robust SD, uV) is not measured.
    max_lead_noise_uv: float = 60.0


@dataclass(frozen=True)
class RulesConfig:
    """Rule thresholds (microvolts; the Cornell product in uV*ms) and the comparison.

    Defaults are the published ones; ``comparison`` 'strict' is '>' (the LVM-AI code), 'inclusive'
    is '>=' (as the clinical literature writes Sokolow-Lyon and aVL). ``peguero_comparison``
    overrides it for Peguero-Lo Presti (published '>='); None follows ``comparison``.
    """

    sokolow_lyon_uv: float = 3500.0
    cornell_men_uv: float = 2800.0
    cornell_women_uv: float = 2000.0
    avl_uv: float = 1100.0
    #: 2440 mm*ms (1 mm = 100 uV) = 244 mV*ms.
    cornell_product_uv_ms: float = 244_000.0
    #: Added to the Cornell voltage of women for the product (Molloy: 6 mm).
    cornell_product_women_add_uv: float = 600.0
    peguero_men_uv: float = 2800.0
    peguero_women_uv: float = 2300.0
    comparison: Comparison = "strict"
    peguero_comparison: Comparison | None = "inclusive"
    measurement: MeasurementConfig = field(default_factory=MeasurementConfig)

    def __post_init__(self) -> None:
        for name in ("comparison", "peguero_comparison"):
            value = getattr(self, name)
            if value not in ("strict", "inclusive") and not (name == "peguero_comparison" and value is None):
                raise ValueError(f"{name} must be 'strict' or 'inclusive', got {value!r}")


# --------------------------------------------------------------------------------------------
# Rules from amplitudes
# --------------------------------------------------------------------------------------------


def _compare(values: np.ndarray, threshold: np.ndarray | float, comparison: Comparison) -> pd.arrays.BooleanArray:
    values = np.asarray(values, dtype=np.float64)
    threshold = np.broadcast_to(np.asarray(threshold, dtype=np.float64), values.shape)
    missing = np.isnan(values) | np.isnan(threshold)
    with np.errstate(invalid="ignore"):
        hit = values > threshold if comparison == "strict" else values >= threshold
    return pd.arrays.BooleanArray(np.where(missing, False, hit), missing)


def _column(table: pd.DataFrame | Mapping[str, Any], name: str, n: int) -> np.ndarray:
    if name in table:
        return np.asarray(pd.to_numeric(pd.Series(np.asarray(table[name], dtype=object)), errors="coerce"), float)
    return np.full(n, np.nan)


def _n_rows(table: pd.DataFrame | Mapping[str, Any]) -> int:
    if isinstance(table, pd.DataFrame):
        return len(table)
    for value in table.values():
        if np.ndim(value) > 0:
            return len(value)
    return 1


def rules_from_amplitudes(
    table: pd.DataFrame | Mapping[str, Any],
    config: RulesConfig = RulesConfig(),
    source: AmplitudeSource = "measured",
    *,
    prefix: str | None = None,
    missing_as_zero: bool = False,
) -> pd.DataFrame:
    """Compute every rule from per-lead amplitudes, whatever measured them.

    ``table`` (a DataFrame or a mapping of equal-length arrays) holds the amplitudes named by
    ``source``: 'measured' reads r_uv_<LEAD>/s_uv_<LEAD> and qrs_ms; 'cart' reads
    cart_r_uv_<LEAD>/cart_s_uv_<LEAD> (:func:`lvm_ray.schema.cart_column`) and cart_qrs_ms;
    'true' reads true_r_uv_<LEAD>/true_s_uv_<LEAD> (:func:`lvm_ray.schema.true_column`) and
    true_qrs_ms. Sex comes from the 'sex' column ('M'/'F'; anything else is unknown). Absent
    columns count as missing. S amplitudes are magnitudes (their absolute value is used).

    With ``missing_as_zero`` a missing amplitude counts as 0 uV (a cart that leaves a wave it
    did not find blank) in rows that carry at least one amplitude; rows with none stay NA.

    Returns the :data:`RULE_COLUMNS` with ``prefix`` (default: '' for measured, 'cart_', 'true_'),
    values as float64 and flags as nullable booleans (<NA> where an input is missing; the
    sex-specific rules are <NA> for unknown sex).
    """
    if source not in _SOURCES:
        raise ValueError(f"source must be one of {sorted(_SOURCES)}, got {source!r}")
    column, qrs_name, default_prefix = _SOURCES[source]
    prefix = default_prefix if prefix is None else prefix
    n = _n_rows(table)
    r = np.stack([_column(table, column("r", lead), n) for lead in LEADS], axis=1)
    s = np.abs(np.stack([_column(table, column("s", lead), n) for lead in LEADS], axis=1))
    if missing_as_zero:
        has_any = ~(np.isnan(r).all(axis=1) & np.isnan(s).all(axis=1))
        r = np.where(np.isnan(r) & has_any[:, None], 0.0, r)
        s = np.where(np.isnan(s) & has_any[:, None], 0.0, s)
    qrs_ms = _column(table, qrs_name, n)
    sex_values = table["sex"] if "sex" in table else [None] * n
    sex = np.array([normalise_sex(v) for v in np.asarray(sex_values, dtype=object).reshape(-1)], dtype=object)
    if len(sex) != n:
        raise ValueError(f"sex has {len(sex)} values for {n} rows")
    return _rules(r, s, qrs_ms, sex, config, prefix, index=table.index if isinstance(table, pd.DataFrame) else None)


def _rules(
    r: np.ndarray,
    s: np.ndarray,
    qrs_ms: np.ndarray,
    sex: np.ndarray,
    config: RulesConfig,
    prefix: str = "",
    index: pd.Index | None = None,
) -> pd.DataFrame:
    """Rules from amplitude matrices r, s [n, 12] (uV), qrs_ms [n] and sex [n] ('M'/'F'/None)."""
    male = sex == "M"
    female = sex == "F"
    unknown = ~(male | female)

    def by_sex(men: float, women: float) -> np.ndarray:
        return np.where(male, men, np.where(female, women, np.nan))

    rv5, rv6, ravl = r[:, LEAD_INDEX["V5"]], r[:, LEAD_INDEX["V6"]], r[:, LEAD_INDEX["aVL"]]
    sv1, sv3, sv4 = s[:, LEAD_INDEX["V1"]], s[:, LEAD_INDEX["V3"]], s[:, LEAD_INDEX["V4"]]
    sokolow = sv1 + np.maximum(rv5, rv6)
    cornell = ravl + sv3
    product = np.where(unknown, np.nan, (cornell + np.where(female, config.cornell_product_women_add_uv, 0.0)) * qrs_ms)
    # The deepest S over all 12 leads: only defined when every lead was measured.
    deepest_s = np.where(np.isnan(s).any(axis=1), np.nan, np.max(np.nan_to_num(s), axis=1)) if len(s) else s[:, 0]
    peguero = deepest_s + sv4
    cmp = config.comparison
    flags = {
        "lvh_sokolow_lyon": _compare(sokolow, config.sokolow_lyon_uv, cmp),
        "lvh_cornell": _compare(cornell, by_sex(config.cornell_men_uv, config.cornell_women_uv), cmp),
        "lvh_avl": _compare(ravl, config.avl_uv, cmp),
        "lvh_cornell_product": _compare(product, config.cornell_product_uv_ms, cmp),
        "lvh_peguero": _compare(
            peguero, by_sex(config.peguero_men_uv, config.peguero_women_uv), config.peguero_comparison or cmp
        ),
    }
    flags["lvh_any_rule"] = flags["lvh_sokolow_lyon"] | flags["lvh_cornell"] | flags["lvh_avl"]
    values = {
        "sokolow_lyon_uv": sokolow,
        "cornell_uv": cornell,
        "ravl_uv": ravl,
        "cornell_product_uv_ms": product,
        "peguero_uv": peguero,
    }
    out = {prefix + k: pd.Series(np.asarray(v, dtype=np.float64), index=index) for k, v in values.items()}
    out.update({prefix + k: pd.Series(v, index=index) for k, v in flags.items()})
    return pd.DataFrame(out, index=index)


def cart_rules(table: pd.DataFrame, config: RulesConfig = RulesConfig()) -> pd.DataFrame:
    """The rule columns with a 'cart_' prefix, from the cart's own amplitudes in ``table``.

    Reads cart_r_uv_<LEAD>/cart_s_uv_<LEAD> (and cart_qrs_ms for the Cornell product, where a
    reader provides it) and 'sex'. A blank amplitude in a row that has some counts as 0 uV (the
    cart found no such wave); rows (or tables) without cart amplitudes give all-NA rules.
    """
    return rules_from_amplitudes(table, config, "cart", missing_as_zero=True)


# --------------------------------------------------------------------------------------------
# Median-beat measurement
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _sos_lowpass(cutoff_hz: float, fs: float) -> np.ndarray:
    return butter(2, cutoff_hz, btype="lowpass", fs=fs, output="sos")


def _samples(seconds: float, fs: float) -> int:
    return int(round(seconds * fs))


def _remove_baseline(x: np.ndarray, cutoff_hz: float, fs: float) -> np.ndarray:
    """Zero-phase high-pass at ``cutoff_hz`` along the last axis, computed cheaply.

    The baseline (a zero-phase Butterworth low-pass at ``cutoff_hz``) is estimated on 20 ms block
    means (50 Hz), then linearly interpolated back and subtracted: the same result as a
    full-rate filter for a sub-hertz cut-off, at a twentieth of the cost.
    """
    block = max(_samples(0.02, fs), 1)
    n = x.shape[-1]
    n_blocks = n // block
    means = x[..., : n_blocks * block].reshape(*x.shape[:-1], n_blocks, block).mean(axis=-1)
    low = sosfiltfilt(_sos_lowpass(cutoff_hz, fs / block), means, axis=-1, padlen=min(n_blocks - 1, 100))
    u = np.clip((np.arange(n) + 0.5) / block - 0.5, 0, n_blocks - 1)
    i0 = np.minimum(u.astype(int), n_blocks - 2)
    frac = (u - i0).astype(x.dtype)
    return x - (low[..., i0] * (1 - frac) + low[..., i0 + 1] * frac).astype(x.dtype)


def _moving_sums(x: np.ndarray, halves: tuple[int, ...]) -> list[np.ndarray]:
    """Centred moving averages of x (last axis, edge-padded) over 2h+1 samples, for each h."""
    h_max = max(halves)
    n = x.shape[-1]
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(h_max, h_max)], mode="edge")
    csum = np.zeros(padded.shape[:-1] + (padded.shape[-1] + 1,), dtype=np.float64)
    np.cumsum(padded, axis=-1, dtype=np.float64, out=csum[..., 1:])
    return [
        ((csum[..., h_max + h + 1 : h_max + h + 1 + n] - csum[..., h_max - h : h_max - h + n]) / (2 * h + 1)).astype(
            np.float32
        )
        for h in halves
    ]


@dataclass
class MedianBeats:
    """Everything :func:`measure_median_beats` found, for a batch of n ECGs.

    ``median`` is [n, 12, L] (uV, NaN where not measured); ``fiducial`` is the index of the R
    fiducial inside the window; ``onset``/``offset`` are window indices (-1 where not found).
    """

    median: np.ndarray
    fiducial: int
    onset: np.ndarray
    offset: np.ndarray
    baseline_uv: np.ndarray
    r_uv: np.ndarray
    s_uv: np.ndarray
    qrs_ms: np.ndarray
    hr_bpm: np.ndarray
    n_beats: np.ndarray
    lead_noise_uv: np.ndarray
    error: list[str | None]


def _detection_signal(y: np.ndarray, cfg: MeasurementConfig, fs: float) -> np.ndarray:
    """[n, 12, N] baseline-free leads -> [n, N] noise-weighted root-sum-square of the QRS band.

    The band-pass is a difference of two centred moving averages (``detect_smooth_s`` and
    ``detect_background_s``, about 8-45 Hz); each lead is weighted by the inverse of its noise
    (robust SD of its second difference, floored at ``detect_noise_floor_uv``).
    """
    h_fast = max(_samples(cfg.detect_smooth_s, fs) // 2, 1)
    h_slow = max(_samples(cfg.detect_background_s, fs) // 2, h_fast + 1)
    fast, slow = _moving_sums(y, (h_fast, h_slow))
    band = fast - slow
    d2 = np.diff(y[..., ::2], n=2, axis=-1)
    noise = 1.4826 * np.median(np.abs(d2), axis=-1)
    weight = 1.0 / np.maximum(noise, cfg.detect_noise_floor_uv)
    weight = (weight / weight.sum(axis=1, keepdims=True)).astype(np.float32)
    return np.sqrt(np.einsum("nl,nlt->nt", weight, band * band))


def _find_fiducials(combined: np.ndarray, fs: float) -> np.ndarray:
    import neurokit2 as nk  # heavy import: only when measuring

    peaks = np.asarray(nk.ecg_findpeaks(combined, sampling_rate=int(fs), method="neurokit")["ECG_R_Peaks"], int)
    if peaks.size == 0:
        return peaks
    half = _samples(0.04, fs)
    lo = np.clip(peaks - half, 0, len(combined) - 1)
    idx = np.clip(lo[:, None] + np.arange(2 * half + 1), 0, len(combined) - 1)
    refined = idx[np.arange(len(peaks)), np.argmax(combined[idx], axis=1)]
    return np.unique(refined)


def _quiet_runs(below: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks of samples that end / start a run of ``w`` True values along the last axis."""
    csum = np.zeros(below.shape[:-1] + (below.shape[-1] + 1,), dtype=np.int32)
    np.cumsum(below, axis=-1, out=csum[..., 1:])
    full = (csum[..., w:] - csum[..., :-w]) == w  # run over [t, t + w)
    ends = np.zeros(below.shape, dtype=bool)
    starts = np.zeros(below.shape, dtype=bool)
    ends[..., w - 1 :] = full
    starts[..., : below.shape[-1] - w + 1] = full
    return ends, starts


def _masked_percentile(values: np.ndarray, mask: np.ndarray, q: float) -> np.ndarray:
    """Row-wise percentile of values [n, L] over mask [n, L]; 0 for empty rows."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows
        out = np.nanpercentile(np.where(mask, values, np.nan), q, axis=-1)
    return np.nan_to_num(out)


def _qrs_bounds(median: np.ndarray, fiducial: int, cfg: MeasurementConfig, fs: float) -> tuple[np.ndarray, np.ndarray]:
    """QRS onset and offset (window indices; -1 where not measurable) of median beats [n, 12, L].

    The spatial velocity v (root-sum-square over leads of the first derivative, 3-sample mean)
    has a core where v > ``qrs_core_fraction`` of its peak near the fiducial. Onset: the end of
    the last run of ``qrs_quiet_s`` below floor + ``qrs_threshold_fraction`` x (peak - floor)
    before the core (floor: 10th percentile of v before it), searched ``qrs_onset_search_s``
    back; offset: the start of the first such run after the core (floor from after the core,
    fraction ``qrs_offset_threshold_fraction``), searched ``qrs_offset_search_s`` on. Without a
    quiet run, the point of least velocity in the search range stands in.
    """
    n, _, L = median.shape
    measurable = np.isfinite(median).any(axis=(1, 2))
    m = np.nan_to_num(median)
    vel = np.sqrt(np.sum(np.gradient(m, axis=-1) ** 2, axis=1))  # [n, L]
    vel[:, 1:-1] = (vel[:, :-2] + vel[:, 1:-1] + vel[:, 2:]) / 3
    t = np.arange(L)
    half = _samples(0.06, fs)
    vmax = vel[:, max(fiducial - half, 0) : fiducial + half].max(axis=-1)
    core_region = (t >= fiducial - _samples(0.10, fs)) & (t <= fiducial + _samples(0.12, fs))
    core = (vel > cfg.qrs_core_fraction * vmax[:, None]) & core_region
    has_core = core.any(axis=-1) & (vmax > 0) & measurable
    c0 = np.argmax(core, axis=-1)
    c1 = L - 1 - np.argmax(core[:, ::-1], axis=-1)
    floor_pre = _masked_percentile(vel, t < c0[:, None], 10)
    floor_post = _masked_percentile(vel, t > c1[:, None], 10)
    thr_on = floor_pre + cfg.qrs_threshold_fraction * (vmax - floor_pre)
    thr_off = floor_post + cfg.qrs_offset_threshold_fraction * (vmax - floor_post)
    w = max(_samples(cfg.qrs_quiet_s, fs), 1)
    ends, _ = _quiet_runs(vel < thr_on[:, None], w)
    _, starts = _quiet_runs(vel < thr_off[:, None], w)
    first_ok = max(_samples(cfg.pr_baseline_s[0], fs), 1)
    on_window = (t < c0[:, None]) & (t >= np.maximum(c0 - _samples(cfg.qrs_onset_search_s, fs), first_ok)[:, None])
    off_window = (t > c1[:, None]) & (t <= np.minimum(c1 + _samples(cfg.qrs_offset_search_s, fs), L - 1)[:, None])
    on_ok = ends & on_window
    off_ok = starts & off_window
    onset_run = L - np.argmax(on_ok[:, ::-1], axis=-1)  # one past the run's last sample
    offset_run = np.argmax(off_ok, axis=-1)
    onset_min = np.argmin(np.where(on_window, vel, np.inf), axis=-1)
    offset_min = np.argmin(np.where(off_window, vel, np.inf), axis=-1)
    onset = np.where(on_ok.any(axis=-1), onset_run, onset_min)
    offset = np.where(off_ok.any(axis=-1), offset_run, offset_min)
    valid = has_core & on_window.any(axis=-1) & off_window.any(axis=-1)
    return np.where(valid, onset, -1), np.where(valid, offset, -1)


def _one_median_beat(
    hp: np.ndarray, raw_ptp: np.ndarray, combined: np.ndarray, cfg: MeasurementConfig, fs: float
) -> tuple[np.ndarray | None, float, int, np.ndarray, str | None]:
    """Median beat [12, L] of one ECG (hp: [12, N] high-passed) -> (median, hr, beats, noise, error)."""
    nan12 = np.full(N_LEADS, np.nan)
    if raw_ptp.max() < cfg.flat_peak_to_peak_uv:
        return None, np.nan, 0, nan12, "no beats detected (flat signal)"
    try:
        peaks = _find_fiducials(combined, fs)
    except Exception as exc:  # noqa: BLE001 - the detector must never crash a batch
        return None, np.nan, 0, nan12, f"no beats detected (QRS detector failed: {type(exc).__name__})"
    if peaks.size == 0:
        return None, np.nan, 0, nan12, "no beats detected"
    hr = 60.0 * fs / float(np.median(np.diff(peaks))) if peaks.size >= 2 else np.nan
    pre, post = _samples(cfg.window_pre_s, fs), _samples(cfg.window_post_s, fs)
    shift = _samples(cfg.align_max_shift_s, fs)
    n = hp.shape[-1]
    keep = peaks[(peaks - pre - shift >= 0) & (peaks + post + shift <= n)]
    if keep.size < cfg.min_beats:
        return None, hr, int(keep.size), nan12, f"fewer than {cfg.min_beats} beats ({keep.size} detected)"
    lo_hr, hi_hr = cfg.hr_range_bpm
    if not lo_hr <= hr <= hi_hr:
        return None, hr, int(keep.size), nan12, f"implausible heart rate {hr:.0f} bpm"
    L = pre + post
    idx = keep[:, None] + np.arange(-pre - shift, post + shift)  # [B, L + 2 shift]
    ext = hp[:, idx].transpose(1, 0, 2)  # [B, 12, L + 2 shift]
    beats = ext[:, :, shift : shift + L]
    template = np.median(beats, axis=0)
    q0, q1 = pre + _samples(cfg.qrs_region_s[0], fs), pre + _samples(cfg.qrs_region_s[1], fs)
    tq = template[:, q0:q1]
    # Cross-correlate every beat with the template over the QRS for shifts -shift..shift.
    shifts = np.arange(2 * shift + 1)
    win = ext[:, :, q0 : q1 + 2 * shift]
    seg = np.lib.stride_tricks.sliding_window_view(win, q1 - q0, axis=-1)  # [B, 12, 2s+1, Q]
    score = np.einsum("blsq,lq->bs", seg, tq)
    best = shifts[np.argmax(score, axis=1)]
    gather = best[:, None] + np.arange(L)  # [B, L]
    aligned = np.take_along_axis(ext, gather[:, None, :].repeat(N_LEADS, axis=1), axis=-1)
    # Beat consistency: median over leads of the QRS correlation with the template.
    a = aligned[:, :, q0:q1] - aligned[:, :, q0:q1].mean(axis=-1, keepdims=True)
    b = tq - tq.mean(axis=-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where(den > 0, (a * b).sum(-1) / den, 0.0)  # [B, 12]
    good = np.median(corr, axis=1) >= cfg.min_beat_correlation
    if good.sum() < cfg.min_beats:
        return (
            None,
            hr,
            int(good.sum()),
            nan12,
            (f"too noisy: only {int(good.sum())} of {keep.size} beats match the median beat"),
        )
    aligned = aligned[good]
    # Remove each beat's own offset (residual wander, electrode jumps) before the median.
    w0, w1 = pre + _samples(cfg.beat_baseline_s[0], fs), pre + _samples(cfg.beat_baseline_s[1], fs)
    aligned = aligned - np.median(aligned[:, :, w0:w1], axis=-1, keepdims=True)
    median = np.median(aligned, axis=0)
    # Noise of each lead's median beat: robust SD of the beats around it, over sqrt(beats).
    resid = np.abs(aligned[:, :, ::2] - median[:, ::2]).transpose(1, 0, 2).reshape(N_LEADS, -1)
    noise = 1.4826 * np.median(resid, axis=1) * 1.2533 / np.sqrt(aligned.shape[0])
    return median, hr, int(aligned.shape[0]), noise, None


def measure_median_beats(
    ecg: np.ndarray, config: RulesConfig = RulesConfig(), fs: float = SAMPLE_RATE_HZ
) -> MedianBeats:
    """Median beats, QRS fiducials, heart rate and per-lead R/S of a batch [n, 12, N] (uV)."""
    cfg = config.measurement
    x = np.asarray(ecg)
    if x.ndim != 3 or x.shape[1] != N_LEADS:
        raise ValueError(f"ecg must be [n, {N_LEADS}, samples], got shape {x.shape}")
    n = x.shape[0]
    pre, post = _samples(cfg.window_pre_s, fs), _samples(cfg.window_post_s, fs)
    L = pre + post
    median = np.full((n, N_LEADS, L), np.nan)
    hr = np.full(n, np.nan)
    n_beats = np.zeros(n, dtype=int)
    noise = np.full((n, N_LEADS), np.nan)
    errors: list[str | None] = [None] * n
    if np.issubdtype(x.dtype, np.integer):
        finite = np.ones(n, dtype=bool)
    else:
        finite = np.isfinite(x).all(axis=(1, 2))
    for i in np.flatnonzero(~finite):
        errors[i] = "non-finite samples (NaN/inf)"
    ptp = np.zeros((n, N_LEADS), dtype=np.float32)
    chunk = max(int(cfg.chunk_size), 1)
    for c0 in range(0, n, chunk):
        idx = np.arange(c0, min(c0 + chunk, n))
        idx = idx[finite[idx]]
        if idx.size == 0:
            continue
        xc = x[idx].astype(np.float32)
        ptp[idx] = np.ptp(xc, axis=-1)
        y = _remove_baseline(xc, cfg.highpass_hz, fs)
        combined = _detection_signal(y, cfg, fs)
        for k, i in enumerate(idx):
            med, hr[i], n_beats[i], noise[i], errors[i] = _one_median_beat(y[k], ptp[i], combined[k], cfg, fs)
            if med is not None:
                median[i] = med
    # Leads that cannot be measured: flat (lead off) or too noisy on the median beat.
    flat = ptp < cfg.flat_peak_to_peak_uv
    with np.errstate(invalid="ignore"):
        noisy = noise > cfg.max_lead_noise_uv
    unusable = flat | noisy
    for i in np.flatnonzero(finite):
        if errors[i] is not None or not unusable[i].any():
            continue
        median[i, unusable[i]] = np.nan
        if unusable[i].all():
            errors[i] = (
                "no lead measurable (flat signal)"
                if flat[i].all()
                else f"too noisy: every lead is flat or has median-beat noise > {cfg.max_lead_noise_uv:g} uV"
            )
        else:
            bad = [f"{LEADS[j]} ({'flat' if flat[i, j] else 'noisy'})" for j in np.flatnonzero(unusable[i])]
            errors[i] = f"lead(s) not measurable: {', '.join(bad)}"
    onset, offset = _qrs_bounds(median, pre, cfg, fs) if n else (np.zeros(0, int), np.zeros(0, int))
    for i in np.flatnonzero((onset < 0) & np.isfinite(median).any(axis=(1, 2))):
        errors[i] = "QRS onset/offset not found"
        median[i] = np.nan
    ok = onset >= 0
    t = np.arange(L)
    b0 = np.clip(onset - _samples(cfg.pr_baseline_s[0], fs), 0, L - 1)
    b1 = np.clip(onset - _samples(cfg.pr_baseline_s[1], fs), 1, L)
    in_pr = (t >= b0[:, None]) & (t < b1[:, None])
    baseline = np.where(in_pr[:, None, :], median, 0.0).sum(-1) / np.maximum(in_pr.sum(-1), 1)[:, None]
    in_qrs = ((t >= onset[:, None]) & (t <= offset[:, None]))[:, None, :]
    rel = median - baseline[..., None]
    with np.errstate(invalid="ignore"):
        r = np.where(in_qrs, rel, -np.inf).max(axis=-1) if n else np.zeros((0, N_LEADS))
        s = np.where(in_qrs, -rel, -np.inf).max(axis=-1) if n else np.zeros((0, N_LEADS))
    r = np.where(ok[:, None] & np.isfinite(r), np.maximum(r, 0.0), np.nan)
    s = np.where(ok[:, None] & np.isfinite(s), np.maximum(s, 0.0), np.nan)
    qrs_ms = np.where(ok, (offset - onset) * 1000.0 / fs, np.nan)
    hr = np.where(ok, hr, np.nan)
    return MedianBeats(
        median=median,
        fiducial=pre,
        onset=onset,
        offset=offset,
        baseline_uv=np.where(ok[:, None], baseline, np.nan),
        r_uv=r,
        s_uv=s,
        qrs_ms=qrs_ms,
        hr_bpm=hr,
        n_beats=n_beats,
        lead_noise_uv=noise,
        error=errors,
    )


def measure_batch(ecg: np.ndarray, sex: Sequence[str | None], config: RulesConfig = RulesConfig()) -> pd.DataFrame:
    """Measure a batch of canonical ECGs and apply the voltage rules.

    ``ecg`` is [n, 12, 5000] (int16 or float) microvolts in the canonical lead order at 500 Hz;
    ``sex`` has n values ('M'/'F'; anything else is unknown). Returns one row per ECG with
    :data:`MEASURE_COLUMNS`: r_uv_<LEAD>, s_uv_<LEAD>, qrs_ms, hr_bpm, the rule values, the
    nullable-boolean rule flags and rules_error (None, or the reason measurements are NaN).
    An unmeasurable ECG never raises: it gets NaN measurements, <NA> flags and a reason.
    """
    arr = np.asarray(ecg)
    if arr.ndim != 3 or arr.shape[1:] != (N_LEADS, N_SAMPLES):
        raise ValueError(f"ecg must be [n, {N_LEADS}, {N_SAMPLES}], got shape {arr.shape}")
    sex_list = list(sex)
    if len(sex_list) != arr.shape[0]:
        raise ValueError(f"sex has {len(sex_list)} values for {arr.shape[0]} ECGs")
    m = measure_median_beats(arr, config)
    sexes = np.array([normalise_sex(v) for v in sex_list], dtype=object)
    data: dict[str, Any] = {}
    for j, lead in enumerate(LEADS):
        data[measured_column("r", lead)] = m.r_uv[:, j]
    for j, lead in enumerate(LEADS):
        data[measured_column("s", lead)] = m.s_uv[:, j]
    data["qrs_ms"] = m.qrs_ms
    data["hr_bpm"] = m.hr_bpm
    out = pd.DataFrame(data)
    rules = _rules(m.r_uv, m.s_uv, m.qrs_ms, sexes, config, index=out.index)
    out = pd.concat([out, rules], axis=1)
    out["rules_error"] = pd.Series(m.error, index=out.index, dtype=object)
    return out[list(MEASURE_COLUMNS)]
