"""NumPy arrays: ``.npy`` (a bare array) and ``.npz`` (an array with its rate, leads and units).

``.npy``: a numeric array [12, n] or [n, 12] (or 8 leads: I, II, V1-V6) in microvolts, leads in
canonical order; the rate must be passed as ``sample_rate_hz``.
``.npz``: 'ecg' (or 'signal'), 'sample_rate_hz' (or 'fs'), optional 'leads' (names, in the
order of the lead axis; then any number of leads is accepted) and optional 'units'
('uV' by default, or 'mV'/'V'); a rate stored in the file wins over the argument.
Pickled object arrays are refused. ``ecg_id`` is the file stem.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from lvm_ray.formats import file_stem, to_float, uv_per_unit
from lvm_ray.schema import INDEPENDENT_LEADS, LEADS
from lvm_ray.signals import ECGReadError, RawECG, normalise_lead_name

_DEFAULT_ORDERS = {len(LEADS): LEADS, len(INDEPENDENT_LEADS): INDEPENDENT_LEADS}


def _leads_first(array: np.ndarray, n_leads: int | None, where: str) -> np.ndarray:
    """Orient a 2-D array as [leads, samples]: by the named lead count, else by 12 (or 8) on one axis."""
    if array.ndim != 2:
        raise ECGReadError(f"{where}: expected a 2-D array [leads, samples], got shape {array.shape}")
    if n_leads is not None:
        if array.shape[0] == n_leads:
            return array
        if array.shape[1] == n_leads:
            return array.T
        raise ECGReadError(f"{where}: {n_leads} lead names but the array has shape {array.shape}")
    for count in _DEFAULT_ORDERS:
        if array.shape[0] == count:
            return array
        if array.shape[1] == count:
            return array.T
    raise ECGReadError(
        f"{where}: cannot tell the lead axis of shape {array.shape} (expected 12 or 8 leads on one axis, "
        "or an .npz with a 'leads' key)"
    )


def _numeric(array: np.ndarray, where: str) -> np.ndarray:
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise ECGReadError(f"{where}: the array has non-numeric dtype {array.dtype}")
    return np.asarray(array, dtype=np.float64)


def _to_signals(array: np.ndarray, lead_names: list[str] | None, scale: float, where: str) -> dict[str, np.ndarray]:
    array = _leads_first(_numeric(array, where), len(lead_names) if lead_names is not None else None, where)
    names = lead_names if lead_names is not None else list(_DEFAULT_ORDERS[array.shape[0]])
    signals: dict[str, np.ndarray] = {}
    for name, row in zip(names, array, strict=True):
        lead = normalise_lead_name(str(name))
        if lead in signals:
            raise ECGReadError(f"{where}: lead {lead} appears twice in 'leads'")
        signals[lead] = row * scale
    return signals


def _scalar(npz: np.lib.npyio.NpzFile, keys: tuple[str, ...]) -> object | None:
    for key in keys:
        if key in npz.files:
            value = npz[key]
            return value.item() if value.shape == () or value.size == 1 else value
    return None


def read_numpy(path: str, *, sample_rate_hz: float | None = None) -> RawECG:
    """Read a .npy or .npz ECG array (see the module docstring for the layout)."""
    name = os.path.basename(path)
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if path.lower().endswith(".npy"):
        where = f"NumPy file {name}"
        if magic != b"\x93NUMPY":
            raise ECGReadError(f"{where}: not a .npy file (no NumPy header)")
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as exc:
            if "pickle" in str(exc):
                raise ECGReadError(f"{where}: holds pickled Python objects, which are refused") from exc
            raise ECGReadError(f"{where}: corrupt .npy array ({exc})") from exc
        except EOFError as exc:
            raise ECGReadError(f"{where}: the array data is truncated") from exc
        if sample_rate_hz is None:
            raise ECGReadError(f"{where}: a .npy array stores no sample rate; pass sample_rate_hz")
        signals = _to_signals(array, None, 1.0, where)
        rate = float(sample_rate_hz)
    else:
        where = f"NumPy archive {name}"
        if not magic.startswith(b"PK"):
            raise ECGReadError(f"{where}: not a .npz file (not a zip archive)")
        try:
            npz = np.load(path, allow_pickle=False)
        except (ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise ECGReadError(f"{where}: corrupt .npz archive ({exc})") from exc
        with npz:
            key = next((k for k in ("ecg", "signal") if k in npz.files), None)
            if key is None:
                raise ECGReadError(f"{where}: no 'ecg' or 'signal' array (keys: {', '.join(npz.files) or 'none'})")
            try:
                array = npz[key]
                stored_rate = _scalar(npz, ("sample_rate_hz", "fs"))
                leads = npz["leads"] if "leads" in npz.files else None
                units = _scalar(npz, ("units",))
            except ValueError as exc:
                if "pickle" in str(exc):
                    raise ECGReadError(f"{where}: an array holds pickled Python objects, which are refused") from exc
                raise ECGReadError(f"{where}: corrupt array in the archive ({exc})") from exc
            except (EOFError, zipfile.BadZipFile) as exc:
                raise ECGReadError(f"{where}: corrupt .npz archive ({exc})") from exc
        rate_value = to_float(str(stored_rate)) if stored_rate is not None else sample_rate_hz
        if rate_value is None:
            raise ECGReadError(f"{where}: no 'sample_rate_hz' or 'fs' key and no sample_rate_hz given")
        rate = float(rate_value)
        scale = uv_per_unit(str(units) if units is not None else "uV", context=f"{where} 'units'")
        lead_names = [str(x) for x in np.atleast_1d(leads).tolist()] if leads is not None else None
        signals = _to_signals(array, lead_names, scale, where)
    if rate <= 0:
        raise ECGReadError(f"{where}: invalid sample rate {rate:g}")
    return RawECG(
        signals_uv=signals,
        sample_rate_hz=rate,
        source_format="numpy",
        source_uri=os.path.abspath(path),
        ecg_id=file_stem(path),
    )
