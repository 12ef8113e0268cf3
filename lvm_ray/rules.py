"""Classic ECG LVH voltage rules, measured on the median beat of each lead.

Pure code (NumPy, SciPy, pandas): no Ray, no I/O, no logging of waveforms. The batch scoring
stage and ``lvm-ray rules`` call :func:`measure_batch` once per batch.

Measurement (per ECG, canonical int16/float microvolts [12, 5000] at 500 Hz). Every step runs on
a chunk of ECGs at once (``chunk_size``): filters are matrix products (the per-sample steps ECG
by ECG, in the CPU cache); ECGs are then sorted by their number of beats and the beats of each
chunk of similar ECGs are gathered into one beat-major array padded to the longest beat train
(little padding), and medians over beats are sorting networks of elementwise
minima and maxima over whole beats; only the detector's last, sequential step loops in Python
(and only for beat trains with peaks closer than 300 ms). The values, reasons and flags are those
of the per-ECG implementation it replaced (``jobs/rules_reference.py``; tests/test_rules.py
checks them).

1. Baseline wander removed from every lead by a zero-phase 0.5 Hz high-pass (the sub-hertz
   baseline is estimated on 20 ms block means, which makes it cheap).
2. QRS detection **once per ECG** on a combined signal: the root-sum-square over the 12 leads of
   a QRS band-pass (difference of 10 ms and 80 ms moving averages, roughly 6-40 Hz), each lead
   weighted by the inverse of its own noise so that one noisy lead cannot swamp it. neurokit2's
   gradient detector (``nk.ecg_findpeaks(method="neurokit")``), re-implemented over the batch
   with the same peaks (tested), finds the complexes; each fiducial is then the maximum of the
   combined signal nearby. The same fiducials serve all 12 leads.
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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view
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
    #: ECGs filtered together, and whose beats are measured together (bounds the memory of a large batch).
    chunk_size: int = 16
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


def _rule_arrays(
    r: np.ndarray, s: np.ndarray, qrs_ms: np.ndarray, sex: np.ndarray, config: RulesConfig
) -> tuple[dict[str, np.ndarray], dict[str, pd.arrays.BooleanArray]]:
    """Rule values (float64) and flags from amplitude matrices r, s [n, 12] (uV), qrs_ms [n], sex [n]."""
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
    return {k: np.asarray(v, dtype=np.float64) for k, v in values.items()}, flags


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
    values, flags = _rule_arrays(r, s, qrs_ms, sex, config)
    out = {prefix + k: pd.Series(v, index=index) for k, v in values.items()}
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
def _lowpass_matrix(cutoff_hz: float, fs: float, n: int) -> np.ndarray:
    """[n, n] float32 M with x @ M = sosfiltfilt(2nd-order Butterworth low-pass, x) for any x [..., n].

    The zero-phase filter (odd extension, initial conditions) is linear in x, so it is a matrix:
    a matrix product is several times faster than the recursive filter over many short rows.
    """
    sos = butter(2, cutoff_hz, btype="lowpass", fs=fs, output="sos")
    return sosfiltfilt(sos, np.eye(n), axis=-1, padlen=min(n - 1, 100)).astype(np.float32)


def _samples(seconds: float, fs: float) -> int:
    return int(round(seconds * fs))


def _remove_baseline(x: np.ndarray, cutoff_hz: float, fs: float) -> np.ndarray:
    """Zero-phase high-pass at ``cutoff_hz`` along the last axis of float32 ``x``, in place.

    The baseline (a zero-phase Butterworth low-pass at ``cutoff_hz``) is estimated on 20 ms block
    means (50 Hz), then linearly interpolated between block centres and subtracted: the same
    result as a full-rate filter for a sub-hertz cut-off, at a twentieth of the cost. Block means
    are a matrix product and the interpolation is done block-wise (no gathers): both run at
    memory speed.
    """
    return _subtract_baseline(x, _baseline(x, cutoff_hz, fs), fs)


def _baseline(x: np.ndarray, cutoff_hz: float, fs: float) -> np.ndarray:
    """The baseline of :func:`_remove_baseline` at the 20 ms block centres, [..., blocks]."""
    block = max(_samples(0.02, fs), 1)
    n_blocks = x.shape[-1] // block
    means = x[..., : n_blocks * block].reshape(*x.shape[:-1], n_blocks, block) @ np.full(block, 1.0 / block, x.dtype)
    # One 2-D product (a stacked one runs a small BLAS call per ECG).
    matrix = _lowpass_matrix(cutoff_hz, fs / block, n_blocks).astype(x.dtype, copy=False)
    return (means.reshape(-1, n_blocks) @ matrix).reshape(means.shape)


@lru_cache(maxsize=16)
def _interpolation_weights(block: int) -> np.ndarray:
    d = (np.arange(block) + 0.5) / block - 0.5
    return np.stack([np.maximum(-d, 0), 1 - np.abs(d), np.maximum(d, 0)]).astype(np.float32)


def _subtract_baseline(x: np.ndarray, low: np.ndarray, fs: float) -> np.ndarray:
    """x minus the baseline ``low`` of :func:`_baseline` interpolated to every sample, in place."""
    block = max(_samples(0.02, fs), 1)
    n_blocks = low.shape[-1]
    blocks = x[..., : n_blocks * block].reshape(*x.shape[:-1], n_blocks, block)  # a view: one axis split
    # Sample o of block b lies d_o = (o + 0.5) / block - 0.5 blocks from the block's centre: the
    # baseline there is the linear interpolation towards the neighbouring centre (flat beyond the
    # first and last centres), i.e. [low[b-1], low[b], low[b+1]] @ weights[:, o] (a matmul).
    weights = _interpolation_weights(block).astype(x.dtype, copy=False)  # [3, block]
    neighbours = np.empty((*low.shape, 3), dtype=x.dtype)  # [..., n_blocks, 3]
    neighbours[..., 1] = low
    neighbours[..., 1:, 0], neighbours[..., 0, 0] = low[..., :-1], low[..., 0]
    neighbours[..., :-1, 2], neighbours[..., -1, 2] = low[..., 1:], low[..., -1]
    blocks -= neighbours @ weights
    x[..., n_blocks * block :] -= low[..., -1:]
    return x


#: Block length of the polyphase FIR (samples): 32 keeps the matrices small and BLAS efficient.
_FIR_BLOCK = 16


@lru_cache(maxsize=16)
def _band_fir(h_fast: int, h_slow: int) -> np.ndarray:
    """The QRS band-pass as polyphase matrices A [blocks, T, T] (float32), T = _FIR_BLOCK.

    The kernel is a centred moving average over 2 h_fast + 1 samples minus one over
    2 h_slow + 1; out[T j + i] = sum_b (x[T (j + b) : T (j + b + 1)] @ A[b])[i] for x padded by
    h_slow on the left.
    """
    T, K = _FIR_BLOCK, 2 * h_slow + 1
    kernel = np.full(K, -1.0 / K)
    kernel[h_slow - h_fast : h_slow + h_fast + 1] += 1.0 / (2 * h_fast + 1)
    A = np.zeros((-(-(T + K - 1) // T), T, T))
    i, k = np.meshgrid(np.arange(T), np.arange(K), indexing="ij")
    A[(i + k) // T, (i + k) % T, i] = kernel[k]
    return A.astype(np.float32)


def _band(y: np.ndarray, h_fast: int, h_slow: int) -> np.ndarray:
    """The band-pass of :func:`_band_fir` along the last axis of float32 y (edges padded with the end values).

    As block matrix products (BLAS): several times faster than moving sums built from shifted
    additions or cumulative sums, which NumPy runs one sample at a time.
    """
    A = _band_fir(h_fast, h_slow)
    T, n = _FIR_BLOCK, y.shape[-1]
    n_out = -(-n // T)
    padded = np.empty((*y.shape[:-1], (n_out + A.shape[0] - 1) * T), dtype=np.float32)
    padded[..., :h_slow] = y[..., :1]
    padded[..., h_slow : h_slow + n] = y
    padded[..., h_slow + n :] = y[..., -1:]
    # One 2-D product per matrix over all blocks of all rows (each row's last blocks are spare).
    blocks = padded.reshape(-1, T)
    shape = (-1, n_out + A.shape[0] - 1, T)
    out = (blocks @ A[0]).reshape(shape)[:, :n_out]
    for b in range(1, A.shape[0]):
        out += (blocks @ A[b]).reshape(shape)[:, b : b + n_out]
    return out.reshape(*y.shape[:-1], -1)[..., :n]


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


@lru_cache(maxsize=256)
def _median_network(n: int, ranks: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """Compare-exchange pairs (i < j) that put the values of sorted positions ``ranks`` of n inputs in place.

    Batcher's odd-even merge sort over the next power of two, without the comparators that touch
    a padding input (it holds +inf and never moves), pruned to the ones ``ranks`` depend on.
    """
    size = 1 << max(n - 1, 0).bit_length()
    pairs: list[tuple[int, int]] = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * p) == b // (2 * p) and b < n:
                        pairs.append((a, b))
            k //= 2
        p *= 2
    live, kept = set(ranks), []
    for a, b in reversed(pairs):
        if a in live or b in live:
            kept.append((a, b))
            live.update((a, b))
    return tuple(reversed(kept))


def _median_over_beats(slots: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Median over the beats of slots [B + 1, m, ...]: B beats (invalid ones +inf) and one scratch slot.

    ``counts`` [m] is the number of valid beats of each ECG; the median is np.median's value (the
    middle one, or the mean of the middle two). The beats are the wires of a sorting network
    that only sorts the middle ranks: each compare-exchange is one np.minimum and one np.maximum
    over whole beats, which NumPy runs at SIMD speed (several times faster than sorting each
    sample's beats). Afterwards the slots hold, at every sample, the same values as before in
    another order, and +inf in one slot. Returns the median [m, ...].
    """
    B = slots.shape[0] - 1
    count = np.maximum(counts, 1)
    lo, hi = (count - 1) // 2, count // 2
    wire, spare = list(range(B)), B  # wire -> slot holding it
    for a, b in _median_network(B, tuple(sorted(set(lo.tolist()) | set(hi.tolist())))):
        np.minimum(slots[wire[a]], slots[wire[b]], out=slots[spare])
        np.maximum(slots[wire[a]], slots[wire[b]], out=slots[wire[b]])
        wire[a], spare = spare, wire[a]
    out = np.empty(slots.shape[1:], dtype=slots.dtype)
    half = slots.dtype.type(0.5)
    for low, high in {(int(a), int(b)) for a, b in zip(lo, hi, strict=True)}:
        rows = np.flatnonzero((lo == low) & (hi == high))
        out[rows] = (slots[wire[low], rows] + slots[wire[high], rows]) * half
    slots[spare] = np.inf
    return out


def _median_last(values: np.ndarray) -> np.ndarray:
    """np.median over the last axis (the same values), the fastest way NumPy offers for the length.

    Short rows are padded with +inf to 16 or 32 and sorted (NumPy's SIMD sort handles those
    lengths fastest); long rows are partitioned at one index (SIMD quickselect; a partition at
    the two middle indices, as np.median does, is several times slower), the lower middle being
    the largest value left of it.
    """
    n = values.shape[-1]
    if n > 32:
        k = n // 2
        part = np.partition(values, k, axis=-1)
        upper = part[..., k]
        lower = part[..., :k].max(axis=-1) if n % 2 == 0 else upper
        return (lower + upper) * part.dtype.type(0.5)
    width = 16 if n <= 16 else 32
    s = np.empty((*values.shape[:-1], width), dtype=values.dtype)
    s[..., :n] = values
    s[..., n:] = np.inf
    s.sort(axis=-1)
    return (s[..., (n - 1) // 2] + s[..., n // 2]) * s.dtype.type(0.5)


def _median_smallest(values: np.ndarray, n: int) -> np.ndarray:
    """np.median over the n smallest values of each row (last axis), e.g. the finite ones where the rest are +inf.

    ``values`` (non-negative floats, +inf or NaN) is partitioned in place (pass a scratch array):
    one partition at the upper middle; the lower middle is the largest value left of it. The
    partition runs on the values' bit patterns as signed integers, which order non-negative
    floats as the floats themselves: NumPy partitions integers 2-4x faster than floats.
    """
    k = n // 2
    values.view(np.int32 if values.itemsize == 4 else np.int64).partition(k, axis=-1)
    upper = values[..., k]
    lower = values[..., :k].max(axis=-1) if n % 2 == 0 else upper
    return (lower + upper) * values.dtype.type(0.5)


def _lead_noise(median_residual: np.ndarray, count: int) -> np.ndarray:
    """A lead's median-beat noise (uV) from the median |beat - median beat| over ``count`` beats:
    robust SD (1.4826 x median) of the mean of ``count`` beats (x 1.2533 / sqrt(count), the
    median's efficiency)."""
    return 1.4826 * median_residual * 1.2533 / np.sqrt(count)


@lru_cache(maxsize=256)
def _noise_threshold(count: int, limit: float) -> np.float32:
    """The smallest float32 median residual whose :func:`_lead_noise` exceeds ``limit`` (finite)."""
    value = np.float32(limit * np.sqrt(count) / (1.4826 * 1.2533))
    noisy = lambda v: bool(_lead_noise(np.array([v], dtype=np.float32), count)[0] > limit)  # noqa: E731
    while noisy(value):
        value = np.nextafter(value, np.float32(-np.inf))
    while not noisy(value):
        value = np.nextafter(value, np.float32(np.inf))
    return value


def _median_exceeds(values: np.ndarray, n: int, threshold: np.float32, count: int, limit: float) -> np.ndarray:
    """Whether :func:`_lead_noise` of the median of the n smallest values of each row exceeds ``limit``.

    The same answer as computing the median (:func:`_median_smallest`), from how many values lie
    below ``threshold`` (:func:`_noise_threshold`), a single pass: the median reaches the
    threshold unless at least half of them do. Only where exactly half do is the median (of the
    largest value below and the smallest above) computed.
    """
    k = n // 2
    below = np.count_nonzero(values < threshold, axis=-1)
    if n % 2:
        return below <= k
    out = below < k
    tie = below == k
    if tie.any():
        rows = values[tie]
        lower = np.where(rows < threshold, rows, -np.inf).max(axis=-1)
        upper = np.where(rows < threshold, np.inf, rows).min(axis=-1)
        out[tie] = _lead_noise((lower + upper) * values.dtype.type(0.5), count) > limit
    return out


def _noisy_leads(
    slots: np.ndarray, median: np.ndarray, n_good: np.ndarray, counts: list[int], limit: float
) -> np.ndarray:
    """Whether each lead's :func:`_lead_noise` exceeds ``limit`` [m, 12], without its value.

    ``slots`` [B + 1, m, 12, t] are the beats (+inf where not used), ``median`` [m, 12, t] the
    median beats, ``counts`` the numbers of good beats to decide for. The answer of
    :func:`_median_exceeds` for each ECG, from one pass over all of them.
    """
    m = median.shape[0]
    thresholds = np.zeros(m, dtype=np.float32)
    for count in counts:
        thresholds[n_good == count] = _noise_threshold(count, limit)
    with np.errstate(invalid="ignore"):
        resid = np.subtract(slots, median)
        resid = np.abs(resid, out=resid)
        is_below = np.less(resid, thresholds[None, :, None, None]).view(np.uint8)
    # Counted over beats in uint8 (when they fit), then over samples: faster than np.count_nonzero.
    per_sample = np.add.reduce(is_below, axis=0, dtype=np.uint8 if slots.shape[0] < 256 else np.int64)
    below = per_sample.sum(axis=-1, dtype=np.int64)  # [m, 12]
    n = n_good[:, None] * median.shape[-1]
    k = n // 2
    noisy = np.where(n % 2 == 1, below <= k, below < k)
    decided = (n_good[:, None] == np.array(counts, dtype=n_good.dtype)).any(axis=1, keepdims=True)  # np.isin: slow
    for i, lead in zip(*np.nonzero((below == k) & (n % 2 == 0) & decided), strict=True):
        values = resid[:, i, lead].reshape(1, -1)
        noisy[i, lead] = _median_exceeds(values, int(n[i, 0]), thresholds[i], int(n_good[i]), limit)[0]
    return noisy & decided


def _detection_signal(y: np.ndarray, cfg: MeasurementConfig, fs: float) -> np.ndarray:
    """[n, 12, N] baseline-free leads -> [n, N] noise-weighted root-sum-square of the QRS band.

    The band-pass is a difference of two centred moving averages (``detect_smooth_s`` and
    ``detect_background_s``, about 8-45 Hz; edges padded with the end values); each lead is
    weighted by the inverse of its noise (robust SD of its second difference, floored at
    ``detect_noise_floor_uv``).
    """
    h_fast = max(_samples(cfg.detect_smooth_s, fs) // 2, 1)
    h_slow = max(_samples(cfg.detect_background_s, fs) // 2, h_fast + 1)
    band = _band(y, h_fast, h_slow)
    # Second difference of every second sample (np.diff's values) in two scratch arrays: from a
    # contiguous copy, and not in place (NumPy would copy the overlapping input): 2.5x faster.
    y2 = np.ascontiguousarray(y[..., ::2])
    d1 = np.subtract(y2[..., 1:], y2[..., :-1])
    d2 = np.subtract(d1[..., 1:], d1[..., :-1], out=y2[..., :-2])
    noise = 1.4826 * _median_smallest(np.abs(d2, out=d2), d2.shape[-1])
    weight = 1.0 / np.maximum(noise, cfg.detect_noise_floor_uv)
    weight = (weight / weight.sum(axis=1, keepdims=True)).astype(np.float32)
    band *= band
    return np.sqrt((weight[:, None, :] @ band)[:, 0])


# neurokit2's gradient detector (``nk.ecg_findpeaks(method="neurokit")``, v0.2-0.3) with its defaults.
_NK_SMOOTH_S, _NK_AVG_S, _NK_GRAD_WEIGHT, _NK_MIN_LEN_WEIGHT, _NK_MIN_DELAY_S = 0.1, 0.75, 1.5, 0.4, 0.3


def _find_fiducials(combined: np.ndarray, fs: float) -> list[np.ndarray]:
    """R fiducials (sample indices) of each row of combined [n, N]: neurokit2's detector, batched.

    The same peaks as ``nk.ecg_findpeaks(row, method="neurokit")`` for every row (a test checks
    it): QRS intervals where the 100 ms smoothed absolute gradient exceeds 1.5 x its 750 ms
    average; intervals shorter than 0.4 x their mean length dropped; in each, the most
    prominent local maximum (prominence within the interval); peaks at most 300 ms after the
    previous one (or the recording's start) dropped. Each fiducial is then the maximum of the
    combined signal within +-40 ms. Only the last, sequential step loops in Python.
    """
    from scipy.ndimage import uniform_filter1d
    from scipy.signal import find_peaks, peak_prominences

    n, N = combined.shape
    grad = np.abs(np.gradient(combined, axis=-1))
    smooth = uniform_filter1d(grad, int(np.rint(_NK_SMOOTH_S * fs)), axis=-1, mode="nearest")
    average = uniform_filter1d(smooth, int(np.rint(_NK_AVG_S * fs)), axis=-1, mode="nearest")
    qrs = smooth > _NK_GRAD_WEIGHT * average
    change_row, change = np.nonzero(qrs[:, :-1] != qrs[:, 1:])
    starts_qrs = qrs[change_row, change + 1]
    beg_row, beg, end_row, end = (
        change_row[starts_qrs],
        change[starts_qrs],
        change_row[~starts_qrs],
        change[~starts_qrs],
    )
    first_beg = np.full(n, N, dtype=np.int64)
    has_beg = np.ones(beg_row.size, dtype=bool)
    has_beg[1:] = beg_row[1:] != beg_row[:-1]
    first_beg[beg_row[has_beg]] = beg[has_beg]
    after_first = end > first_beg[end_row]  # neurokit drops ends before the first start
    end_row, end = end_row[after_first], end[after_first]
    # Starts and ends alternate, so the k-th start of a row pairs with its k-th end; a last
    # start without an end is dropped.
    n_end = np.bincount(end_row, minlength=n)
    row_start = np.searchsorted(beg_row, np.arange(n))
    paired = (np.arange(beg.size) - row_start[beg_row]) < n_end[beg_row]
    beg_row, beg = beg_row[paired], beg[paired]
    length = end - beg
    mean_length = np.bincount(end_row, weights=length, minlength=n) / np.maximum(n_end, 1)
    long_enough = length >= _NK_MIN_LEN_WEIGHT * mean_length[end_row]
    row, beg, end = end_row[long_enough], beg[long_enough], end[long_enough]
    # Local maxima and their prominences inside each interval, for all intervals at once: on the
    # intervals' samples laid end to end with +inf between them (and at both ends), so peak
    # search and prominence bases stop exactly at the interval's edges. The intervals hold a
    # fraction of the samples: several times less work than the whole signal.
    length = end - beg
    starts = np.cumsum(length + 1) - length  # where each interval starts in the flat signal
    flat = np.full(int(starts[-1] + length[-1] + 1) if length.size else 1, np.inf, dtype=np.float64)
    earlier = np.cumsum(length) - length  # samples of the earlier intervals
    sample = np.arange(int(length.sum()))
    flat[sample + np.repeat(starts - earlier, length)] = combined.reshape(-1)[
        sample + np.repeat(row * N + beg - earlier, length)
    ]
    locmax, _ = find_peaks(flat)
    interval = np.searchsorted(starts, locmax, side="right") - 1
    inside = (interval >= 0) & (locmax < (starts + length)[np.maximum(interval, 0)])  # not a separator
    locmax, interval = locmax[inside], interval[inside]
    prominence = peak_prominences(flat, locmax)[0] if locmax.size else np.zeros(0)
    # The most prominent peak per interval (the first of equals, as np.argmax).
    order = np.lexsort((np.arange(locmax.size), -prominence, interval))
    ranked = interval[order]  # sorted: each interval's first entry is its best peak
    first = np.flatnonzero(np.concatenate([ranked[:1] >= 0, ranked[1:] != ranked[:-1]]))
    best = locmax[order[first]]
    best_interval = interval[order[first]]
    best_row, best_col = row[best_interval], beg[best_interval] + best - starts[best_interval]
    min_delay = int(np.rint(fs * _NK_MIN_DELAY_S))
    # In a row whose peaks are all more than min_delay apart every peak is kept but a first one
    # within min_delay of the start; only other rows need the sequential rule.
    first = np.ones(best.size, dtype=bool)
    first[1:] = best_row[1:] != best_row[:-1]
    close = ~first & (np.diff(best_col, prepend=0) <= min_delay)
    accepted = ~first | (best_col > min_delay)
    for r in np.unique(best_row[close]).tolist() if close.any() else []:
        k0, k1 = np.searchsorted(best_row, [r, r + 1])
        last = 0
        for k, col in enumerate(best_col[k0:k1].tolist(), start=k0):
            accepted[k] = col - last > min_delay
            if accepted[k]:
                last = col
    best_row, best_col = best_row[accepted], best_col[accepted]
    # Refine: the maximum of the combined signal within +-40 ms. Kept peaks are more than
    # min_delay (300 ms) apart, so the refined ones stay sorted and distinct (nk's np.unique).
    half = _samples(0.04, fs)
    lo = np.clip(best_col - half, 0, N - 1)
    idx = np.clip(lo[:, None] + np.arange(2 * half + 1), 0, N - 1)
    refined = idx[np.arange(idx.shape[0]), np.argmax(combined[best_row[:, None], idx], axis=1)]
    bounds = np.searchsorted(best_row, np.arange(n + 1)).tolist()
    return [refined[bounds[i] : bounds[i + 1]] for i in range(n)]


def _find_fiducials_safe(combined: np.ndarray, fs: float) -> list[np.ndarray | str]:
    """:func:`_find_fiducials`, or per ECG the reason it failed: the detector must never crash a batch."""
    try:
        return list(_find_fiducials(combined, fs))
    except Exception:  # noqa: BLE001 - find the ECG(s) that break it
        out: list[np.ndarray | str] = []
        for row in combined:
            try:
                out.append(_find_fiducials(row[None], fs)[0])
            except Exception as exc:  # noqa: BLE001
                out.append(f"no beats detected (QRS detector failed: {type(exc).__name__})")
        return out


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
    """Row-wise percentile (linear, as np.nanpercentile) of values [n, L] over mask [n, L]; 0 for empty rows."""
    count = mask.sum(axis=-1)
    s = np.sort(np.where(mask, values, np.inf), axis=-1)
    pos = q / 100.0 * np.maximum(count - 1, 0)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, np.maximum(count - 1, 0))
    a = np.take_along_axis(s, i0[:, None], axis=-1)[:, 0]
    b = np.take_along_axis(s, i1[:, None], axis=-1)[:, 0]
    t = pos - i0
    with np.errstate(invalid="ignore"):
        # NumPy's _lerp, for the same values to the last bit.
        out = np.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t)
    return np.where(count > 0, out, 0.0)


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


#: ECGs are filtered ``chunk_size`` at a time, and their beats sorted into chunks of similar beat
#: counts over groups of this many chunks (the filtered group is held in memory, 2.9 MB per 12 ECGs).
_GROUP_CHUNKS = 4


@dataclass
class _Chunk:
    """Median beats of the ECGs of one group (rows as in the group)."""

    median: np.ndarray  # [c, 12, L] float32, NaN where not measured
    hr: np.ndarray
    n_beats: np.ndarray
    noise: np.ndarray  # NaN where not measured, or not asked for
    noisy: np.ndarray  # [c, 12] bool: noise > max_lead_noise_uv
    error: list[str | None]


def _median_beats(
    y: np.ndarray, ptp: np.ndarray, combined: np.ndarray, cfg: MeasurementConfig, fs: float, lead_noise: bool = True
) -> _Chunk:
    """Median beats [c, 12, L] of a group of ECGs (y: [c, 12, N] high-passed, float32).

    Without ``lead_noise`` only whether each lead is too noisy is decided (exactly, without the
    median of the residuals); the noise values stay NaN.

    The QRS detector runs over the whole group; the ECGs with enough beats are then sorted by
    their number of beats and measured ``chunk_size`` at a time (:func:`_chunk_median_beats`),
    so that each chunk's beat arrays are padded little and its medians over beats need only
    the sorting network of few, similar beat counts.
    """
    c, _, N = y.shape
    pre, post = _samples(cfg.window_pre_s, fs), _samples(cfg.window_post_s, fs)
    shift = _samples(cfg.align_max_shift_s, fs)
    out = _Chunk(
        median=np.full((c, N_LEADS, pre + post), np.nan, dtype=np.float32),
        hr=np.full(c, np.nan),
        n_beats=np.zeros(c, dtype=int),
        noise=np.full((c, N_LEADS), np.nan),
        noisy=np.zeros((c, N_LEADS), dtype=bool),
        error=[None] * c,
    )
    flat = ptp.max(axis=1) < cfg.flat_peak_to_peak_uv
    for i in np.flatnonzero(flat):
        out.error[i] = "no beats detected (flat signal)"
    candidates = np.flatnonzero(~flat)
    peaks_of = _find_fiducials_safe(combined[candidates], fs) if candidates.size else []
    found = [(i, peaks) for i, peaks in zip(candidates.tolist(), peaks_of, strict=True) if not isinstance(peaks, str)]
    for i, reason in zip(candidates.tolist(), peaks_of, strict=True):
        if isinstance(reason, str):
            out.error[i] = reason
    # Heart rate (from the median RR) and the beats whose window fits, for all ECGs at once.
    ecg_of = np.array([i for i, _ in found], dtype=np.int64)
    sizes = np.array([p.size for _, p in found], dtype=np.int64)
    peaks = np.concatenate([p for _, p in found]) if found else np.zeros(0, dtype=np.int64)
    owner = np.repeat(np.arange(len(found)), sizes)
    same = owner[1:] == owner[:-1]
    rr_owner, rr = owner[1:][same], np.diff(peaks)[same]
    rr = rr[np.lexsort((rr, rr_owner))]  # sorted within each ECG
    n_rr = np.maximum(sizes - 1, 0)
    first_rr = np.cumsum(n_rr) - n_rr
    with_rr = n_rr > 0
    mid = np.stack([first_rr + (n_rr - 1) // 2, first_rr + n_rr // 2])[:, with_rr]
    out.hr[ecg_of[with_rr]] = 60.0 * fs / (0.5 * (rr[mid[0]] + rr[mid[1]]).astype(np.float64))
    fits = (peaks - pre - shift >= 0) & (peaks + post + shift <= N)
    n_fit = np.bincount(owner[fits], minlength=len(found))
    out.n_beats[ecg_of] = n_fit
    kept = np.split(peaks[fits], np.cumsum(n_fit)[:-1]) if found else []
    rows: list[int] = []
    keeps: list[np.ndarray] = []
    lo_hr, hi_hr = cfg.hr_range_bpm
    for k, i in enumerate(ecg_of.tolist()):
        if sizes[k] == 0:
            out.error[i] = "no beats detected"
        elif n_fit[k] < cfg.min_beats or n_fit[k] == 0:
            out.error[i] = f"fewer than {cfg.min_beats} beats ({n_fit[k]} detected)"
        elif not lo_hr <= out.hr[i] <= hi_hr:
            out.error[i] = f"implausible heart rate {out.hr[i]:.0f} bpm"
        else:
            rows.append(i)
            keeps.append(kept[k])
    order = sorted(range(len(rows)), key=lambda k: keeps[k].size)
    chunk = max(int(cfg.chunk_size), 1)
    for c0 in range(0, len(order), chunk):
        part = order[c0 : c0 + chunk]
        row_index = np.array([rows[k] for k in part])
        median, n_kept, n_good, noise, noisy = _chunk_median_beats(
            y, row_index, [keeps[k] for k in part], cfg, fs, lead_noise
        )
        out.n_beats[row_index] = n_good
        ok = n_good >= cfg.min_beats
        out.median[row_index[ok]], out.noise[row_index[ok]], out.noisy[row_index[ok]] = median[ok], noise[ok], noisy[ok]
        for k in np.flatnonzero(~ok).tolist():
            out.error[row_index[k]] = f"too noisy: only {n_good[k]} of {n_kept[k]} beats match the median beat"
    return out


def _chunk_median_beats(
    y: np.ndarray, row_index: np.ndarray, keeps: list[np.ndarray], cfg: MeasurementConfig, fs: float, lead_noise: bool
) -> tuple[np.ndarray, ...]:
    """Median beats [m, 12, L] of ECGs y[row_index] with beat fiducials ``keeps``, all at once.

    Beats of every ECG are gathered into one [beats, ECGs, 12, window] array padded to the
    longest beat train (a mask marks real beats), so alignment, screening and the medians over
    beats (:func:`_median_over_beats`) are single array operations over the chunk. Returns the
    median beats, the numbers of beats and of good beats [m], and the leads' noise and whether
    it is too high [m, 12].
    """
    pre, post = _samples(cfg.window_pre_s, fs), _samples(cfg.window_post_s, fs)
    shift = _samples(cfg.align_max_shift_s, fs)
    L = pre + post
    m, B = len(keeps), max(k.size for k in keeps)
    n_kept = np.array([k.size for k in keeps])
    valid = np.arange(B) < n_kept[:, None]  # [m, B]
    fid = np.repeat(np.array([k[0] for k in keeps])[:, None], B, axis=1)  # padding repeats a real beat
    fid[valid] = np.concatenate(keeps)
    q0, q1 = pre + _samples(cfg.qrs_region_s[0], fs), pre + _samples(cfg.qrs_region_s[1], fs)
    Q, S = q1 - q0, 2 * shift + 1
    # QRS windows with +-shift margin: win[e] is y at fiducial - pre - shift + q0 + e.
    # [m, B, 12, Q+2s]
    win = sliding_window_view(y, Q + 2 * shift, axis=-1)[row_index[:, None], :, fid - pre - shift + q0]
    win[~valid] = np.inf  # padding beats: out of the template (their scores are NaN, never used)
    # Beats are gathered beat-major ([beat, ECG, lead, sample], one spare slot) for the median network.
    slots = np.empty((B + 1, m, N_LEADS, Q), dtype=np.float32)
    slots[:B] = win[..., shift : shift + Q].transpose(1, 0, 2, 3)
    template = _median_over_beats(slots, n_kept)  # [m, 12, Q]
    # Cross-correlation with the template over the QRS for each shift, as one batched matrix
    # product: toeplitz[l, e, s] = template[l, e - s] (0 outside), a view of the zero-padded template.
    padded = np.zeros((m, N_LEADS, Q + 4 * shift), dtype=np.float32)
    padded[..., 2 * shift : 2 * shift + Q] = template
    toeplitz = sliding_window_view(padded, S, axis=-1)[..., ::-1]  # [m, 12, Q+2s, S]
    with np.errstate(invalid="ignore", over="ignore"):
        score = win.reshape(m, B, -1) @ toeplitz.reshape(m, -1, S)  # [m, B, S]
    start = fid - pre - shift + np.argmax(score, axis=-1)
    # Aligned beats [B + 1, m, 12, L] (the last slot, a repeat of the first beat, is scratch).
    start = np.concatenate([start, start[:, :1]], axis=1).T
    slots = sliding_window_view(y, L, axis=-1)[row_index[None, :], :, start]
    beats = slots[:B]
    # Beat consistency: median over leads of the QRS correlation with the template.
    qrs = beats[..., q0:q1]
    a = qrs - qrs.mean(axis=-1, keepdims=True)
    b = template - template.mean(axis=-1, keepdims=True)
    den = np.sqrt(np.einsum("bmlq,bmlq->bml", a, a) * np.einsum("mlq,mlq->ml", b, b))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where(den > 0, np.einsum("bmlq,mlq->bml", a, b) / den, 0.0)  # [B, m, 12]
    good = (_median_last(corr) >= cfg.min_beat_correlation) & valid.T  # [B, m]
    n_good = good.sum(axis=0)
    # Remove each beat's own offset (residual wander, electrode jumps) before the median.
    w0, w1 = pre + _samples(cfg.beat_baseline_s[0], fs), pre + _samples(cfg.beat_baseline_s[1], fs)
    beats -= _median_last(beats[..., w0:w1])[..., None]
    beats[~good] = np.inf
    median = _median_over_beats(slots, n_good)  # [m, 12, L]
    # Noise of each lead's median beat: robust SD of the good beats around it (every second
    # sample), over sqrt(beats). Which beat a value came from does not matter, so all slots serve
    # (+inf where a beat is not used: those residuals sort last), in groups of ECGs with the same
    # number of good beats.
    half_l = (L + 1) // 2
    noise = np.full((m, N_LEADS), np.nan)
    limit = cfg.max_lead_noise_uv
    fewest = max(cfg.min_beats, 1)
    counts = (np.flatnonzero(np.bincount(n_good)[fewest:]) + fewest).tolist()  # np.unique, faster
    if lead_noise or not np.isfinite(limit):
        resid = np.empty((m, N_LEADS, B + 1, half_l), dtype=np.float32)
        with np.errstate(invalid="ignore"):
            np.subtract(slots[..., ::2].transpose(1, 2, 0, 3), median[:, :, None, ::2], out=resid)
        resid = np.abs(resid, out=resid).reshape(m, N_LEADS, -1)
        for count in counts:
            sel = np.flatnonzero(n_good == count)
            noise[sel] = _lead_noise(_median_smallest(resid[sel], count * half_l), count)
        with np.errstate(invalid="ignore"):
            noisy = noise > limit
    else:
        noisy = _noisy_leads(slots[..., ::2], median[..., ::2], n_good, counts, limit)
    return median, n_kept, n_good, noise, noisy


def measure_median_beats(
    ecg: np.ndarray, config: RulesConfig = RulesConfig(), fs: float = SAMPLE_RATE_HZ, *, lead_noise: bool = True
) -> MedianBeats:
    """Median beats, QRS fiducials, heart rate and per-lead R/S of a batch [n, 12, N] (uV).

    Without ``lead_noise`` the leads' noise levels are not reported (NaN; which leads are too
    noisy is decided all the same): :func:`measure_batch` does not need them.
    """
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
    noisy = np.zeros((n, N_LEADS), dtype=bool)
    errors: list[str | None] = [None] * n
    if np.issubdtype(x.dtype, np.integer):
        finite = np.ones(n, dtype=bool)
    else:
        finite = np.isfinite(x).all(axis=(1, 2))
    for i in np.flatnonzero(~finite):
        errors[i] = "non-finite samples (NaN/inf)"
    ptp = np.zeros((n, N_LEADS), dtype=np.float32)
    chunk = max(int(cfg.chunk_size), 1)
    group = chunk * _GROUP_CHUNKS
    for g0 in range(0, n, group):
        idx = np.arange(g0, min(g0 + group, n))
        idx = idx[finite[idx]]
        if idx.size == 0:
            continue
        source = x[idx[0] : idx[-1] + 1] if idx[-1] - idx[0] + 1 == idx.size else x[idx]
        xc = np.empty(source.shape, dtype=np.float32)
        combined = np.empty((idx.size, x.shape[-1]), dtype=np.float32)
        for c0 in range(0, idx.size, chunk):
            part = slice(c0, c0 + chunk)
            xc[part] = source[part]
            # Peak-to-peak of int16 samples on the samples themselves: exact, and half the traffic.
            ranged = source[part] if np.issubdtype(source.dtype, np.integer) else xc[part]
            ptp[idx[part]] = ranged.max(axis=-1).astype(np.float32) - ranged.min(axis=-1).astype(np.float32)
            # The low-pass over the chunk (one matrix product), the per-sample steps ECG by ECG:
            # their arrays then stay in the CPU cache (about 1.1x faster than over the chunk at once).
            low = _baseline(xc[part], cfg.highpass_hz, fs)
            for k in range(c0, min(c0 + chunk, idx.size)):
                _subtract_baseline(xc[k : k + 1], low[k - c0 : k - c0 + 1], fs)
                combined[k] = _detection_signal(xc[k : k + 1], cfg, fs)[0]
        beats = _median_beats(xc, ptp[idx], combined, cfg, fs, lead_noise)
        median[idx] = beats.median
        hr[idx], n_beats[idx], noise[idx], noisy[idx] = beats.hr, beats.n_beats, beats.noise, beats.noisy
        for k, i in enumerate(idx):
            errors[i] = beats.error[k]
    # Leads that cannot be measured: flat (lead off) or too noisy on the median beat.
    flat = ptp < cfg.flat_peak_to_peak_uv
    unusable = flat | noisy
    for i in np.flatnonzero(finite & unusable.any(axis=1)):
        if errors[i] is not None:
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
    m = measure_median_beats(arr, config, lead_noise=False)
    sexes = np.array([normalise_sex(v) for v in sex_list], dtype=object)
    values, flags = _rule_arrays(m.r_uv, m.s_uv, m.qrs_ms, sexes, config)
    # Built as three blocks (floats, flags, reasons), in MEASURE_COLUMNS order: pandas builds a
    # frame column by column several times slower.
    floats = np.column_stack([m.r_uv, m.s_uv, m.qrs_ms, m.hr_bpm, *values.values()]).astype(np.float64, copy=False)
    float_columns = [*AMPLITUDE_COLUMNS, "qrs_ms", "hr_bpm", *values]
    out = pd.concat(
        [
            pd.DataFrame(floats.reshape(len(sexes), len(float_columns)), columns=float_columns),
            pd.DataFrame(flags),
            pd.DataFrame({"rules_error": np.array(m.error, dtype=object)}),
        ],
        axis=1,
    )
    return out
