"""SCP-ECG (EN 1064 / ISO 11073-91064) binary files: rhythm data of section 6.

Supported: the standard's default Huffman table (section 2 = 19999) or no compression
(section 2 absent or 0 tables), with zero, first- or second-difference encoding. Not supported,
and rejected with a specific message: custom Huffman tables, reference-beat subtraction
(section 3 flag) and bimodal compression (section 6), which a 'rhythm only' encoder such as
ECGToolkit does not use. The file CRC and each section's CRC (CRC-CCITT) are verified.

Amplitude: section 6's AVM in nanovolts per LSB; sample interval in microseconds.
"""

from __future__ import annotations

import binascii
import os
import struct
from datetime import date, datetime, time

import numpy as np

from lvm_ray.formats import SCP_LEAD_CODES, age_in_years, file_stem, plausible_height_cm, plausible_weight_kg
from lvm_ray.signals import ECGReadError, RawECG

_DEFAULT_HUFFMAN = 19999
_SECTION_HEADER = 16


def _crc(data: bytes) -> int:
    """CRC-CCITT (polynomial 0x1021, initial value 0xFFFF) as SCP-ECG specifies."""
    return binascii.crc_hqx(data, 0xFFFF)


def _sections(buf: bytes) -> dict[int, bytes]:
    """Section id -> section bytes (header included), from section 0's pointer table."""
    if len(buf) < 6 + _SECTION_HEADER:
        raise ECGReadError(f"SCP-ECG: file too short ({len(buf)} bytes)")
    stored_crc, total = struct.unpack_from("<HI", buf, 0)
    if struct.unpack_from("<H", buf, 6 + 2)[0] != 0:
        raise ECGReadError("not an SCP-ECG file: no section 0 (pointer section) at byte 6")
    if total > len(buf):
        raise ECGReadError(f"SCP-ECG: file is truncated (header says {total} bytes, found {len(buf)})")
    if _crc(buf[2:total]) != stored_crc:
        raise ECGReadError("SCP-ECG: file CRC mismatch (data corrupt)")
    sec0_len = struct.unpack_from("<I", buf, 6 + 4)[0]
    if struct.unpack_from("<H", buf, 6 + 2)[0] != 0 or sec0_len < _SECTION_HEADER:
        raise ECGReadError("SCP-ECG: section 0 (pointers) is missing or corrupt")
    sections: dict[int, bytes] = {}
    for pos in range(6 + _SECTION_HEADER, 6 + sec0_len - 9, 10):
        sec_id, length, index = struct.unpack_from("<HII", buf, pos)
        if length == 0 or index == 0:
            continue
        start = index - 1  # 1-based byte position in the record
        if start + length > total or length < _SECTION_HEADER:
            raise ECGReadError(f"SCP-ECG: section {sec_id} lies outside the file")
        section = buf[start : start + length]
        crc, sid = struct.unpack_from("<HH", section, 0)
        if sid != sec_id:
            raise ECGReadError(f"SCP-ECG: pointer to section {sec_id} finds section {sid}")
        if _crc(section[2:]) != crc:
            raise ECGReadError(f"SCP-ECG: section {sec_id} CRC mismatch (data corrupt)")
        sections[sec_id] = section
    return sections


def _decode_default_huffman(data: bytes, n_samples: int, lead: str) -> np.ndarray:
    """Decode the SCP default Huffman code.

    n one-bits then a zero (n = 0..8) code magnitude n, followed for n > 0 by a sign bit
    (1 = negative); nine one-bits are followed by a flag bit and then an 8-bit (flag 0) or
    16-bit (flag 1) two's-complement value.
    """
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8)).tolist()
    n_bits = len(bits)
    out = np.empty(n_samples, dtype=np.int64)
    pos = 0
    for i in range(n_samples):
        ones = 0
        while ones < 9 and pos < n_bits and bits[pos]:
            ones += 1
            pos += 1
        if ones < 9:
            pos += 1  # the terminating zero
            if ones == 0:
                value = 0
            else:
                if pos >= n_bits:
                    break
                value = -ones if bits[pos] else ones
                pos += 1
        else:
            if pos >= n_bits:
                break
            width = 16 if bits[pos] else 8
            pos += 1
            if pos + width > n_bits:
                break
            value = 0
            for bit in bits[pos : pos + width]:
                value = (value << 1) | bit
            if value >= 1 << (width - 1):
                value -= 1 << width
            pos += width
        if pos > n_bits:
            break
        out[i] = value
    else:
        return out
    raise ECGReadError(f"SCP-ECG: lead {lead} data end after {i} of {n_samples} samples (truncated or corrupt)")


def _undifference(values: np.ndarray, order: int) -> np.ndarray:
    if order == 0:
        return values
    if order == 1:
        return np.cumsum(values)
    if order == 2:
        if len(values) < 3:
            return values
        first_diff = np.empty_like(values)
        first_diff[0] = values[0]
        first_diff[1] = values[1] - values[0]
        first_diff[2:] = values[2:]
        first_diff[1:] = np.cumsum(first_diff[1:])
        return np.cumsum(first_diff)
    raise ECGReadError(f"SCP-ECG: unsupported difference encoding {order}")


def _patient(section1: bytes | None) -> dict:
    """Fields of section 1 (tag, length, value triplets)."""
    fields: dict[int, bytes] = {}
    pos = _SECTION_HEADER
    while section1 is not None and pos + 3 <= len(section1):
        tag, length = struct.unpack_from("<BH", section1, pos)
        if tag == 255:
            break
        fields.setdefault(tag, section1[pos + 3 : pos + 3 + length])
        pos += 3 + length

    def text(tag: int) -> str | None:
        raw = fields.get(tag)
        return raw.split(b"\x00", 1)[0].decode("latin-1").strip() or None if raw else None

    def day(tag: int) -> date | None:
        raw = fields.get(tag)
        if not raw or len(raw) < 4:
            return None
        year, month, dd = struct.unpack_from("<HBB", raw)
        try:
            return date(year, month, dd)
        except ValueError:
            return None

    acquired_day = day(25)
    acquired = None
    if acquired_day is not None:
        t = fields.get(26)
        try:
            clock = time(*t[:3]) if t and len(t) >= 3 else time()
        except ValueError:
            clock = time()
        acquired = datetime.combine(acquired_day, clock)

    age = None
    if (raw := fields.get(4)) and len(raw) >= 3:
        value, unit = struct.unpack_from("<HB", raw)
        age = age_in_years(float(value), {1: "years", 2: "months", 3: "weeks", 4: "days", 5: "hours"}.get(unit))
    born = day(5)
    if age is None and born is not None and acquired_day is not None and born <= acquired_day:
        age = age_in_years((acquired_day - born).days / 365.25, "years")

    height = weight = None
    if (raw := fields.get(6)) and len(raw) >= 3:
        value, unit = struct.unpack_from("<HB", raw)
        height = {1: value, 2: value * 2.54, 3: value / 10.0}.get(unit)
    if (raw := fields.get(7)) and len(raw) >= 3:
        value, unit = struct.unpack_from("<HB", raw)
        weight = {1: value, 2: value / 1000.0, 3: value * 0.45359237, 4: value * 0.028349523}.get(unit)
    sex = {1: "M", 2: "F"}.get(fields[8][0]) if fields.get(8) else None
    return {
        "patient_id": text(2),
        "ecg_datetime": acquired,
        "age": age,
        "sex": sex,
        "height_cm": plausible_height_cm(height),
        "weight_kg": plausible_weight_kg(weight),
    }


def read_scp(path: str, *, sample_rate_hz: float | None = None) -> RawECG:
    """Read an SCP-ECG file. ``sample_rate_hz`` is unused (section 6 stores the sample interval)."""
    with open(path, "rb") as fh:
        buf = fh.read()
    sections = _sections(buf)
    for required in (3, 6):
        if required not in sections:
            raise ECGReadError(f"SCP-ECG: section {required} is missing (no rhythm data)")

    sec3 = sections[3]
    n_leads, flags = sec3[_SECTION_HEADER], sec3[_SECTION_HEADER + 1]
    if flags & 0x01:
        raise ECGReadError("SCP-ECG: reference-beat subtraction is used, which this reader does not support")
    leads = [struct.unpack_from("<IIB", sec3, _SECTION_HEADER + 2 + 9 * i) for i in range(n_leads)]

    n_tables = 0
    if 2 in sections and len(sections[2]) >= _SECTION_HEADER + 2:
        n_tables = struct.unpack_from("<H", sections[2], _SECTION_HEADER)[0]
    if n_tables not in (0, _DEFAULT_HUFFMAN):
        raise ECGReadError(f"SCP-ECG: custom Huffman tables ({n_tables}) are not supported, only the default table")

    sec6 = sections[6]
    avm_nv, interval_us, difference, bimodal = struct.unpack_from("<HHBB", sec6, _SECTION_HEADER)
    if bimodal:
        raise ECGReadError("SCP-ECG: bimodal compression is used, which this reader does not support")
    if avm_nv == 0 or interval_us == 0:
        raise ECGReadError(f"SCP-ECG: invalid amplitude ({avm_nv} nV) or sample interval ({interval_us} us)")
    sizes = struct.unpack_from(f"<{n_leads}H", sec6, _SECTION_HEADER + 6)
    pos = _SECTION_HEADER + 6 + 2 * n_leads
    signals: dict[str, np.ndarray] = {}
    for (start, end, lead_code), size in zip(leads, sizes, strict=True):
        chunk = sec6[pos : pos + size]
        pos += size
        lead = SCP_LEAD_CODES.get(lead_code)
        if lead is None:
            continue  # a non-standard lead (V7, X, ...)
        if len(chunk) < size:
            raise ECGReadError(f"SCP-ECG: lead {lead} data is truncated ({len(chunk)} of {size} bytes)")
        n_samples = int(end) - int(start) + 1
        if n_samples <= 0:
            raise ECGReadError(f"SCP-ECG: lead {lead} has an empty sample range {start}-{end}")
        if n_tables == _DEFAULT_HUFFMAN:
            values = _decode_default_huffman(chunk, n_samples, lead)
        else:
            if size < 2 * n_samples:
                raise ECGReadError(f"SCP-ECG: lead {lead} is truncated ({size} bytes for {n_samples} samples)")
            values = np.frombuffer(chunk[: 2 * n_samples], dtype="<i2").astype(np.int64)
        if lead in signals:
            raise ECGReadError(f"SCP-ECG: lead {lead} appears twice")
        signals[lead] = _undifference(values, difference).astype(np.float64) * (avm_nv / 1000.0)
    if not signals:
        raise ECGReadError("SCP-ECG: none of the 12 standard leads is stored")
    return RawECG(
        signals_uv=signals,
        sample_rate_hz=1e6 / interval_us,
        source_format="scp",
        source_uri=os.path.abspath(path),
        ecg_id=file_stem(path),
        **_patient(sections.get(1)),
    )
