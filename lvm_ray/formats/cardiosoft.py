"""GE CardioSoft XML (root ``<CardiologyXML>``, as in UK Biobank): the 10 s ``<StripData>``.

``<StripData>`` holds one comma-separated ``<WaveformData lead="...">`` per lead at
``<SampleRate>``, scaled by ``<Resolution units="uVperLsb">``. ``<MedianSamples>`` (one beat)
and ``<FullDisclosure>`` (the whole session) are ignored. The 12SL ``<MeasurementTable>``
gives per-lead R and S amplitudes (uV, S as a positive magnitude); empty cells stay absent.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from datetime import datetime

import numpy as np

from lvm_ray.formats import (
    age_in_years,
    file_stem,
    plausible_height_cm,
    plausible_weight_kg,
    to_float,
    uv_per_unit,
)
from lvm_ray.schema import cart_column
from lvm_ray.signals import ECGReadError, RawECG, normalise_lead_name, normalise_sex


def _text(elem: ET.Element | None, path: str) -> str | None:
    if elem is None:
        return None
    found = elem.find(path)
    return found.text.strip() if found is not None and found.text is not None else None


def _unit(elem: ET.Element | None, path: str) -> str | None:
    found = elem.find(path) if elem is not None else None
    return found.get("units") if found is not None else None


def _parse_samples(text: str | None, lead: str) -> np.ndarray:
    if not text or not text.strip():
        raise ECGReadError(f"CardioSoft XML: lead {lead} has an empty WaveformData")
    try:
        return np.array(text.replace(",", " ").split(), dtype=np.float64)
    except ValueError as exc:
        raise ECGReadError(f"CardioSoft XML: lead {lead} WaveformData has a non-numeric value ({exc})") from exc


def _measurement_table(root: ET.Element) -> dict[str, float]:
    """cart_r_uv_* / cart_s_uv_* from the 12SL MeasurementTable; empty cells are left out."""
    table = root.find("RestingECGMeasurements/MeasurementTable")
    order = _text(table, "LeadOrder")
    if table is None or not order:
        return {}
    try:
        leads = [normalise_lead_name(name) for name in order.split(",")]
    except ECGReadError:
        return {}
    out: dict[str, float] = {}
    for kind, tag in (("r", "RAmplitude"), ("s", "SAmplitude")):
        row = table.find(tag)
        if row is None or row.text is None:
            continue
        try:
            scale = uv_per_unit(row.get("units") or "uV", context=f"CardioSoft MeasurementTable {tag}")
        except ECGReadError:
            continue
        cells = row.text.split(",")
        if len(cells) != len(leads):
            continue
        for lead, cell in zip(leads, cells, strict=True):
            value = to_float(cell)
            if value is not None:
                out[cart_column(kind, lead)] = abs(value) * scale if kind == "s" else value * scale
    return out


def _observation_datetime(root: ET.Element) -> datetime | None:
    obs = root.find("ObservationDateTime")
    if obs is None:
        return None
    parts = [to_float(_text(obs, key)) for key in ("Year", "Month", "Day", "Hour", "Minute", "Second")]
    if any(p is None for p in parts[:3]):
        return None
    try:
        return datetime(*(int(p or 0) for p in parts))
    except ValueError:
        return None


def read_cardiosoft(path: str, *, sample_rate_hz: float | None = None) -> RawECG:
    """Read a GE CardioSoft XML file. ``sample_rate_hz`` is unused (the file stores its rate)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise ECGReadError(f"XML parse error: {exc}") from exc
    strip = root.find("StripData")
    if strip is None:
        raise ECGReadError("CardioSoft XML has no StripData rhythm waveform")
    rate = to_float(_text(strip, "SampleRate"))
    if rate is None or rate <= 0:
        raise ECGReadError("CardioSoft XML: StripData has no valid SampleRate")
    resolution = to_float(_text(strip, "Resolution"))
    if resolution is None or resolution <= 0:
        raise ECGReadError("CardioSoft XML: StripData has no valid Resolution")
    res_unit = (_unit(strip, "Resolution") or "uVperLsb").lower().replace("perlsb", "").replace("/lsb", "")
    scale = resolution * uv_per_unit(res_unit, context="CardioSoft XML StripData Resolution")
    n_expected = to_float(_text(strip, "ChannelSampleCountTotal"))

    waveforms = strip.findall("WaveformData")
    if not waveforms:
        raise ECGReadError("CardioSoft XML: StripData has no WaveformData")
    signals: dict[str, np.ndarray] = {}
    for elem in waveforms:
        name = elem.get("lead") or ""
        lead = normalise_lead_name(name)
        if lead in signals:
            raise ECGReadError(f"CardioSoft XML: lead {lead} appears twice in StripData")
        samples = _parse_samples(elem.text, lead)
        if n_expected is not None and len(samples) < n_expected:
            raise ECGReadError(
                f"CardioSoft XML: lead {lead} is truncated (expected {int(n_expected)} samples, found {len(samples)})"
            )
        signals[lead] = samples * scale

    info = root.find("PatientInfo")
    height = to_float(_text(info, "Height"))
    if height is not None and (_unit(info, "Height") or "").upper().startswith("INCH"):
        height *= 2.54
    weight = to_float(_text(info, "Weight"))
    if weight is not None and (_unit(info, "Weight") or "").upper().startswith(("POUND", "LB")):
        weight *= 0.45359237
    return RawECG(
        signals_uv=signals,
        sample_rate_hz=float(rate),
        source_format="cardiosoft",
        source_uri=os.path.abspath(path),
        ecg_id=file_stem(path),
        patient_id=_text(info, "PID") or None,
        ecg_datetime=_observation_datetime(root),
        age=age_in_years(to_float(_text(info, "Age")), _unit(info, "Age")),
        sex=normalise_sex(_text(info, "Gender")),
        height_cm=plausible_height_cm(height),
        weight_kg=plausible_weight_kg(weight),
        cart_measurements=_measurement_table(root),
    )
