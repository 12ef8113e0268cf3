"""ECG format readers against real sample files: each decoded a second, independent way here."""

from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import wfdb

from lvm_ray.formats import SUPPORTED_SUFFIXES, detect_format, is_ecg_file, read_ecg
from lvm_ray.schema import LEADS, N_SAMPLES, cart_column
from lvm_ray.signals import ECGReadError, RawECG, canonical_waveform, normalise_lead_name

FIXTURES = Path(__file__).parent / "fixtures"
FMT = FIXTURES / "formats"
PTB = FIXTURES / "ptbxl"
MUSE_500 = FMT / "ge_muse" / "musephi_muse_ecg1.xml"
MUSE_240 = FMT / "ge_muse" / "ml4h_muse_ecg_deidentified_1.xml"
CARDIOSOFT = FMT / "ge_cardiosoft" / "ml4h_ukbb_scrubbed.xml"
AECG = FMT / "hl7_aecg" / "hl7_example_aECG.xml"
AECG_13 = FMT / "hl7_aecg" / "fda_minimum_aecg_13samples.xml"
AECG_PHILIPS = FMT / "hl7_aecg" / "philips_converted_ad4d3d80-d165_aecg.xml"
DICOM_500 = FMT / "dicom" / "ecgtoolkit_Example.dcm"
DICOM_1000 = FMT / "dicom" / "pydicom_waveform_ecg.dcm"
SCP = FMT / "scp_ecg" / "ecgtoolkit_Example.scp"
PTB_500 = [PTB / "records500" / "00000" / f"{i:05d}_hr" for i in (1, 2, 3)]
PTB_100 = PTB / "records100" / "00000" / "00001_lr"
TOL_500 = 0.5 + 1e-9  # int16 microvolt quantisation of a 500 Hz source
MUSE_MATRIX_ORDER = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")


def canonical(path: Path | str, **kwargs) -> np.ndarray:
    raw = read_ecg(str(path), **kwargs)
    wave, reason = canonical_waveform(raw)
    assert reason is None, reason
    assert wave.dtype == np.int16 and wave.shape == (12, N_SAMPLES)
    return wave


def assert_matches(wave: np.ndarray, source: dict[str, np.ndarray], tol: float = TOL_500) -> None:
    for lead, samples in source.items():
        diff = np.abs(wave[LEADS.index(lead)].astype(np.float64) - samples[:N_SAMPLES])
        assert diff.max() <= tol, f"lead {lead}: max |diff| {diff.max()} uV"


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.asarray(a, float), np.asarray(b, float))[0, 1])


# ----------------------------------------------------------------------------- independent decoders


def muse_rhythm_by_regex(path: Path) -> dict[str, np.ndarray]:
    """MUSE rhythm leads decoded with regular expressions only (not ElementTree)."""
    text = path.read_bytes().decode("latin-1")
    blocks = re.findall(r"<Waveform>(.*?)</Waveform>", text, re.DOTALL)
    rhythm = next(b for b in blocks if "<WaveformType>Rhythm</WaveformType>" in b)
    out = {}
    for lead_data in re.findall(r"<LeadData>(.*?)</LeadData>", rhythm, re.DOTALL):
        lead = re.search(r"<LeadID>(.*?)</LeadID>", lead_data).group(1)
        per_bit = float(re.search(r"<LeadAmplitudeUnitsPerBit>(.*?)<", lead_data).group(1))
        b64 = re.search(r"<WaveFormData>(.*?)</WaveFormData>", lead_data, re.DOTALL).group(1)
        out[lead] = np.frombuffer(base64.b64decode("".join(b64.split())), dtype="<i2") * per_bit
    return out


def aecg_rhythm_by_regex(path: Path) -> dict[str, np.ndarray]:
    """The first sequence per lead code (the RHYTHM series precedes the derived medians)."""
    text = path.read_text(encoding="utf-8")
    out: dict[str, np.ndarray] = {}
    for code, scale, digits in re.findall(
        r'code="MDC_ECG_LEAD_(\w+)".*?<scale value="([\d.]+)" unit="uV"/>.*?<digits>(.*?)</digits>', text, re.DOTALL
    ):
        lead = normalise_lead_name(code)
        out.setdefault(lead, np.array(digits.split(), dtype=float) * float(scale))
    return out


def cardiosoft_strip_by_regex(path: Path) -> dict[str, np.ndarray]:
    text = path.read_bytes().decode("latin-1")
    strip = re.search(r"<StripData>(.*?)</StripData>", text, re.DOTALL).group(1)
    resolution = float(re.search(r"<Resolution[^>]*>(.*?)<", strip).group(1))
    return {
        lead: np.array(data.replace(",", " ").split(), dtype=float) * resolution
        for lead, data in re.findall(r'<WaveformData lead="(\w+)">(.*?)</WaveformData>', strip, re.DOTALL)
    }


# ----------------------------------------------------------------------------- WFDB / PTB-XL


@pytest.mark.parametrize("record", PTB_500, ids=lambda p: p.name)
def test_ptbxl_500hz_matches_wfdb_physical_signal(record: Path) -> None:
    source = wfdb.rdrecord(str(record))
    expected = {normalise_lead_name(n): source.p_signal[:, i] * 1000.0 for i, n in enumerate(source.sig_name)}
    raw = read_ecg(str(record) + ".hea")
    assert raw.source_format == "wfdb" and raw.sample_rate_hz == 500.0 and raw.ecg_id == record.name
    assert set(raw.signals_uv) == set(LEADS)
    assert_matches(canonical(str(record) + ".hea"), expected)


def test_wfdb_record_path_with_or_without_suffix() -> None:
    record = str(PTB_500[0])
    waves = [canonical(p) for p in (record, record + ".hea", record + ".dat")]
    assert all(np.array_equal(waves[0], w) for w in waves[1:])
    # PTB-XL lead I of 00001_hr starts at -115 uV (header init value -115, 1000 units/mV)
    assert waves[0][0, 0] == -115


def test_ptbxl_100hz_is_resampled_to_10s_and_keeps_the_source_samples() -> None:
    source = wfdb.rdrecord(str(PTB_100)).p_signal.T * 1000.0
    raw = read_ecg(str(PTB_100))
    assert raw.sample_rate_hz == 100.0 and len(raw.signals_uv["I"]) == 1000
    wave = canonical(PTB_100)
    for i, lead in enumerate(LEADS):
        assert corr(wave[i, ::5], source[i]) > 0.99, lead
        assert np.abs(wave[i, ::5] - source[i]).max() <= 2.0, lead
    # The same recording as the 500 Hz file (PTB-XL filtered it before downsampling).
    wave_500 = canonical(PTB_500[0])
    assert min(corr(wave[i], wave_500[i]) for i in range(12)) > 0.9


def test_ptbxl_fixture_metadata_rows_match_the_records() -> None:
    import pandas as pd

    meta = pd.read_csv(PTB / "metadata.csv")
    assert list(meta["record_id"]) == [1, 2, 3]
    for path in meta["path_500hz"]:
        assert (PTB / f"{path}.hea").exists() and (PTB / f"{path}.dat").exists()
    assert (PTB / f"{meta['path_100hz'][0]}.dat").exists()


# ----------------------------------------------------------------------------- GE MUSE


def test_muse_500hz_stored_and_derived_leads() -> None:
    source = muse_rhythm_by_regex(MUSE_500)
    raw = read_ecg(str(MUSE_500))
    assert raw.source_format == "muse" and raw.sample_rate_hz == 500.0
    assert sorted(raw.signals_uv) == sorted(MUSE_MATRIX_ORDER)  # only what is stored: 8 leads
    wave = canonical(MUSE_500)
    assert_matches(wave, source)
    lead_i, lead_ii = source["I"], source["II"]
    derived = {
        "III": lead_ii - lead_i,
        "aVR": -(lead_i + lead_ii) / 2,
        "aVL": lead_i - lead_ii / 2,
        "aVF": lead_ii - lead_i / 2,
    }
    assert_matches(wave, derived, tol=1.0)
    assert raw.age == 60.0 and raw.sex == "M"
    assert raw.ecg_datetime is not None and raw.ecg_datetime.isoformat() == "2021-05-10T13:15:18"
    assert raw.patient_id and raw.height_cm is None and raw.weight_kg is None


def test_muse_cart_r_s_amplitudes_from_measurement_matrix() -> None:
    cart = read_ecg(str(MUSE_500)).cart_measurements
    assert len(cart) == 24
    # values of the 12SL matrix; each agrees with the median beat's R peak / S depth within 3 uV
    assert cart[cart_column("r", "V5")] == 1098.0
    assert cart[cart_column("r", "aVL")] == 112.0
    assert cart[cart_column("s", "V1")] == 786.0
    assert cart[cart_column("s", "V2")] == 1215.0
    assert cart[cart_column("s", "aVR")] == 805.0
    assert all(v >= 0 for k, v in cart.items() if k.startswith("cart_s_"))
    median = read_median_beat(MUSE_500)
    onset = 219  # RestingECGMeasurements/QOnset (samples of the 500 Hz median)
    for lead in ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6"):
        qrs = median[lead][onset:259] - median[lead][onset]
        assert abs(cart[cart_column("r", lead)] - qrs.max()) <= 3.0, lead


def read_median_beat(path: Path) -> dict[str, np.ndarray]:
    text = path.read_bytes().decode("latin-1")
    median = re.findall(r"<Waveform>(.*?)</Waveform>", text, re.DOTALL)[0]
    assert "<WaveformType>Median</WaveformType>" in median
    leads = re.findall(r"<LeadID>(.*?)</LeadID>", median)
    data = re.findall(r"<WaveFormData>(.*?)</WaveFormData>", median, re.DOTALL)
    return {
        lead: np.frombuffer(base64.b64decode("".join(d.split())), "<i2") * 4.88
        for lead, d in zip(leads, data, strict=True)
    }


def _muse_cart_timing(path: Path) -> dict[str, object]:
    """The cart's interval measurements (ms), fiducial sample indices and QRS times, read by regex."""
    text = path.read_bytes().decode("latin-1")
    section = re.search(r"<RestingECGMeasurements>(.*?)</RestingECGMeasurements>", text, re.DOTALL).group(1)
    value = {name: int(v) for name, v in re.findall(r"<(\w+)>(-?\d+)</\1>", section)}
    qrs_times = [int(t) for t in re.findall(r"<QRS>.*?<Time>(\d+)</Time>.*?</QRS>", text, re.DOTALL)]
    return {**value, "qrs_times": np.array(qrs_times)}


def _beats(wave: np.ndarray, fs: float) -> np.ndarray:
    """QRS complexes (sample indices) of a 12-lead waveform: peaks of the smoothed slope energy."""
    from scipy.ndimage import uniform_filter1d
    from scipy.signal import find_peaks

    energy = uniform_filter1d(np.abs(np.diff(wave.astype(np.float64), axis=1)).sum(axis=0), int(0.05 * fs))
    peaks, _ = find_peaks(energy, distance=int(0.3 * fs), height=0.35 * energy.max())
    return peaks


def test_muse_rate_is_the_waveforms_240hz_as_the_carts_own_measurements_show() -> None:
    raw = read_ecg(str(MUSE_240))
    # Waveform SampleBase 240, ECGSampleBase 250: the waveform's own rate wins; 2500 samples = 10.42 s
    assert raw.sample_rate_hz == 240.0
    assert {len(v) for v in raw.signals_uv.values()} == {2500}
    assert raw.cart_measurements == {}  # the scrubbed measurement matrix holds only -1 / 32767
    cart = _muse_cart_timing(MUSE_240)
    assert (cart["QRSDuration"], cart["PRInterval"], cart["QTInterval"], cart["VentricularRate"]) == (83, 167, 367, 102)
    # The cart's intervals are whole samples (onset/offset indices of its median beat) at 240 Hz, not at 250.
    for ms, start, stop in [
        ("QRSDuration", "QOnset", "QOffset"),
        ("PRInterval", "POnset", "QOnset"),
        ("QTInterval", "QOnset", "TOffset"),
    ]:
        n = cart[stop] - cart[start]
        assert round(n / 240 * 1000) == cart[ms], ms
        assert round(n / 250 * 1000) != cart[ms], ms
    # Its heart rate comes from the QRS times at 240 Hz: mean RR 140.75 samples = 102.3 bpm (106.6 at 250).
    qrs = cart["qrs_times"]
    assert len(qrs) == cart["QRSCount"] == 17
    assert abs(60 * 240 / np.diff(qrs).mean() - 102) < 1

    wave = canonical(MUSE_240)
    # The canonical 500 Hz ECG keeps that timing: its R-R spacing gives the cart's rate, and every
    # beat sits where the cart put it (at 250 Hz the last beat would be 0.4 s early).
    beats = _beats(wave, 500.0)
    assert len(beats) == 17
    assert abs(60 * 500 / np.diff(beats).mean() - cart["VentricularRate"]) < 1
    offset_s = beats / 500 - qrs / 240
    assert np.abs(offset_s).max() < 0.04 and np.ptp(offset_s) < 0.03
    # Sample for sample: every 12th source sample (1/20 s) is every 25th canonical one.
    source = muse_rhythm_by_regex(MUSE_240)
    for lead, samples in source.items():
        assert np.abs(wave[LEADS.index(lead), ::25] - samples[:2400:12]).max() <= 2.0, lead
    assert np.abs(wave[LEADS.index("III")] - (wave[1].astype(int) - wave[0])).max() <= 1


def test_muse_without_waveform_rate_uses_the_measurements_rate(tmp_path: Path) -> None:
    text = MUSE_240.read_bytes().decode("latin-1")
    rhythm_at = text.index("<WaveformType>Rhythm</WaveformType>")
    head, tail = text[:rhythm_at], text[rhythm_at:]
    tail = tail.replace("<SampleBase>240</SampleBase>", "", 1)
    (tmp_path / "no_rate.xml").write_bytes((head + tail).encode("latin-1"))
    assert read_ecg(str(tmp_path / "no_rate.xml")).sample_rate_hz == 250.0


# ----------------------------------------------------------------------------- GE CardioSoft


def test_cardiosoft_strip_data_and_measurement_table() -> None:
    raw = read_ecg(str(CARDIOSOFT))
    assert raw.source_format == "cardiosoft" and raw.sample_rate_hz == 500.0
    assert set(raw.signals_uv) == set(LEADS)
    assert_matches(canonical(CARDIOSOFT), cardiosoft_strip_by_regex(CARDIOSOFT))
    cart = raw.cart_measurements
    assert cart[cart_column("r", "V5")] == 844.0
    assert cart[cart_column("r", "aVL")] == 19.0
    assert cart[cart_column("s", "V1")] == 1303.0
    assert cart[cart_column("s", "V2")] == 1464.0
    # empty cells stay absent: lead II has no values, aVF and II no S wave
    for key in (cart_column("r", "II"), cart_column("s", "II"), cart_column("s", "aVF")):
        assert key not in cart
    assert len(cart) == 21
    # the scrubbed export writes 1 cm / 1.0 kg: implausible, so left unknown
    assert raw.height_cm is None and raw.weight_kg is None and raw.sex == "F"


# ----------------------------------------------------------------------------- HL7 aECG, DICOM, SCP


def test_hl7_aecg_rhythm_series() -> None:
    raw = read_ecg(str(AECG))
    assert raw.source_format == "hl7_aecg" and raw.sample_rate_hz == 500.0
    assert {len(v) for v in raw.signals_uv.values()} == {5000}  # not the 600-sample medians
    assert_matches(canonical(AECG), aecg_rhythm_by_regex(AECG))
    assert raw.sex == "M" and raw.age == 46.0 and raw.ecg_datetime.isoformat() == "2002-11-22T09:10:00"


def test_hl7_dicom_and_scp_of_one_recording_are_identical() -> None:
    from_aecg, from_dicom, from_scp = canonical(AECG), canonical(DICOM_500), canonical(SCP)
    assert np.array_equal(from_aecg, from_dicom)
    assert np.array_equal(from_aecg, from_scp)
    raw_scp = read_ecg(str(SCP))
    assert raw_scp.source_format == "scp" and raw_scp.sample_rate_hz == 500.0
    assert raw_scp.sex == "M" and raw_scp.ecg_datetime.isoformat() == "2002-11-22T09:10:00"
    raw_dicom = read_ecg(str(DICOM_500))
    assert raw_dicom.source_format == "dicom" and raw_dicom.sample_rate_hz == 500.0
    assert np.all(np.abs(raw_dicom.signals_uv["I"]) < 3000)  # the -81920 sentinel is only in the median


def test_dicom_1000hz_is_decimated_to_500hz() -> None:
    import pydicom
    from pydicom.waveforms.numpy_handler import multiplex_array

    ds = pydicom.dcmread(DICOM_1000)
    source = multiplex_array(ds, 0, as_raw=True).astype(float) * 1.25  # ChannelSensitivity 1.25 uV
    raw = read_ecg(str(DICOM_1000))
    assert raw.sample_rate_hz == 1000.0 and len(raw.signals_uv["I"]) == 10000
    assert raw.sex == "F" and raw.age == 42.0
    wave = canonical(DICOM_1000)
    for i, lead in enumerate(LEADS):
        assert np.array_equal(raw.signals_uv[lead], source[:, i])
        assert corr(wave[i], source[::2, i]) > 0.99, lead


def test_philips_aecg_11s_keeps_the_first_10s() -> None:
    raw = read_ecg(str(AECG_PHILIPS))
    assert {len(v) for v in raw.signals_uv.values()} == {5500}
    wave = canonical(AECG_PHILIPS)
    assert np.array_equal(wave[0], np.rint(raw.signals_uv["I"][:5000]))


# ----------------------------------------------------------------------------- broken inputs


def _copy_record(tmp_path: Path, name: str = "rec") -> Path:
    for suffix in (".hea", ".dat"):
        text = (PTB_500[0].parent / f"00001_hr{suffix}").read_bytes()
        if suffix == ".hea":
            text = text.replace(b"00001_hr", name.encode())
        (tmp_path / f"{name}{suffix}").write_bytes(text)
    return tmp_path / name


def test_truncated_dat_is_reported_with_sizes(tmp_path: Path) -> None:
    record = _copy_record(tmp_path)
    data = (tmp_path / "rec.dat").read_bytes()
    (tmp_path / "rec.dat").write_bytes(data[:1000])
    with pytest.raises(ECGReadError, match=r"signal file rec\.dat is truncated \(expected 120000 bytes, found 1000\)"):
        read_ecg(str(record) + ".hea")


def test_corrupt_header_line(tmp_path: Path) -> None:
    record = _copy_record(tmp_path)
    lines = (tmp_path / "rec.hea").read_text().splitlines()
    lines[3] = "rec.dat 16 xyz(0)/mV 16"  # lead III's gain field mangled (wfdb alone misreads it silently)
    (tmp_path / "rec.hea").write_text("\n".join(lines) + "\n")
    with pytest.raises(ECGReadError, match=r"corrupt WFDB header rec\.hea: signal line 3: bad gain field"):
        read_ecg(str(record))
    (tmp_path / "rec.hea").write_text("\n".join(lines[:5]) + "\n")
    with pytest.raises(ECGReadError, match=r"declares 12 signals but only 4 signal lines follow"):
        read_ecg(str(record))


def test_corrupt_dat_fails_the_checksum(tmp_path: Path) -> None:
    record = _copy_record(tmp_path)
    data = bytearray((tmp_path / "rec.dat").read_bytes())
    data[5000] ^= 0x01  # sample 208 of channel 4 (aVL)
    (tmp_path / "rec.dat").write_bytes(bytes(data))
    with pytest.raises(ECGReadError, match=r"checksum mismatch in signal AVL"):
        read_ecg(str(record) + ".dat")


def test_xml_without_waveform(tmp_path: Path) -> None:
    text = MUSE_500.read_bytes().decode("latin-1")
    no_rhythm = re.sub(r"<Waveform>\s*<WaveformType>Rhythm.*?</Waveform>", "", text, flags=re.DOTALL)
    (tmp_path / "muse.xml").write_bytes(no_rhythm.encode("latin-1"))
    with pytest.raises(ECGReadError, match=r"MUSE XML has no rhythm waveform \(found: Median\)"):
        read_ecg(str(tmp_path / "muse.xml"))
    text = CARDIOSOFT.read_bytes().decode("latin-1")
    (tmp_path / "cs.xml").write_bytes(re.sub(r"<StripData>.*?</StripData>", "", text, flags=re.DOTALL).encode())
    with pytest.raises(ECGReadError, match=r"CardioSoft XML has no StripData rhythm waveform"):
        read_ecg(str(tmp_path / "cs.xml"))
    text = AECG.read_text(encoding="utf-8")
    (tmp_path / "aecg.xml").write_text(text.replace('code="RHYTHM"', 'code="OTHER"'), encoding="utf-8")
    with pytest.raises(ECGReadError, match=r"HL7 aECG has no RHYTHM series \(found series: OTHER\)"):
        read_ecg(str(tmp_path / "aecg.xml"))


def test_broken_xml_and_corrupt_muse_data(tmp_path: Path) -> None:
    text = MUSE_500.read_bytes()
    (tmp_path / "cut.xml").write_bytes(text[: len(text) // 2])
    with pytest.raises(ECGReadError, match=r"XML parse error: .*line \d+"):
        read_ecg(str(tmp_path / "cut.xml"))
    b64 = re.findall(rb"<WaveFormData>([^<]*)</WaveFormData>", text)[8]  # the rhythm lead I
    flipped = b64.replace(b"A", b"B", 1)
    (tmp_path / "crc.xml").write_bytes(text.replace(b64, flipped))
    with pytest.raises(ECGReadError, match=r"MUSE XML: rhythm lead I: waveform fails its CRC32 check"):
        read_ecg(str(tmp_path / "crc.xml"))
    (tmp_path / "other.xml").write_text("<?xml version='1.0'?><!-- x --><svg><g/></svg>")
    with pytest.raises(ECGReadError, match=r"unrecognised XML root element <svg>"):
        read_ecg(str(tmp_path / "other.xml"))


def test_13_sample_aecg_is_rejected_with_a_specific_reason() -> None:
    raw = read_ecg(str(AECG_13))
    assert list(raw.signals_uv) == ["II"] and len(raw.signals_uv["II"]) == 13
    assert raw.signals_uv["II"][:4].tolist() == [-5.0, -5.0, -5.0, -5.0]  # digits -2 x scale 2.5 uV
    wave, reason = canonical_waveform(raw)
    assert wave is None
    assert reason == "missing lead(s) I, III, aVR, aVL, aVF, V1, V2, V3, V4, V5, V6 (source has II)"
    # even with every lead present, 13 samples are rejected as too short
    full = RawECG({lead: raw.signals_uv["II"] for lead in LEADS}, raw.sample_rate_hz, "hl7_aecg", str(AECG_13))
    assert canonical_waveform(full)[1] == "too short: 13 samples at 500 Hz = 0.026 s < 10 s"


def test_corrupt_scp_and_dicom(tmp_path: Path) -> None:
    data = bytearray(SCP.read_bytes())
    data[20000] ^= 0xFF
    (tmp_path / "bad.scp").write_bytes(bytes(data))
    with pytest.raises(ECGReadError, match=r"SCP-ECG: file CRC mismatch"):
        read_ecg(str(tmp_path / "bad.scp"))
    (tmp_path / "short.scp").write_bytes(SCP.read_bytes()[:5000])
    with pytest.raises(ECGReadError, match=r"SCP-ECG: file is truncated \(header says 34144 bytes, found 5000\)"):
        read_ecg(str(tmp_path / "short.scp"))
    dcm = DICOM_500.read_bytes()
    (tmp_path / "short.dcm").write_bytes(dcm[: len(dcm) // 2])
    with pytest.raises(ECGReadError, match=r"DICOM: WaveformData is truncated \(expected 120000 bytes, found \d+\)"):
        read_ecg(str(tmp_path / "short.dcm"))


@pytest.mark.parametrize("suffix", [".hea", ".xml", ".npy", ".npz", ".dcm", ".scp"])
def test_garbage_raises_only_ecg_read_error(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(b"<" + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    with pytest.raises(ECGReadError):
        read_ecg(str(path))


def test_missing_file_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(ECGReadError, match=r"file not found: nothing\.hea"):
        read_ecg(str(tmp_path / "nothing.hea"))
    with pytest.raises(ECGReadError, match=r"unsupported file type '\.edf'"):
        read_ecg(str(tmp_path / "x.edf"))


# ----------------------------------------------------------------------------- NumPy


def _ptb_uv() -> np.ndarray:
    return wfdb.rdrecord(str(PTB_500[0])).p_signal.T * 1000.0  # [12, 5000], canonical lead order


def test_npy_either_orientation_needs_a_rate(tmp_path: Path) -> None:
    signal = _ptb_uv()
    np.save(tmp_path / "leads_first.npy", signal)
    np.save(tmp_path / "samples_first.npy", signal.T.copy())
    a = canonical(tmp_path / "leads_first.npy", sample_rate_hz=500)
    b = canonical(tmp_path / "samples_first.npy", sample_rate_hz=500)
    assert np.array_equal(a, b) and np.array_equal(a, canonical(PTB_500[0]))
    assert read_ecg(str(tmp_path / "leads_first.npy"), sample_rate_hz=500).ecg_id == "leads_first"
    with pytest.raises(ECGReadError, match=r"stores no sample rate; pass sample_rate_hz"):
        read_ecg(str(tmp_path / "leads_first.npy"))


def test_nan_npy_is_rejected(tmp_path: Path) -> None:
    signal = _ptb_uv()
    signal[7, 100:110] = np.nan
    np.save(tmp_path / "nan.npy", signal)
    wave, reason = canonical_waveform(read_ecg(str(tmp_path / "nan.npy"), sample_rate_hz=500))
    assert wave is None and reason == "non-finite samples (NaN/inf) in lead(s) V2"


def test_npz_keys_units_and_lead_names(tmp_path: Path) -> None:
    signal = _ptb_uv()
    names = np.array(["i", "II", "MDC_ECG_LEAD_III", "AVR", "aVL", "Lead aVF", "V1", "V2", "V3", "V4", "V5", "V6"])
    np.savez(tmp_path / "mv.npz", signal=signal.T / 1000.0, fs=500, leads=names, units="mV")
    assert np.array_equal(canonical(tmp_path / "mv.npz"), canonical(PTB_500[0]))
    # leads in another order are mapped by name
    order = [6, 7, 8, 9, 10, 11, 0, 1, 2, 3, 4, 5]
    np.savez(tmp_path / "shuffled.npz", ecg=signal[order], sample_rate_hz=500.0, leads=names[order])
    assert np.array_equal(canonical(tmp_path / "shuffled.npz"), canonical(PTB_500[0]))


def test_npz_missing_a_lead(tmp_path: Path) -> None:
    signal = _ptb_uv()
    np.savez(tmp_path / "no_v6.npz", ecg=signal[:11], sample_rate_hz=500, leads=np.array(LEADS[:11]))
    wave, reason = canonical_waveform(read_ecg(str(tmp_path / "no_v6.npz")))
    assert wave is None and reason.startswith("missing lead(s) V6 (source has I, II, III")
    # a missing limb lead is derived from I and II instead
    keep = [i for i in range(12) if LEADS[i] != "aVF"]
    np.savez(tmp_path / "no_avf.npz", ecg=signal[keep], sample_rate_hz=500, leads=np.array(LEADS)[keep])
    wave = canonical(tmp_path / "no_avf.npz")
    assert np.abs(wave[5] - (signal[1] - signal[0] / 2)).max() <= 0.5 + 1e-9
    np.savez(tmp_path / "unnamed.npz", ecg=signal[:11], sample_rate_hz=500)
    with pytest.raises(ECGReadError, match=r"cannot tell the lead axis of shape \(11, 5000\)"):
        read_ecg(str(tmp_path / "unnamed.npz"))
    np.savez(tmp_path / "nokey.npz", data=signal, sample_rate_hz=500)
    with pytest.raises(ECGReadError, match=r"no 'ecg' or 'signal' array \(keys: data, sample_rate_hz\)"):
        read_ecg(str(tmp_path / "nokey.npz"))


# ----------------------------------------------------------------------------- names and detection


@pytest.mark.parametrize(
    ("label", "lead"),
    [("AVR", "aVR"), ("aVL", "aVL"), ("V1 ", "V1"), ("MDC_ECG_LEAD_AVF", "aVF"), ("Lead II", "II"), ("iii", "III")],
)
def test_lead_name_normalisation(label: str, lead: str) -> None:
    assert normalise_lead_name(label) == lead


def test_lead_names_from_each_format() -> None:
    # PTB-XL writes AVR/AVL/AVF, HL7 MDC_ECG_LEAD_*, DICOM SCP-ECG codes, CardioSoft aVR ...
    for path in (PTB_500[0], AECG, DICOM_500, SCP, CARDIOSOFT):
        assert set(read_ecg(str(path)).signals_uv) == set(LEADS), path.name
    with pytest.raises(ECGReadError, match=r"unknown lead name 'V7'"):
        normalise_lead_name("V7")


def test_detect_format_and_discovery(tmp_path: Path) -> None:
    expected = {
        PTB_500[0].with_suffix(".hea"): "wfdb",
        PTB_500[0].with_suffix(".dat"): "wfdb",
        PTB_500[0]: "wfdb",
        MUSE_500: "muse",
        MUSE_240: "muse",
        CARDIOSOFT: "cardiosoft",
        AECG: "hl7_aecg",
        AECG_13: "hl7_aecg",
        DICOM_500: "dicom",
        SCP: "scp",
    }
    for path, fmt in expected.items():
        assert detect_format(str(path)) == fmt, path.name
    np.save(tmp_path / "a.npy", np.zeros((12, 10)))
    np.savez(tmp_path / "b.npz", ecg=np.zeros((12, 10)))
    assert detect_format(str(tmp_path / "a.npy")) == detect_format(str(tmp_path / "b.npz")) == "numpy"
    assert set(SUPPORTED_SUFFIXES) >= {".hea", ".dat", ".xml", ".npy", ".npz", ".dcm", ".scp"}

    shutil.copytree(PTB / "records500", tmp_path / "ptb")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "other.xml").write_text("<html/>")
    philips = '<?xml version="1.0" encoding="utf-16"?>\n<restingecgdata><waveforms/></restingecgdata>'
    (tmp_path / "philips.xml").write_bytes(philips.encode("utf-16"))
    listed = sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and is_ecg_file(str(p)))
    assert listed == ["00001_hr.hea", "00002_hr.hea", "00003_hr.hea", "a.npy", "b.npz", "philips.xml"]
    assert is_ecg_file(str(MUSE_500)) and is_ecg_file(str(AECG)) and is_ecg_file(str(CARDIOSOFT))
    # Philips PageWriter XML is listed so that ingest quarantines it with this reason
    with pytest.raises(ECGReadError, match=r"Philips PageWriter/Sierra XML .* is not supported"):
        read_ecg(str(tmp_path / "philips.xml"))
