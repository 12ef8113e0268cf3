"""GE MUSE resting-ECG XML (root ``<RestingECG>``): the 'Rhythm' waveform and the cart's R/S amplitudes.

Each ``<LeadData>`` of the Rhythm ``<Waveform>`` holds base64 little-endian int16 samples
(``<WaveFormData>``), scaled by ``LeadAmplitudeUnitsPerBit`` in ``LeadAmplitudeUnits``; the
data's CRC32 is checked against ``LeadDataCRC32``. MUSE normally stores 8 leads (I, II, V1-V6):
the reader returns only what is stored and :func:`lvm_ray.signals.canonical_waveform` derives
III, aVR, aVL and aVF. The 'Median' waveform (one representative beat) is ignored.

The cart's per-lead R and S amplitudes come from the base64 ``<MeasurementMatrix>`` (GE 12SL).
Its layout is undocumented; it was decoded against the median beats of the sample files
(see :func:`_measurement_matrix`).
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
import xml.etree.ElementTree as ET
import zlib

import numpy as np

from lvm_ray.formats import (
    age_in_years,
    file_stem,
    parse_datetime,
    plausible_height_cm,
    plausible_weight_kg,
    to_float,
    uv_per_unit,
)
from lvm_ray.schema import cart_column
from lvm_ray.signals import ECGReadError, RawECG, normalise_lead_name, normalise_sex

#: Lead order of the 12SL measurement matrix (checked against the median beats, see below).
_MATRIX_LEADS = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6", "III", "aVR", "aVL", "aVF")
#: Measurement indices in the matrix: 13 = R amplitude, 17 = S amplitude (uV, S as a magnitude).
_MATRIX_R, _MATRIX_S = 13, 17
_MATRIX_MISSING = (32767, -32768)


def _text(elem: ET.Element | None, path: str) -> str | None:
    if elem is None:
        return None
    found = elem.find(path)
    return found.text.strip() if found is not None and found.text is not None else None


def _rate(base: str | None, exponent: str | None) -> float | None:
    b, e = to_float(base), to_float(exponent) or 0.0
    return b * 10.0**e if b and b > 0 else None


def _decode_lead(lead_data: ET.Element, index: int) -> tuple[str, np.ndarray]:
    """(canonical lead name, samples in uV) of one <LeadData>."""
    lead_id = _text(lead_data, "LeadID")
    where = f"MUSE XML: rhythm lead {lead_id or f'#{index + 1}'}"
    if not lead_id:
        raise ECGReadError(f"{where} has no LeadID")
    lead = normalise_lead_name(lead_id)
    b64 = _text(lead_data, "WaveFormData")
    if not b64:
        raise ECGReadError(f"{where} has no WaveFormData")
    try:
        data = base64.b64decode("".join(b64.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ECGReadError(f"{where}: WaveFormData is not valid base64 ({exc})") from exc
    expected_bytes = to_float(_text(lead_data, "LeadByteCountTotal"))
    if expected_bytes is not None and len(data) < expected_bytes:
        raise ECGReadError(f"{where}: waveform is truncated (expected {int(expected_bytes)} bytes, found {len(data)})")
    crc = _text(lead_data, "LeadDataCRC32")
    if crc and crc.isdigit() and zlib.crc32(data) != int(crc):
        raise ECGReadError(f"{where}: waveform fails its CRC32 check (data corrupt)")
    sample_size = int(to_float(_text(lead_data, "LeadSampleSize")) or 2)
    if sample_size != 2:
        raise ECGReadError(f"{where}: unsupported sample size {sample_size} bytes (expected 2)")
    if len(data) % 2:
        raise ECGReadError(f"{where}: odd number of waveform bytes ({len(data)})")
    samples = np.frombuffer(data, dtype="<i2").astype(np.float64)
    n_expected = to_float(_text(lead_data, "LeadSampleCountTotal"))
    if n_expected is not None and len(samples) > n_expected:
        samples = samples[: int(n_expected)]
    per_bit = to_float(_text(lead_data, "LeadAmplitudeUnitsPerBit"))
    if per_bit is None or per_bit <= 0:
        raise ECGReadError(f"{where}: missing or invalid LeadAmplitudeUnitsPerBit")
    units = _text(lead_data, "LeadAmplitudeUnits") or "MICROVOLTS"
    return lead, samples * per_bit * uv_per_unit(units, context=where)


def _choose_rate(root: ET.Element, waveform: ET.Element) -> float:
    """The rhythm's sample rate: the waveform's own ``<SampleBase>`` (x 10^``SampleExponent``).

    The measurements' ``<ECGSampleBase>`` is used only when the waveform states no rate. The two
    can disagree (the ml4h MUSE 8 sample: SampleBase 240, ECGSampleBase 250, 2500 samples); the
    waveform's rate is the right one there: the cart's intervals (QRS 83 ms, PR 167 ms, QT 367 ms)
    are whole samples at 240 Hz, and its QRS times give 102 bpm only at 240 Hz. Such a recording
    is 10.42 s long; canonicalisation keeps its first 10 s.
    """
    wave_rate = _rate(_text(waveform, "SampleBase"), _text(waveform, "SampleExponent"))
    if wave_rate is not None:
        return float(wave_rate)
    for section in ("RestingECGMeasurements", "OriginalRestingECGMeasurements"):
        cart_rate = _rate(_text(root, f"{section}/ECGSampleBase"), _text(root, f"{section}/ECGSampleExponent"))
        if cart_rate:
            return float(cart_rate)
    raise ECGReadError("MUSE XML: the rhythm waveform has no SampleBase")


def _measurement_matrix(root: ET.Element) -> dict[str, float]:
    """Per-lead R and S amplitudes (uV) from the 12SL ``<MeasurementMatrix>``; {} when absent or blank.

    Layout (decoded from the musePHI samples, MUSE 9): an 18 x int16 header whose first value
    is its own length in bytes (36), then 4-byte records (lead index: uint8, measurement index:
    uint8, value: int16 LE), 53 measurements for each of 12 leads in the order of
    ``_MATRIX_LEADS``. Measured from the median beats (baseline at QRS onset), index 13 matched
    the R peak in all 12 leads of the three musePHI files to within 3 uV, and index 17 the S
    depth (stored positive) to within 3 uV except aVL, where 12SL reports no S wave (0) for a
    17-24 uV terminal dip. Index 9 is the Q depth.
    Scrubbed exports (the ml4h sample) fill the matrix with -1 / 32767: those yield nothing.
    """
    b64 = _text(root, "MeasurementMatrix")
    if not b64:
        return {}
    try:
        data = base64.b64decode("".join(b64.split()))
    except (binascii.Error, ValueError):
        return {}
    if len(data) < 2:
        return {}
    header_len = struct.unpack_from("<h", data)[0]
    if header_len <= 0 or header_len >= len(data) or (len(data) - header_len) % 4:
        return {}
    records = np.frombuffer(data, dtype=[("lead", "u1"), ("m", "u1"), ("v", "<i2")], offset=header_len)
    out: dict[str, float] = {}
    for rec in records:
        lead_index, measurement, value = int(rec["lead"]), int(rec["m"]), int(rec["v"])
        if lead_index >= len(_MATRIX_LEADS) or value in _MATRIX_MISSING:
            continue
        if measurement == _MATRIX_R:
            out[cart_column("r", _MATRIX_LEADS[lead_index])] = float(value)
        elif measurement == _MATRIX_S:
            out[cart_column("s", _MATRIX_LEADS[lead_index])] = float(abs(value))
    return out


def _height_weight(demo: ET.Element | None) -> tuple[float | None, float | None]:
    height = to_float(_text(demo, "HeightCM"))
    if height is None and (inches := to_float(_text(demo, "HeightIN"))) is not None:
        height = inches * 2.54
    weight = to_float(_text(demo, "WeightKG"))
    if weight is None and (pounds := to_float(_text(demo, "WeightLBS"))) is not None:
        weight = pounds * 0.45359237
    return plausible_height_cm(height), plausible_weight_kg(weight)


def read_muse(path: str, *, sample_rate_hz: float | None = None) -> RawECG:
    """Read a GE MUSE XML file. ``sample_rate_hz`` is unused (the file stores its rate)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise ECGReadError(f"XML parse error: {exc}") from exc
    rhythm = [w for w in root.findall("Waveform") if (_text(w, "WaveformType") or "").lower() == "rhythm"]
    if not rhythm:
        types = [_text(w, "WaveformType") or "?" for w in root.findall("Waveform")]
        found = f" (found: {', '.join(types)})" if types else ""
        raise ECGReadError(f"MUSE XML has no rhythm waveform{found}")
    waveform = rhythm[0]
    lead_elems = waveform.findall("LeadData")
    if not lead_elems:
        raise ECGReadError("MUSE XML: the rhythm waveform has no LeadData")
    signals: dict[str, np.ndarray] = {}
    for i, lead_data in enumerate(lead_elems):
        lead, samples = _decode_lead(lead_data, i)
        if lead in signals:
            raise ECGReadError(f"MUSE XML: rhythm lead {lead} appears twice")
        signals[lead] = samples
    rate = _choose_rate(root, waveform)

    demo = root.find("PatientDemographics")
    test = root.find("TestDemographics")
    height, weight = _height_weight(demo)
    acquired = parse_datetime(
        f"{_text(test, 'AcquisitionDate') or ''} {_text(test, 'AcquisitionTime') or ''}".strip(),
        ("%m-%d-%Y %H:%M:%S", "%m/%d/%Y %H:%M:%S", "%m-%d-%Y", "%m/%d/%Y"),
    )
    return RawECG(
        signals_uv=signals,
        sample_rate_hz=rate,
        source_format="muse",
        source_uri=os.path.abspath(path),
        ecg_id=file_stem(path),
        patient_id=_text(demo, "PatientID") or None,
        ecg_datetime=acquired,
        age=age_in_years(to_float(_text(demo, "PatientAge")), _text(demo, "AgeUnits")),
        sex=normalise_sex(_text(demo, "Gender")),
        height_cm=height,
        weight_kg=weight,
        cart_measurements=_measurement_matrix(root),
    )
