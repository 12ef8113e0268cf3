"""ECG file-format readers: one registry from a local file to a :class:`~lvm_ray.signals.RawECG`.

``read_ecg(path)`` detects the format (by suffix, and for ``.xml`` by the root element) and
hands the file to its reader. Readers return what the file stores, in microvolts at the
source rate; :func:`lvm_ray.signals.canonical_waveform` completes derived leads, resamples and
judges quality. A file that cannot be read raises :class:`~lvm_ray.signals.ECGReadError` with a
specific message (the quarantine reason); no other exception type escapes ``read_ecg``.

Formats: WFDB (.hea/.dat), GE MUSE XML, GE CardioSoft XML, HL7 aECG XML, NumPy (.npy/.npz),
DICOM waveform (.dcm) and SCP-ECG (.scp; default-Huffman or uncompressed, no reference-beat
subtraction). Readers are imported lazily so that importing this package stays cheap.
"""

from __future__ import annotations

import importlib
import math
import os
import re
from collections.abc import Callable
from datetime import datetime

from lvm_ray.signals import ECGReadError, RawECG

__all__ = [
    "FORMATS",
    "SUPPORTED_SUFFIXES",
    "detect_format",
    "is_ecg_file",
    "read_ecg",
]

#: File suffixes the registry knows (lower case). For WFDB only ``.hea`` is listed by discovery.
#: Lead numbers shared by the SCP-ECG ('5.6.3-9-N', section 3) and MDC ('2:N') coding schemes.
SCP_LEAD_CODES: dict[int, str] = {
    1: "I",
    2: "II",
    3: "V1",
    4: "V2",
    5: "V3",
    6: "V4",
    7: "V5",
    8: "V6",
    61: "III",
    62: "aVR",
    63: "aVL",
    64: "aVF",
}
SUPPORTED_SUFFIXES: tuple[str, ...] = (".hea", ".dat", ".xml", ".npy", ".npz", ".dcm", ".scp")

#: Format name -> (module, reader function, human label used in error messages).
FORMATS: dict[str, tuple[str, str, str]] = {
    "wfdb": ("lvm_ray.formats.wfdb_format", "read_wfdb", "WFDB"),
    "muse": ("lvm_ray.formats.muse", "read_muse", "MUSE XML"),
    "cardiosoft": ("lvm_ray.formats.cardiosoft", "read_cardiosoft", "CardioSoft XML"),
    "hl7_aecg": ("lvm_ray.formats.hl7_aecg", "read_hl7_aecg", "HL7 aECG"),
    "numpy": ("lvm_ray.formats.numpy_format", "read_numpy", "NumPy"),
    "dicom": ("lvm_ray.formats.dicom", "read_dicom", "DICOM"),
    "scp": ("lvm_ray.formats.scp", "read_scp", "SCP-ECG"),
}

#: XML root element (namespace and prefix stripped) -> format name.
_XML_ROOTS = {"RestingECG": "muse", "CardiologyXML": "cardiosoft", "AnnotatedECG": "hl7_aecg"}
#: XML roots of ECG exports recognised but not readable: discovery lists them so they are
#: quarantined with this reason instead of vanishing silently.
_UNSUPPORTED_XML_ROOTS = {
    "restingecgdata": "Philips PageWriter/Sierra XML (XLI-compressed waveforms) is not supported; "
    "export the ECG as HL7 aECG or DICOM instead",
}
_SNIFF_BYTES = 8192


# ----------------------------------------------------------------------------- detection


def _xml_root_name(path: str) -> str:
    """The root element's local name, read from the first few KB (UTF-8/Latin-1 or UTF-16)."""
    with open(path, "rb") as fh:
        head = fh.read(_SNIFF_BYTES)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = head.decode("utf-16", errors="ignore")
    elif len(head) > 1 and head[0] == 0:
        text = head.decode("utf-16-be", errors="ignore")
    elif len(head) > 1 and head[1] == 0:
        text = head.decode("utf-16-le", errors="ignore")
    else:
        text = head.decode("latin-1")
    # Skip the XML declaration, comments, processing instructions and the DOCTYPE.
    text = re.sub(r"<\?.*?\?>|<!--.*?-->|<!DOCTYPE[^>]*>", "", text, flags=re.DOTALL)
    match = re.search(r"<\s*([A-Za-z_][\w.:-]*)", text)
    if not match:
        raise ECGReadError(f"not an XML ECG file: no root element in the first {_SNIFF_BYTES} bytes")
    return match.group(1).split(":")[-1]


def _wfdb_base(path: str) -> str | None:
    """The WFDB record path (no suffix) for ``x.hea``, ``x.dat`` or ``x`` with ``x.hea`` beside it."""
    root, ext = os.path.splitext(path)
    if ext.lower() in (".hea", ".dat"):
        return root
    if ext == "" and os.path.exists(path + ".hea"):
        return path
    return None


def detect_format(path: str) -> str:
    """Name the format of a local file: 'wfdb', 'muse', 'cardiosoft', 'hl7_aecg', 'numpy', 'dicom', 'scp'.

    Raises ECGReadError for a suffix or an XML root element that no reader handles.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext in (".hea", ".dat") or (ext == "" and _wfdb_base(path)):
        return "wfdb"
    if ext in (".npy", ".npz"):
        return "numpy"
    if ext == ".dcm":
        return "dicom"
    if ext == ".scp":
        return "scp"
    if ext == ".xml":
        try:
            root = _xml_root_name(path)
        except OSError as exc:
            raise ECGReadError(f"cannot open {os.path.basename(path)}: {exc.strerror or exc}") from exc
        if root in _XML_ROOTS:
            return _XML_ROOTS[root]
        if root in _UNSUPPORTED_XML_ROOTS:
            raise ECGReadError(_UNSUPPORTED_XML_ROOTS[root])
        raise ECGReadError(f"unrecognised XML root element <{root}>: not a GE MUSE, GE CardioSoft or HL7 aECG file")
    raise ECGReadError(f"unsupported file type {ext or '(no suffix)'!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}")


def is_ecg_file(path: str) -> bool:
    """Whether directory discovery should list this file (a WFDB record only by its .hea).

    XML files are sniffed: MUSE, CardioSoft and HL7 aECG count, and so do recognised but
    unsupported ECG exports (Philips), so that ingest quarantines them with a reason.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext not in SUPPORTED_SUFFIXES or ext == ".dat":
        return False
    if ext != ".xml":
        return True
    try:
        root = _xml_root_name(path)
    except (OSError, ECGReadError):
        return False
    return root in _XML_ROOTS or root in _UNSUPPORTED_XML_ROOTS


# ----------------------------------------------------------------------------- reading


def _reader(fmt: str) -> Callable[..., RawECG]:
    module_name, func_name, _ = FORMATS[fmt]
    return getattr(importlib.import_module(module_name), func_name)


def read_ecg(path: str, *, sample_rate_hz: float | None = None) -> RawECG:
    """Read one local ECG file into a RawECG (per-lead microvolts at the source rate).

    ``sample_rate_hz`` is the rate for sources that do not store one (a bare ``.npy``, an
    ``.npz`` without 'fs'); formats that store their rate use their own. For WFDB, ``path``
    may name the record with or without ``.hea``/``.dat``. Raises ECGReadError, and only that,
    for a file that cannot be read.
    """
    path = os.fspath(path)
    fmt = detect_format(path)
    label = FORMATS[fmt][2]
    name = os.path.basename(path)
    check = _wfdb_base(path) + ".hea" if fmt == "wfdb" else path
    if not os.path.exists(check):
        raise ECGReadError(f"{label}: file not found: {os.path.basename(check)}")
    try:
        raw = _reader(fmt)(path, sample_rate_hz=sample_rate_hz)
    except ECGReadError:
        raise
    except MemoryError as exc:
        raise ECGReadError(f"{label}: {name} is too large to read into memory") from exc
    except OSError as exc:
        raise ECGReadError(f"{label}: cannot read {name}: {exc.strerror or exc}") from exc
    except Exception as exc:  # a reader bug or an unforeseen corruption: keep the context
        raise ECGReadError(f"{label}: cannot read {name}: {type(exc).__name__}: {exc}") from exc
    if not raw.signals_uv:
        raise ECGReadError(f"{label}: {name} holds no ECG leads")
    return raw


# ----------------------------------------------------------------------------- shared helpers

_UV_PER_UNIT = {
    "nv": 1e-3,
    "uv": 1.0,
    "µv": 1.0,
    "μv": 1.0,
    "microvolt": 1.0,
    "microvolts": 1.0,
    "mv": 1e3,
    "millivolt": 1e3,
    "millivolts": 1e3,
    "v": 1e6,
    "volt": 1e6,
    "volts": 1e6,
}


def uv_per_unit(unit: str | None, *, context: str) -> float:
    """Microvolts per one ``unit`` ('uV', 'mV', 'V', 'MICROVOLTS', ...); ECGReadError if unknown."""
    key = (unit or "").strip().lower()
    if key not in _UV_PER_UNIT:
        raise ECGReadError(f"{context}: unsupported amplitude unit {unit!r} (expected uV, mV or V)")
    return _UV_PER_UNIT[key]


def to_float(text: str | None) -> float | None:
    """A finite float from text, or None for empty / non-numeric / non-finite text."""
    if text is None:
        return None
    try:
        value = float(str(text).strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def plausible(value: float | None, low: float, high: float) -> float | None:
    """``value`` if within [low, high], else None: exports put 0 or 1 in scrubbed/unknown fields."""
    return value if value is not None and low <= value <= high else None


def plausible_height_cm(value: float | None) -> float | None:
    return plausible(value, 40.0, 250.0)


def plausible_weight_kg(value: float | None) -> float | None:
    return plausible(value, 2.0, 400.0)


def age_in_years(value: float | None, unit: str | None) -> float | None:
    """Convert an age with a unit word or code (YEARS/a/Y, MONTHS/mo/M, WEEKS, DAYS, HOURS) to years."""
    if value is None or value < 0:
        return None
    u = (unit or "years").strip().lower()
    factor = {
        "years": 1.0,
        "year": 1.0,
        "a": 1.0,
        "y": 1.0,
        "yr": 1.0,
        "months": 1 / 12,
        "month": 1 / 12,
        "mo": 1 / 12,
        "m": 1 / 12,
        "weeks": 7 / 365.25,
        "week": 7 / 365.25,
        "wk": 7 / 365.25,
        "w": 7 / 365.25,
        "days": 1 / 365.25,
        "day": 1 / 365.25,
        "d": 1 / 365.25,
        "hours": 1 / 8766,
        "hour": 1 / 8766,
        "h": 1 / 8766,
    }.get(u)
    if factor is None:
        return None
    return plausible(value * factor, 0.0, 130.0)


def parse_datetime(text: str | None, formats: tuple[str, ...]) -> datetime | None:
    """The first of ``formats`` that parses ``text``; None when none does."""
    if not text:
        return None
    for fmt in formats:
        try:
            return datetime.strptime(text.strip(), fmt)
        except ValueError:
            continue
    return None


def file_stem(path: str) -> str:
    """The file name without its suffix: the ecg_id of file-per-ECG formats."""
    return os.path.splitext(os.path.basename(path))[0]
