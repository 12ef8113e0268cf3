"""The per-ECG median-beat measurement as it was before it was batched (lvm_ray/rules.py as of commit f190edb).

A frozen reference, not part of the package: ``jobs/benchmark.py rules`` measures it beside the
batched :func:`lvm_ray.rules.measure_batch` in the same run (the speed baseline), and
tests/test_rules.py checks that both give the same measurements and flags. Only the measurement
is copied; configuration, columns and the rules themselves come from lvm_ray.rules, so the two
differ only in how the median beats are measured.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
from scipy.signal import butter, sosfiltfilt

from lvm_ray.rules import MEASURE_COLUMNS, MeasurementConfig, MedianBeats, RulesConfig, _rules, measured_column
from lvm_ray.schema import LEADS, N_LEADS, N_SAMPLES, SAMPLE_RATE_HZ
from lvm_ray.signals import normalise_sex


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
