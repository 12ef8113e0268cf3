"""WFDB (PhysioNet) records, e.g. PTB-XL: ``name.hea`` + ``name.dat``, read with the ``wfdb`` library.

Physical values come from the header's gain/baseline and are converted from the header's units
(mV, uV, V) to microvolts. Before reading, the signal files are checked against the length the
header promises, so a truncated download is reported as such instead of as a short record.
Samples WFDB marks invalid come back as NaN (``canonical_waveform`` then rejects them).
"""

from __future__ import annotations

import math
import os
import re
from datetime import datetime

import numpy as np
import wfdb

from lvm_ray.formats import age_in_years, to_float, uv_per_unit
from lvm_ray.signals import ECGReadError, RawECG, normalise_lead_name, normalise_sex

#: Bytes per sample of the uncompressed WFDB signal formats (FLAC formats 5xx are not checked).
_BYTES_PER_SAMPLE = {
    "8": 1.0,
    "16": 2.0,
    "24": 3.0,
    "32": 4.0,
    "61": 2.0,
    "80": 1.0,
    "160": 2.0,
    "212": 1.5,
    "310": 4 / 3,
    "311": 4 / 3,
}


def _record_base(path: str) -> str:
    root, ext = os.path.splitext(path)
    return root if ext.lower() in (".hea", ".dat") else path


def _check_signal_files(header: wfdb.Record, directory: str) -> None:
    """Raise ECGReadError if a signal file is missing or shorter than the header promises."""
    if not header.sig_len or not header.file_name:
        return
    per_file: dict[str, list[int]] = {}
    for i, fname in enumerate(header.file_name):
        per_file.setdefault(fname, []).append(i)
    for fname, channels in per_file.items():
        fpath = os.path.join(directory, fname)
        if not os.path.exists(fpath):
            raise ECGReadError(f"WFDB: signal file {fname} is missing")
        fmt = str(header.fmt[channels[0]])
        bytes_per_sample = _BYTES_PER_SAMPLE.get(fmt)
        if bytes_per_sample is None:
            continue
        spf = header.samps_per_frame or [1] * header.n_sig
        samples_per_frame = sum(int(spf[i] or 1) for i in channels)
        offset = int((header.byte_offset or [0] * header.n_sig)[channels[0]] or 0)
        expected = offset + math.ceil(header.sig_len * samples_per_frame * bytes_per_sample)
        found = os.path.getsize(fpath)
        if found < expected:
            raise ECGReadError(f"WFDB: signal file {fname} is truncated (expected {expected} bytes, found {found})")


_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_FS_FIELD = re.compile(rf"^{_NUM}(?:/{_NUM}(?:\({_NUM}\))?)?$")
_FORMAT_FIELD = re.compile(r"^\d+(?:x\d+)?(?::\d+)?(?:\+\d+)?$")
_GAIN_FIELD = re.compile(rf"^{_NUM}(?:\({_NUM}\))?(?:/\S+)?$")
_INT_FIELD = re.compile(r"^[-+]?\d+$")


def _validate_header_text(hea_path: str, record_name: str) -> None:
    """Check the header's structure strictly: the ``wfdb`` parser silently misreads bad lines
    (a malformed gain field becomes part of the lead name), so a corrupt line must fail here."""
    try:
        with open(hea_path, encoding="latin-1") as fh:
            lines = [ln.strip() for ln in fh]
    except OSError as exc:
        raise ECGReadError(f"WFDB: cannot open header {record_name}.hea: {exc.strerror or exc}") from exc
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise ECGReadError(f"corrupt WFDB header {record_name}.hea: the file is empty")
    record = lines[0].split()
    if (
        len(record) < 2
        or not record[1].isdigit()
        or (len(record) > 2 and not _FS_FIELD.match(record[2]))
        or (len(record) > 3 and not record[3].isdigit())
    ):
        raise ECGReadError(f"corrupt WFDB header {record_name}.hea: bad record line {lines[0][:80]!r}")
    if "/" in record[0]:  # a multi-segment record: its following lines name segments, not signals
        return
    n_sig = int(record[1])
    signal_lines = lines[1 : 1 + n_sig]
    if len(signal_lines) < n_sig:
        raise ECGReadError(
            f"corrupt WFDB header {record_name}.hea: record line declares {n_sig} signals "
            f"but only {len(signal_lines)} signal lines follow"
        )
    for number, line in enumerate(signal_lines, start=1):
        fields = line.split()
        problem = None
        if len(fields) < 2 or not _FORMAT_FIELD.match(fields[1]):
            problem = "bad file name / format fields"
        elif len(fields) > 2 and not _GAIN_FIELD.match(fields[2]):
            problem = f"bad gain field {fields[2]!r}"
        else:  # adc_res, adc_zero, init_value, checksum, block_size; the description follows them
            bad_int = next((f for f in fields[3:8] if not _INT_FIELD.match(f)), None)
            if bad_int is not None:
                problem = f"non-integer field {bad_int!r}"
        if problem:
            raise ECGReadError(
                f"corrupt WFDB header {record_name}.hea: signal line {number}: {problem} in {line[:80]!r}"
            )


def _verify_checksums(record: wfdb.Record, record_name: str) -> None:
    """Compare each signal's 16-bit sample sum with the header's checksum, where it has one."""
    if not record.checksum or record.d_signal is None:
        return
    computed = np.sum(record.d_signal, axis=0, dtype=np.int64) % 65536
    for i, expected in enumerate(record.checksum):
        if expected is not None and int(expected) % 65536 != int(computed[i]):
            raise ECGReadError(
                f"WFDB: checksum mismatch in signal {record.sig_name[i]} of {record_name} "
                f"(header {int(expected) % 65536}, data {int(computed[i])}): the signal file is corrupt"
            )


def _comment_fields(comments: list[str]) -> dict[str, str]:
    """'Key: value' pairs from header comments (PhysioNet challenge style '# Age: 53')."""
    fields: dict[str, str] = {}
    for line in comments or []:
        match = re.match(r"\s*([A-Za-z_ ]+?)\s*[:=]\s*(.*?)\s*$", line)
        if match:
            fields[match.group(1).strip().lower()] = match.group(2)
    return fields


def read_wfdb(path: str, *, sample_rate_hz: float | None = None) -> RawECG:
    """Read a WFDB record given as ``x``, ``x.hea`` or ``x.dat``. ``sample_rate_hz`` is unused."""
    base = _record_base(path)
    directory, record_name = os.path.split(base)
    _validate_header_text(base + ".hea", record_name)
    try:
        header = wfdb.rdheader(base)
    except FileNotFoundError as exc:
        raise ECGReadError(f"WFDB: header file {record_name}.hea not found") from exc
    except Exception as exc:
        raise ECGReadError(f"corrupt WFDB header {record_name}.hea: {type(exc).__name__}: {exc}") from exc
    if not header.n_sig:
        raise ECGReadError(f"WFDB: header {record_name}.hea declares no signals")
    if not header.fs or header.fs <= 0:
        raise ECGReadError(f"corrupt WFDB header {record_name}.hea: invalid sampling frequency {header.fs!r}")
    _check_signal_files(header, directory)
    try:
        record = wfdb.rdrecord(base, physical=False)
    except Exception as exc:
        raise ECGReadError(f"WFDB: cannot read signals of {record_name}: {type(exc).__name__}: {exc}") from exc
    _verify_checksums(record, record_name)
    signal = record.dac()  # physical units; WFDB's invalid-sample sentinel becomes NaN
    if signal is None or signal.ndim != 2 or signal.shape[1] != len(record.sig_name):
        raise ECGReadError(f"WFDB: record {record_name} returned no physical signal")

    signals: dict[str, np.ndarray] = {}
    for i, name in enumerate(record.sig_name):
        try:
            lead = normalise_lead_name(name)
        except ECGReadError:
            continue  # a non-ECG or non-standard channel (e.g. VCG 'vx'): not part of the 12 leads
        if lead in signals:
            raise ECGReadError(f"WFDB: record {record_name} has lead {lead} twice")
        units = (record.units or [None] * len(record.sig_name))[i]
        scale = uv_per_unit(units, context=f"WFDB record {record_name} lead {name}")
        signals[lead] = np.asarray(signal[:, i], dtype=np.float64) * scale
    if not signals:
        channels = ", ".join(record.sig_name)
        raise ECGReadError(f"WFDB: record {record_name} has no standard ECG leads (channels: {channels})")

    ecg_datetime = None
    if record.base_date is not None and record.base_time is not None:
        ecg_datetime = datetime.combine(record.base_date, record.base_time)
    fields = _comment_fields(record.comments)
    return RawECG(
        signals_uv=signals,
        sample_rate_hz=float(record.fs),
        source_format="wfdb",
        source_uri=os.path.abspath(base + ".hea"),
        ecg_id=record_name,
        ecg_datetime=ecg_datetime,
        age=age_in_years(to_float(fields.get("age")), "years"),
        sex=normalise_sex(fields.get("sex") or fields.get("gender")),
    )
