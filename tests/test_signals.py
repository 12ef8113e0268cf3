"""Pure signal handling: lead names, resampling, derived leads, quality checks, LVH arithmetic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import wfdb
from scipy.signal import resample_poly

from lvm_ray.formats import read_ecg
from lvm_ray.lvh import LVHConfig, body_surface_area, lv_mass_index, lvh_from_lvmi
from lvm_ray.schema import LEADS, N_SAMPLES
from lvm_ray.signals import (
    ECGReadError,
    RawECG,
    amplitude_normalisation,
    canonical_waveform,
    check_quality,
    complete_leads,
    decimate,
    normalise_lead_name,
    resample_to_canonical,
)
from lvm_ray.synth import generate_batch


def _raw(fs: float = 500.0, seconds: float = 10.0, leads=LEADS, amplitude: float = 1000.0) -> RawECG:
    t = np.arange(int(round(fs * seconds))) / fs
    signals = {lead: amplitude * np.sin(2 * np.pi * (1.0 + 0.1 * i) * t) for i, lead in enumerate(leads)}
    return RawECG(signals_uv=signals, sample_rate_hz=fs, source_format="test", source_uri="mem")


@pytest.mark.parametrize(
    ("label", "expected"),
    [("AVR", "aVR"), ("aVR", "aVR"), ("V1 ", "V1"), ("MDC_ECG_LEAD_AVL", "aVL"), ("Lead II", "II"), ("i", "I")],
)
def test_lead_names(label, expected):
    assert normalise_lead_name(label) == expected


def test_unknown_lead_name_is_named():
    with pytest.raises(ECGReadError, match="unknown lead name 'V7'"):
        normalise_lead_name("V7")


def test_derived_leads_follow_einthoven_and_goldberger():
    rng = np.random.default_rng(0)
    lead_i, lead_ii = rng.normal(size=100), rng.normal(size=100)
    full = complete_leads({"I": lead_i, "II": lead_ii})
    np.testing.assert_allclose(full["I"] + full["III"], full["II"])
    np.testing.assert_allclose(full["aVR"] + full["aVL"] + full["aVF"], 0, atol=1e-12)
    np.testing.assert_allclose(full["aVL"], lead_i - lead_ii / 2)


@pytest.mark.parametrize("fs", [100.0, 250.0, 1000.0])
def test_resampling_preserves_a_slow_wave(fs):
    t = np.arange(int(fs * 10)) / fs
    wave = 1000 * np.sin(2 * np.pi * 1.3 * t)
    out = resample_to_canonical(wave, fs)
    assert out.shape == (N_SAMPLES,)
    t500 = np.arange(N_SAMPLES) / 500
    np.testing.assert_allclose(out[50:-50], 1000 * np.sin(2 * np.pi * 1.3 * t500[50:-50]), atol=5)


def test_decimation_removes_content_above_the_new_nyquist():
    fs = 1000.0
    t = np.arange(10_000) / fs
    out = resample_to_canonical(500 * np.sin(2 * np.pi * 400 * t), fs)  # 400 Hz aliases without a filter
    assert np.abs(out[100:-100]).max() < 25


@pytest.mark.parametrize("q", [2, 5, 10])
@pytest.mark.parametrize("n", [5000, 4999, 1003, 37])
def test_decimate_equals_scipy_resample_poly(q, n):
    # The blocked matrix products compute resample_poly's filter, alignment and zero edges.
    rng = np.random.default_rng(q * 10_000 + n)
    ecg = np.cumsum(rng.normal(0, 40, size=(3, 12, n)), axis=-1).clip(-32000, 32000).astype(np.int16)
    expected = resample_poly(ecg.astype(np.float32), 1, q, axis=-1)
    got = decimate(ecg, q)
    assert got.dtype == np.float32 and got.shape == expected.shape == (3, 12, -(-n // q))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.abs(ecg).max())
    np.testing.assert_allclose(decimate(ecg[1, 4], q), expected[1, 4], rtol=0, atol=1e-6 * np.abs(ecg).max())


def test_decimate_across_row_chunks():
    # More rows than one matrix product takes: every chunk, the last one short, lands in place.
    rng = np.random.default_rng(7)
    ecg = rng.integers(-3000, 3000, size=(70, 12, 300)).astype(np.int16)
    np.testing.assert_allclose(decimate(ecg, 5), resample_poly(ecg.astype(np.float32), 1, 5, axis=-1), atol=0.01)


def test_decimate_by_one_is_a_float_copy():
    ecg = np.arange(24, dtype=np.int16).reshape(2, 12)
    out = decimate(ecg, 1)
    assert out.dtype == np.float32 and np.array_equal(out, ecg) and not np.shares_memory(out, ecg)


def test_canonical_waveform_quantises_and_completes_8_leads():
    raw = _raw(leads=("I", "II", "V1", "V2", "V3", "V4", "V5", "V6"))
    wave, reason = canonical_waveform(raw)
    assert reason is None and wave.dtype == np.int16 and wave.shape == (12, N_SAMPLES)
    np.testing.assert_allclose(wave[0], raw.signals_uv["I"], atol=0.5)
    assert np.abs(wave[0].astype(int) + wave[2] - wave[1]).max() <= 1


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda r: r.signals_uv.pop("V3"), "missing lead(s) V3"),
        (lambda r: r.signals_uv["V2"].__setitem__(10, np.nan), "NaN"),
        (lambda r: r.signals_uv.__setitem__("V4", np.zeros(5000)), "flat lead(s) V4"),
        (lambda r: r.signals_uv.__setitem__("V5", r.signals_uv["V5"] * 40), "saturation"),
        (lambda r: r.signals_uv.__setitem__("V1", np.clip(r.signals_uv["V1"], -300, 300)), "clipped"),
        (lambda r: r.signals_uv.__setitem__("V6", r.signals_uv["V6"] * 12), "implausible amplitude"),
        (lambda r: [r.signals_uv.__setitem__(k, v[:2000]) for k, v in list(r.signals_uv.items())], "too short"),
        (lambda r: r.signals_uv.__setitem__("V1", r.signals_uv["V1"][:3000]), "different lengths"),
    ],
)
def test_quality_rejections_name_the_problem(mutate, reason):
    raw = _raw()
    mutate(raw)
    wave, got = canonical_waveform(raw)
    assert wave is None and reason in got


def test_longer_recordings_keep_the_first_ten_seconds():
    raw = _raw(seconds=11.0)
    wave, reason = canonical_waveform(raw)
    assert reason is None
    np.testing.assert_allclose(wave[3], raw.signals_uv["aVR"][:N_SAMPLES], atol=0.5)


def test_check_quality_accepts_clean_signal():
    assert check_quality(np.stack([_raw().signals_uv[lead] for lead in LEADS])) is None


def test_bsa_and_lvh():
    assert body_surface_area(180, 80) == pytest.approx(2.0)
    lvmi = lv_mass_index(np.array([150.0, 150.0, 100.0, np.nan]), np.array([2.0, 2.0, 2.0, 2.0]))
    np.testing.assert_allclose(lvmi[:3], [75, 75, 50])
    lvh = lvh_from_lvmi(np.append(lvmi, 72.0), np.array(["M", "F", "F", "M", "M"], dtype=object))
    assert lvh[:3].tolist() == [True, True, False] and lvh.isna()[3] and not bool(lvh[4])
    strict = lvh_from_lvmi(np.array([55.0]), np.array(["F"]), LVHConfig())
    assert not bool(strict[0])  # strict '>' at exactly the threshold
    with pytest.raises(ValueError, match="BSA formula"):
        LVHConfig(bsa_formula="dubois")


# ----------------------------------------------------------------------------- amplitude normalisation

PTBXL_FIXTURE = Path(__file__).parent / "fixtures" / "ptbxl"
FORMAT_SAMPLES = Path(__file__).parent / "fixtures" / "formats"


def _ptbxl_uv(record: Path) -> np.ndarray:
    """A PTB-XL record's leads as stored, [12, n] microvolts."""
    return wfdb.rdrecord(str(record)).p_signal.T * 1000.0


def _stored(raw: RawECG) -> np.ndarray:
    return np.stack([np.asarray(v, dtype=np.float64) for v in raw.signals_uv.values()])


def test_real_and_synthetic_recordings_are_not_flagged_as_normalised():
    records = sorted(PTBXL_FIXTURE.glob("records*/*/*.hea"))
    assert len(records) >= 4
    assert [amplitude_normalisation(_ptbxl_uv(r.with_suffix(""))) for r in records] == [None] * len(records)
    for path in [p for p in sorted(FORMAT_SAMPLES.rglob("*")) if p.suffix in (".xml", ".dcm", ".scp")]:
        try:
            raw = read_ecg(str(path))
        except ECGReadError:
            continue  # the deliberately unreadable samples
        if len({len(v) for v in raw.signals_uv.values()}) == 1:
            assert amplitude_normalisation(_stored(raw)) is None, path.name
    synthetic = generate_batch(64, seed=3).ecg
    assert [amplitude_normalisation(e) for e in synthetic] == [None] * len(synthetic)


def test_shared_ptbxl_records_are_never_flagged(shared_data):
    records = sorted((shared_data / "ptbxl" / "records500").glob("*/*.hea"))
    assert len(records) == 353
    flagged = {r.stem: f for r in records if (f := amplitude_normalisation(_ptbxl_uv(r.with_suffix(""))))}
    assert flagged == {}


def test_a_record_scaled_to_1_mv_per_lead_is_flagged():
    x = _ptbxl_uv(PTBXL_FIXTURE / "records500" / "00000" / "00001_hr")
    # Each lead spans exactly 1 mV, then quantised to 1 uV as a WFDB copy stores it.
    scaled = np.rint((x - x.min(axis=1, keepdims=True)) / np.ptp(x, axis=1, keepdims=True) * 1000.0 - 500.0)
    assert amplitude_normalisation(scaled) == "amplitude-normalised: all 12 leads span the same peak-to-peak (1000 uV)"
    # The same with only the 8 leads a MUSE export stores.
    assert "same peak-to-peak" in amplitude_normalisation(scaled[[0, 1, 6, 7, 8, 9, 10, 11]])
    assert amplitude_normalisation(x) is None


def test_a_z_scored_record_is_flagged():
    x = _ptbxl_uv(PTBXL_FIXTURE / "records500" / "00000" / "00002_hr")
    # z-scored per lead and stored in mV: SD 1 mV = 1000 uV, mean 0.
    z = (x - x.mean(axis=1, keepdims=True)) / x.std(axis=1, keepdims=True) * 1000.0
    reason = amplitude_normalisation(z)
    assert (
        reason == "amplitude-normalised: all 12 leads have the same standard deviation (1000 uV) and mean 0 (z-scored)"
    )
    # Unit variance without centring is still normalised; a single common gain is not.
    assert "same standard deviation (1000 uV)" in amplitude_normalisation(z + 300.0 * np.arange(12)[:, None])
    assert amplitude_normalisation(x * 2.5) is None
