"""DICOM waveform ECGs (12-lead / general ECG IODs) read with ``pydicom``.

The rhythm multiplex group is the one labelled RHYTHM, else the first ORIGINAL group, else
the first group that is not a median beat. Samples are ``raw * ChannelSensitivity *
ChannelSensitivityCorrectionFactor + ChannelBaseline`` in the channel's sensitivity units
(uV, mV or V), converted to microvolts. Leads are identified by their SCP-ECG / MDC code
(``5.6.3-9-1`` = I, ``2:1`` = I, ...) or, failing that, by the code meaning ('Lead I (Einthoven)').
"""

from __future__ import annotations

import os
import re
from datetime import datetime

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from lvm_ray.formats import (
    SCP_LEAD_CODES,
    age_in_years,
    file_stem,
    parse_datetime,
    plausible_height_cm,
    plausible_weight_kg,
    to_float,
    uv_per_unit,
)
from lvm_ray.signals import ECGReadError, RawECG, normalise_lead_name, normalise_sex

_DTYPES = {
    (8, "SB"): np.int8,
    (8, "UB"): np.uint8,
    (16, "SS"): np.int16,
    (16, "US"): np.uint16,
    (32, "SL"): np.int32,
    (32, "UL"): np.uint32,
}


def _lead_name(channel: pydicom.Dataset) -> str | None:
    """Canonical lead of a ChannelDefinitionSequence item, or None for a non-standard channel."""
    source = channel.get("ChannelSourceSequence")
    if not source:
        return None
    item = source[0]
    code = str(item.get("CodeValue", "") or "")
    match = re.fullmatch(r"(?:5\.6\.3-9-|2:)(\d+)", code)
    if match and int(match.group(1)) in SCP_LEAD_CODES:
        return SCP_LEAD_CODES[int(match.group(1))]
    meaning = re.sub(r"\(.*?\)", "", str(item.get("CodeMeaning", "") or "")).strip()
    try:
        return normalise_lead_name(meaning)
    except ECGReadError:
        return None


def _rhythm_group(ds: pydicom.Dataset) -> pydicom.Dataset:
    groups = list(ds.get("WaveformSequence") or [])
    if not groups:
        raise ECGReadError("DICOM file has no WaveformSequence (not a waveform object)")

    def label(g: pydicom.Dataset) -> str:
        return str(g.get("MultiplexGroupLabel", "") or "").upper()

    for predicate in (
        lambda g: label(g) == "RHYTHM",
        lambda g: str(g.get("WaveformOriginality", "")).upper() == "ORIGINAL",
        lambda g: "MEDIAN" not in label(g),
    ):
        for group in groups:
            if predicate(group):
                return group
    raise ECGReadError(f"DICOM: no rhythm waveform (multiplex groups: {', '.join(label(g) for g in groups)})")


def _samples(group: pydicom.Dataset) -> np.ndarray:
    """Raw samples of one multiplex group as [samples, channels]."""
    n_channels = int(group.NumberOfWaveformChannels)
    n_samples = int(group.NumberOfWaveformSamples)
    bits = int(group.WaveformBitsAllocated)
    interpretation = str(group.WaveformSampleInterpretation)
    dtype = _DTYPES.get((bits, interpretation))
    if dtype is None:
        raise ECGReadError(f"DICOM: unsupported waveform sample type {bits} bits {interpretation}")
    dtype = np.dtype(dtype).newbyteorder("<")
    data = group.get("WaveformData")
    if data is None:
        raise ECGReadError("DICOM: the rhythm multiplex group has no WaveformData")
    expected = n_samples * n_channels * dtype.itemsize
    if len(data) < expected:
        raise ECGReadError(f"DICOM: WaveformData is truncated (expected {expected} bytes, found {len(data)})")
    return np.frombuffer(bytes(data[:expected]), dtype=dtype).reshape(n_samples, n_channels)


def _acquired(ds: pydicom.Dataset) -> datetime | None:
    stamp = str(ds.get("AcquisitionDateTime", "") or "")
    if not stamp:
        stamp = f"{ds.get('ContentDate', '') or ''}{ds.get('ContentTime', '') or ''}"
    digits = re.match(r"\d+", stamp)
    if not digits:
        return None
    text = digits.group(0)
    for length, fmt in ((14, "%Y%m%d%H%M%S"), (12, "%Y%m%d%H%M"), (8, "%Y%m%d")):
        if len(text) >= length:
            return parse_datetime(text[:length], (fmt,))
    return None


def _age(ds: pydicom.Dataset) -> float | None:
    match = re.fullmatch(r"(\d{1,3})([DWMY])", str(ds.get("PatientAge", "") or "").strip().upper())
    if not match:
        return None
    unit = {"D": "days", "W": "weeks", "M": "months", "Y": "years"}[match.group(2)]
    return age_in_years(float(match.group(1)), unit)


def read_dicom(path: str, *, sample_rate_hz: float | None = None) -> RawECG:
    """Read a DICOM ECG waveform file. ``sample_rate_hz`` is unused (the file stores its rate)."""
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise ECGReadError(f"not a DICOM file: {os.path.basename(path)} has no 'DICM' file meta header") from exc
    group = _rhythm_group(ds)
    rate = to_float(str(group.get("SamplingFrequency", "")))
    if rate is None or rate <= 0:
        raise ECGReadError("DICOM: the rhythm multiplex group has no valid SamplingFrequency")
    raw = _samples(group)
    channels = list(group.get("ChannelDefinitionSequence") or [])
    if len(channels) != raw.shape[1]:
        raise ECGReadError(f"DICOM: {raw.shape[1]} waveform channels but {len(channels)} channel definitions")
    signals: dict[str, np.ndarray] = {}
    for i, channel in enumerate(channels):
        lead = _lead_name(channel)
        if lead is None:
            continue
        if lead in signals:
            raise ECGReadError(f"DICOM: lead {lead} appears twice in the rhythm group")
        sensitivity = to_float(str(channel.get("ChannelSensitivity", "1") or "1")) or 1.0
        correction = to_float(str(channel.get("ChannelSensitivityCorrectionFactor", "1") or "1")) or 1.0
        baseline = to_float(str(channel.get("ChannelBaseline", "0") or "0")) or 0.0
        units_seq = channel.get("ChannelSensitivityUnitsSequence")
        unit = str(units_seq[0].get("CodeValue", "uV")) if units_seq else "uV"
        to_uv = uv_per_unit(unit, context=f"DICOM lead {lead} sensitivity")
        signals[lead] = (raw[:, i].astype(np.float64) * sensitivity * correction + baseline) * to_uv
    if not signals:
        raise ECGReadError("DICOM: the rhythm group has none of the 12 standard leads")

    size = to_float(str(ds.get("PatientSize", "") or ""))
    return RawECG(
        signals_uv=signals,
        sample_rate_hz=float(rate),
        source_format="dicom",
        source_uri=os.path.abspath(path),
        ecg_id=file_stem(path),
        patient_id=str(ds.get("PatientID", "") or "") or None,
        ecg_datetime=_acquired(ds),
        age=_age(ds),
        sex=normalise_sex(str(ds.get("PatientSex", "") or "")),
        height_cm=plausible_height_cm(size * 100.0 if size is not None else None),  # PatientSize is in metres
        weight_kg=plausible_weight_kg(to_float(str(ds.get("PatientWeight", "") or ""))),
    )
