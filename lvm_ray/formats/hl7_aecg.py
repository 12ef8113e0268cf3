"""HL7 v3 annotated ECG (FDA aECG, root ``<AnnotatedECG>``): the RHYTHM series.

The reader takes the top-level ``<series>`` coded RHYTHM (never the REPRESENTATIVE_BEAT series
nested under ``<derivation>``) and its first ``<sequenceSet>``: the TIME_ABSOLUTE /
TIME_RELATIVE sequence's ``<increment>`` gives the sample rate, and each ``MDC_ECG_LEAD_*``
sequence is ``digits * scale + origin`` in the units of scale and origin (uV, mV or V),
converted to microvolts. Non-standard leads (e.g. VCG X/Y/Z) are skipped. The file's lead set
and length are returned as found: a short or incomplete recording is for
:func:`lvm_ray.signals.canonical_waveform` to reject.

Parsed with :mod:`xml.etree.ElementTree` (lxml is not a dependency).
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from datetime import datetime

import numpy as np

from lvm_ray.formats import age_in_years, file_stem, parse_datetime, to_float, uv_per_unit
from lvm_ray.signals import ECGReadError, RawECG, normalise_lead_name, normalise_sex

_SECONDS_PER_UNIT = {"s": 1.0, "sec": 1.0, "ms": 1e-3, "us": 1e-6}


def _strip_namespaces(root: ET.Element) -> None:
    for elem in root.iter():
        if isinstance(elem.tag, str) and "}" in elem.tag:
            elem.tag = elem.tag.rsplit("}", 1)[1]


def _code(elem: ET.Element | None) -> str:
    code = elem.find("code") if elem is not None else None
    return (code.get("code") or "") if code is not None else ""


def _hl7_time(value: str | None) -> datetime | None:
    """HL7 TS ('20021122091000', '20081223194446.000+0100') -> naive datetime (local time as written)."""
    digits = re.match(r"\d+", value or "")
    if not digits:
        return None
    text = digits.group(0)
    formats = {14: "%Y%m%d%H%M%S", 12: "%Y%m%d%H%M", 8: "%Y%m%d"}
    for length in (14, 12, 8):
        if len(text) >= length:
            return parse_datetime(text[:length], (formats[length],))
    return None


def _physical(elem: ET.Element | None, where: str) -> float:
    """A PQ element's value in microvolts (absent element -> 0)."""
    if elem is None:
        return 0.0
    value = to_float(elem.get("value"))
    if value is None:
        raise ECGReadError(f"{where} has no numeric value")
    return value * uv_per_unit(elem.get("unit") or "uV", context=where)


def _rhythm_series(root: ET.Element) -> ET.Element:
    series = [s for comp in root.findall("component") for s in comp.findall("series")]
    rhythm = [s for s in series if _code(s).upper() == "RHYTHM"]
    if rhythm:
        return rhythm[0]
    codes = [_code(s) or "?" for s in series]
    found = f" (found series: {', '.join(codes)})" if codes else ""
    raise ECGReadError(f"HL7 aECG has no RHYTHM series{found}")


def _sample_rate(sequences: list[ET.Element]) -> float:
    for seq in sequences:
        if _code(seq).upper() in ("TIME_ABSOLUTE", "TIME_RELATIVE"):
            increment = seq.find("value/increment")
            step = to_float(increment.get("value")) if increment is not None else None
            unit = (increment.get("unit") if increment is not None else None) or "s"
            if step is None or step <= 0 or unit.lower() not in _SECONDS_PER_UNIT:
                raise ECGReadError(
                    f"HL7 aECG: the time sequence has no usable increment (value {step!r}, unit {unit!r})"
                )
            return 1.0 / (step * _SECONDS_PER_UNIT[unit.lower()])
    raise ECGReadError("HL7 aECG: the rhythm sequence set has no TIME_ABSOLUTE/TIME_RELATIVE sequence")


def _patient(root: ET.Element, acquired: datetime | None) -> dict:
    subject = next(root.iter("trialSubject"), None)
    patient_id = None
    if subject is not None and (ident := subject.find("id")) is not None:
        patient_id = ident.get("extension") or None
    person = subject.find("subjectDemographicPerson") if subject is not None else None
    gender = person.find("administrativeGenderCode") if person is not None else None
    age = None
    for obs in root.iter("relatedObservation"):
        if _code(obs) == "21612-7" and (value := obs.find("value")) is not None:  # LOINC 'reported age'
            age = age_in_years(to_float(value.get("value")), value.get("unit") or "a")
    if age is None and acquired is not None and person is not None:
        birth = person.find("birthTime")
        born = _hl7_time(birth.get("value")) if birth is not None else None
        if born is not None and born <= acquired:
            age = age_in_years((acquired - born).days / 365.25, "years")
    return {
        "patient_id": patient_id,
        "sex": normalise_sex(gender.get("code") if gender is not None else None),
        "age": age,
    }


def read_hl7_aecg(path: str, *, sample_rate_hz: float | None = None) -> RawECG:
    """Read an HL7 aECG XML file. ``sample_rate_hz`` is unused (the file stores its increment)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise ECGReadError(f"XML parse error: {exc}") from exc
    _strip_namespaces(root)
    series = _rhythm_series(root)
    sequence_set = series.find("component/sequenceSet")
    if sequence_set is None:
        raise ECGReadError("HL7 aECG: the RHYTHM series has no sequenceSet")
    sequences = [s for comp in sequence_set.findall("component") for s in comp.findall("sequence")]
    rate = _sample_rate(sequences)

    signals: dict[str, np.ndarray] = {}
    for seq in sequences:
        code = _code(seq)
        if not code.upper().startswith("MDC_ECG_LEAD_"):
            continue
        try:
            lead = normalise_lead_name(code)
        except ECGReadError:
            continue  # e.g. MDC_ECG_LEAD_X (VCG) or a vendor lead: not one of the 12
        where = f"HL7 aECG lead {lead}"
        if lead in signals:
            raise ECGReadError(f"{where} appears twice in the rhythm series")
        value = seq.find("value")
        digits = value.find("digits") if value is not None else None
        if digits is None or not (digits.text or "").strip():
            raise ECGReadError(f"{where} has no digits")
        try:
            samples = np.array(digits.text.split(), dtype=np.float64)
        except ValueError as exc:
            raise ECGReadError(f"{where}: digits hold a non-numeric value ({exc})") from exc
        if value.find("scale") is None:
            raise ECGReadError(f"{where} has no scale (SLIST_PQ needs one to give the digits a unit)")
        scale = _physical(value.find("scale"), f"{where} scale")
        origin = _physical(value.find("origin"), f"{where} origin")
        signals[lead] = samples * scale + origin
    if not signals:
        raise ECGReadError("HL7 aECG: the RHYTHM series has no MDC_ECG_LEAD_* sequences of the 12 standard leads")

    time_elem = root.find("effectiveTime")
    acquired = None
    if time_elem is not None:
        for tag in ("center", "low"):
            if (t := time_elem.find(tag)) is not None and (acquired := _hl7_time(t.get("value"))):
                break
    return RawECG(
        signals_uv=signals,
        sample_rate_hz=rate,
        source_format="hl7_aecg",
        source_uri=os.path.abspath(path),
        ecg_id=file_stem(path),
        ecg_datetime=acquired,
        **_patient(root, acquired),
    )
