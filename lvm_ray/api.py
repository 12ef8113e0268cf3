"""The HTTP interface of the LV mass endpoint, without Ray: request/response models, their
conversion to and from the prediction path, upload handling, and the guarded FastAPI app.

``lvm_ray.serve`` puts these behind Ray Serve; any other server (the plain-FastAPI baseline in
``jobs/benchmark.py``, a test client) can use them without importing Ray. See
docs/architecture.md ("Prediction path").

Rules for bad input: every mistake gets a 4xx with a JSON ``detail`` naming the problem; an
internal error gets a 500 with a fixed message. Nothing a client sent (waveforms, file names,
header values) is written to the logs.
"""

# No `from __future__ import annotations`: FastAPI resolves the models' annotations at runtime.

import logging
import math
import os
import tempfile
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers

from lvm_ray.schema import INDEPENDENT_LEADS, LEADS
from lvm_ray.signals import ECGReadError, RawECG, canonical_waveform, normalise_lead_name

if TYPE_CHECKING:  # the predictor pulls in torch: only its type is needed here
    from lvm_ray.predict import Predictor

log = logging.getLogger(__name__)

#: Largest request body accepted (a 12 x 10 s x 1000 Hz JSON ECG is about 1.5 MB), counted
#: while reading, so it holds for chunked bodies without a Content-Length too.
MAX_BODY_BYTES = 8 * 1024 * 1024
MIN_RATE_HZ, MAX_RATE_HZ = 50.0, 10_000.0
#: An upload is one ECG export: a WFDB record is two files, nothing needs more than a few.
MAX_UPLOAD_FILES = 8
#: Longest file name most file systems store (NAME_MAX), in UTF-8 bytes.
MAX_FILE_NAME_BYTES = 255
#: Media types each endpoint reads; anything else is answered 415.
JSON_MEDIA_TYPES = ("application/json",)
UPLOAD_MEDIA_TYPES = ("multipart/form-data",)

TITLE = "lvm-ray"
DESCRIPTION = "LV mass and LVH from a 12-lead ECG (LVM-AI), with the classic voltage rules."


class BadRequestError(ValueError):
    """The request is well-formed but not a usable ECG; the message says why (422)."""


class BodyTooLargeError(HTTPException):
    """A body over :data:`MAX_BODY_BYTES` (413). An HTTPException, so FastAPI answers it as is
    when it surfaces while the body is being parsed."""

    def __init__(self, max_bytes: int, declared: int | None = None) -> None:
        size = f"{declared} bytes" if declared is not None else "the body read so far"
        super().__init__(status_code=413, detail=f"body too large: {size} > limit {max_bytes} bytes")


# ----------------------------------------------------------------------------- models


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": []})

    ecg: list[list[float]] = Field(..., description="Leads x samples.", min_length=1, max_length=15)
    units: Literal["uV", "mV"] = Field("uV", description="Units of the samples: microvolts (default) or millivolts.")
    sample_rate: float = Field(500.0, description="Samples per second (resampled to 500 Hz).", gt=0)
    leads: list[str] | None = Field(
        None, description="Lead names in the order of `ecg` (default: the 12 canonical leads, or I, II, V1-V6 for 8)."
    )
    age: float | None = Field(None, ge=0, le=130)
    sex: Literal["M", "F"] | None = None
    height_cm: float | None = Field(None, gt=30, lt=260)
    weight_kg: float | None = Field(None, gt=2, lt=400)
    ecg_id: str | None = Field(None, max_length=200)


class RuleResult(BaseModel):
    measurements: dict[str, float | None]
    flags: dict[str, bool | None]
    error: str | None = None


class PredictResponse(BaseModel):
    ecg_id: str | None
    lv_mass_g: float | None = None
    lvmi: float | None = Field(None, description="Predicted LV mass / BSA (g/m2), when height and weight are known.")
    lvh: bool | None = Field(
        None, description="Predicted LVH (LVMI over the sex threshold), when BSA and sex are known."
    )
    lvh_probability: float | None = Field(None, description="The LVH head's raw output, when the model has one.")
    lv_mass_lo_g: float | None = Field(
        None,
        description="Lower end of the prediction interval for CMR LV mass (g), when the model is calibrated "
        "(split-conformal by sex: at the stated level, intervals cover the CMR LV mass of that share of ECGs).",
    )
    lv_mass_hi_g: float | None = Field(None, description="Upper end of the prediction interval (g).")
    interval_level: float | None = Field(None, description="Level of the interval, e.g. 0.9 for 90%.")
    lvh_probability_calibrated: float | None = Field(
        None,
        description="Calibrated probability of CMR LVH (LVMI over the sex threshold) from the conformal "
        "predictive distribution of LV mass, when the model is calibrated and BSA and sex are known.",
    )
    prediction: dict[str, float | None] = Field(default_factory=dict, description="Other targets' outputs.")
    rules: RuleResult
    model_version: str
    model_preset: str
    warnings: list[str]


class ModelInfo(BaseModel):
    preset: str
    model_version: str
    target: str
    task: str
    input_sample_rate_hz: int
    input_n_samples: int
    covariates: list[str]
    lvh_head: bool
    training: dict[str, Any]
    interval_level: float | None = Field(None, description="Level of the prediction intervals (None: uncalibrated).")
    calibration: dict[str, Any] | None = Field(
        None, description="The intervals' calibration: method, id, ECGs per sex, and provenance (data, split, date)."
    )
    model_card: dict[str, Any] | None = Field(
        None,
        description="The model card written from the checkpoint and run record (lvm_ray.modelcard); "
        "its markdown under 'markdown'. None when it could not be made.",
    )


class ExplanationBody(BaseModel):
    method: str = Field(..., description="integrated_gradients (captum), baseline: the flat ECG at 0 uV.")
    baseline: str
    units: str = Field(..., description="Units of the attributions and outputs: 'g' for LV mass.")
    n_steps: int
    leads: list[str]
    lead_share: dict[str, float] = Field(..., description="Each lead's share of sum |attribution|; sums to 1.")
    samples_per_point: int = Field(..., description="Canonical 500 Hz samples summed into each point.")
    point_ms: float = Field(..., description="Duration of one point (ms).")
    attribution: list[list[float]] = Field(
        ..., description="Leads x points (at most 500 a lead): attribution summed over each point's samples."
    )
    explained_output: float | None = Field(None, description="The output explained (LV mass in g, float32 path).")
    baseline_output: float | None = Field(None, description="The same output for the flat baseline ECG.")
    completeness_error: float | None = Field(
        None, description="sum(attribution) - (explained_output - baseline_output): integration error."
    )


class ExplainResponse(PredictResponse):
    explanation: ExplanationBody


# ----------------------------------------------------------------------------- conversion


def _finite_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _bool_or_none(value: Any) -> bool | None:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return bool(value)


def raw_from_request(request: PredictRequest) -> RawECG:
    """Validate a JSON request into a RawECG; BadRequestError names the problem."""
    n_rows = len(request.ecg)
    if request.leads is None:
        if n_rows == len(LEADS):
            names = list(LEADS)
        elif n_rows == len(INDEPENDENT_LEADS):
            names = list(INDEPENDENT_LEADS)
        else:
            raise BadRequestError(f"ecg has {n_rows} leads; give 12 (or 8: I, II, V1-V6) or name them in `leads`")
    else:
        if len(request.leads) != n_rows:
            raise BadRequestError(f"`leads` names {len(request.leads)} leads but `ecg` has {n_rows} rows")
        try:
            names = [normalise_lead_name(name) for name in request.leads]
        except ECGReadError as exc:
            raise BadRequestError(str(exc)) from None
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise BadRequestError(f"duplicate lead(s) {', '.join(duplicates)}")
    lengths = {len(row) for row in request.ecg}
    if len(lengths) != 1:
        raise BadRequestError(f"wrong shape: leads have different lengths {sorted(lengths)}")
    if not MIN_RATE_HZ <= request.sample_rate <= MAX_RATE_HZ:
        raise BadRequestError(
            f"sample_rate {request.sample_rate:g} Hz is out of range ({MIN_RATE_HZ:g}-{MAX_RATE_HZ:g} Hz)"
        )
    samples = np.asarray(request.ecg, dtype=np.float64)
    if not np.isfinite(samples).all():
        bad = [names[i] for i in np.flatnonzero(~np.isfinite(samples).all(axis=1))]
        raise BadRequestError(f"non-finite samples (NaN/inf) in lead(s) {', '.join(bad)}")
    scale = 1000.0 if request.units == "mV" else 1.0
    return RawECG(
        signals_uv={name: row * scale for name, row in zip(names, samples, strict=True)},
        sample_rate_hz=request.sample_rate,
        source_format="json",
        source_uri="request",
        ecg_id=request.ecg_id,
        age=request.age,
        sex=request.sex,
        height_cm=request.height_cm,
        weight_kg=request.weight_kg,
    )


def canonical_request(raw: RawECG) -> tuple[np.ndarray, dict[str, Any], list[str]]:
    """RawECG -> (canonical int16 ECG, metadata for the predictor, warnings); BadRequestError if unusable."""
    wave, reason = canonical_waveform(raw)
    if reason:
        raise BadRequestError(f"unusable ECG: {reason}")
    warnings = []
    if raw.sample_rate_hz != 500:
        warnings.append(f"resampled from {raw.sample_rate_hz:g} Hz to 500 Hz")
    derived = [lead for lead in LEADS if lead not in raw.signals_uv]
    if derived:
        warnings.append(f"derived lead(s) {', '.join(derived)} from I and II")
    if raw.height_cm is None or raw.weight_kg is None:
        warnings.append("height_cm and weight_kg not given: no LVMI or LVH")
    elif raw.sex is None:
        warnings.append("sex not given: no LVH call")
    metadata = {
        "ecg_id": raw.ecg_id,
        "age": raw.age,
        "sex": raw.sex,
        "height_cm": raw.height_cm,
        "weight_kg": raw.weight_kg,
    }
    return wave, metadata, warnings


_RULE_MEASUREMENTS = (
    "qrs_ms",
    "hr_bpm",
    "sokolow_lyon_uv",
    "cornell_uv",
    "ravl_uv",
    "cornell_product_uv_ms",
    "peguero_uv",
)


def response_from_row(row: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    """One row of Predictor.predict -> the response body (a PredictResponse)."""
    measurements = {
        k: _finite_or_none(v) for k, v in row.items() if k.startswith(("r_uv_", "s_uv_")) or k in _RULE_MEASUREMENTS
    }
    not_flags = ("lvh_pred", "lvh_prob", "lvh_prob_calibrated")
    flags = {k: _bool_or_none(v) for k, v in row.items() if k.startswith("lvh_") and k not in not_flags}
    other_targets = {
        k: _finite_or_none(v)
        for k, v in row.items()
        if k.endswith(("_pred", "_prob")) and k not in ("lvh_pred", "lvh_prob")
    }
    rules_error = row.get("rules_error") or None
    if rules_error:
        warnings = [*warnings, f"voltage rules not measurable: {rules_error}"]
    return {
        "ecg_id": row.get("ecg_id"),
        "lv_mass_g": _finite_or_none(row.get("lv_mass_pred_g")),
        "lvmi": _finite_or_none(row.get("lvmi_pred")),
        "lvh": _bool_or_none(row.get("lvh_pred")),
        "lvh_probability": _finite_or_none(row.get("lvh_prob")),
        "lv_mass_lo_g": _finite_or_none(row.get("lv_mass_pred_lo_g")),
        "lv_mass_hi_g": _finite_or_none(row.get("lv_mass_pred_hi_g")),
        "interval_level": _finite_or_none(row.get("interval_level")),
        "lvh_probability_calibrated": _finite_or_none(row.get("lvh_prob_calibrated")),
        "prediction": other_targets,
        "rules": {"measurements": measurements, "flags": flags, "error": rules_error},
        "model_version": row["model_version"],
        "model_preset": row["model_preset"],
        "warnings": warnings,
    }


def explanation_body(explanation: Any, index: int, max_points: int | None = None) -> dict[str, Any]:
    """ECG ``index`` of an :class:`lvm_ray.explain.Explanation` -> the response's ``explanation``."""
    from lvm_ray.explain import BASELINE, MAX_POINTS_PER_LEAD, METHOD, downsample  # torch: only when explaining
    from lvm_ray.schema import SAMPLE_RATE_HZ

    points, step = downsample(explanation.attribution[index], max_points or MAX_POINTS_PER_LEAD)
    return {
        "method": METHOD,
        "baseline": BASELINE,
        "units": explanation.units,
        "n_steps": int(explanation.n_steps),
        "leads": list(LEADS),
        "lead_share": {lead: float(s) for lead, s in zip(LEADS, explanation.lead_share[index], strict=True)},
        "samples_per_point": step,
        "point_ms": 1000.0 * step / SAMPLE_RATE_HZ,
        "attribution": np.round(points, 8).tolist(),
        "explained_output": _finite_or_none(explanation.output[index]),
        "baseline_output": _finite_or_none(explanation.baseline_output[index]),
        "completeness_error": _finite_or_none(explanation.delta[index]),
    }


def model_info(predictor: "Predictor", model_card: dict[str, Any] | None = None) -> dict[str, Any]:
    """The body of GET /v1/model (a ModelInfo) for a loaded predictor (and its model card, when made)."""
    preset = predictor.preset
    return {
        "preset": preset.name,
        "model_version": predictor.version,
        "target": preset.target.column,
        "task": preset.target.task,
        "input_sample_rate_hz": preset.input.sample_rate_hz,
        "input_n_samples": preset.input.n_samples,
        "covariates": list(preset.covariate_names),
        "lvh_head": preset.lvh_head,
        "training": predictor.training_summary,
        "interval_level": predictor.level,
        "calibration": predictor.training_summary.get("calibration"),
        "model_card": model_card,
    }


# ----------------------------------------------------------------------------- uploads


def upload_file_name(name: str | None, position: int) -> str:
    """The client's file name reduced to a plain name that is safe to create in a scratch folder.

    The suffix tells the format and a WFDB header names its signal file, so names are kept, but
    only as plain names: a path keeps its last part; '.', '..', control characters (NUL ...),
    names over :data:`MAX_FILE_NAME_BYTES` bytes and undecodable names are refused. Messages
    name the upload by position, never by the name it came with.
    """
    where = f"upload {position}"
    if not name:
        raise BadRequestError(f"{where} has no file name (its suffix tells the format, e.g. .xml, .hea/.dat)")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise BadRequestError(f"{where}: the file name contains a control character (such as NUL or a newline)")
    base = name.replace("\\", "/").rsplit("/", 1)[-1]  # clients on Windows send C:\...\ecg.xml
    if base in ("", ".", ".."):
        raise BadRequestError(f"{where}: the file name is a folder ('.', '..' or ending in '/'), not a file")
    try:
        size = len(base.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadRequestError(f"{where}: the file name is not valid UTF-8") from None
    if size > MAX_FILE_NAME_BYTES:
        raise BadRequestError(f"{where}: the file name is {size} bytes long (at most {MAX_FILE_NAME_BYTES})")
    return base


def read_upload(files: Sequence[tuple[str | None, bytes]], sample_rate: float | None = None) -> RawECG:
    """Uploaded (file name, content) pairs of one ECG export -> RawECG; BadRequestError says why not.

    The files go to a private scratch folder under their checked plain names (a WFDB header
    names its .dat); the header of a WFDB pair, else the first file, is read by the format
    registry. Errors never log the client's names or contents.
    """
    from lvm_ray.formats import read_ecg  # the readers are imported lazily

    if not files:
        raise BadRequestError("upload at least one file, each with a file name")
    if len(files) > MAX_UPLOAD_FILES:
        raise BadRequestError(f"{len(files)} files uploaded; one ECG export is at most {MAX_UPLOAD_FILES} files")
    names = [upload_file_name(name, i) for i, (name, _) in enumerate(files, start=1)]
    if len(set(names)) != len(names):
        raise BadRequestError("two uploaded files have the same name")
    headers = [i for i, n in enumerate(names) if n.lower().endswith(".hea")]
    target = headers[0] if headers else 0
    with tempfile.TemporaryDirectory(prefix="lvm-ray-upload-") as workdir:
        for position, (name, (_, content)) in enumerate(zip(names, files, strict=True), start=1):
            try:
                with open(os.path.join(workdir, name), "xb") as f:
                    f.write(content)
            except (OSError, ValueError) as exc:  # e.g. a name the file system refuses
                reason = getattr(exc, "strerror", None) or type(exc).__name__
                raise BadRequestError(f"upload {position} cannot be stored under its file name ({reason})") from None
        try:
            raw = read_ecg(os.path.join(workdir, names[target]), sample_rate_hz=sample_rate)
        except ECGReadError as exc:
            message = str(exc).replace(workdir + os.sep, "")  # the scratch path means nothing to a client
            raise BadRequestError(f"unreadable file (upload {target + 1}): {message}") from None
        except Exception as exc:  # a reader bug on odd input is still a 4xx for the client
            log.warning("an ECG reader failed on an upload with %s", type(exc).__name__)
            raise BadRequestError(
                f"unreadable file (upload {target + 1}): not a readable ECG export ({type(exc).__name__})"
            ) from None
    raw.source_uri = "upload"
    return raw


# ----------------------------------------------------------------------------- the app


def require_media_type(*expected: str) -> Callable[[Request], None]:
    """A route dependency: 415 naming the expected media types unless Content-Type is one of them."""

    def check(request: Request) -> None:
        given = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        json_like = "application/json" in expected and given.startswith("application/") and given.endswith("+json")
        if given not in expected and not json_like:
            raise HTTPException(
                status_code=415,
                detail=f"unsupported Content-Type {given or '(none)'!r}: send {' or '.join(expected)}",
            )

    return check


async def _send_json(send: Callable[[dict[str, Any]], Awaitable[None]], status: int, detail: str) -> None:
    body = JSONResponse({"detail": detail}, status_code=status)
    await send({"type": "http.response.start", "status": status, "headers": body.raw_headers})
    await send({"type": "http.response.body", "body": body.body})


class BodySizeLimit:
    """ASGI middleware: 413 for bodies over ``max_bytes``.

    A declared Content-Length over the limit is refused before anything is read; every body
    (chunked ones have no Content-Length) is also counted as it arrives, and reading stops at
    the limit, so no body over it is ever held in memory.
    """

    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None:
            if not length.isdigit():
                await _send_json(send, 400, "invalid Content-Length header")
                return
            if int(length) > self.max_bytes:
                await _send_json(send, 413, str(BodyTooLargeError(self.max_bytes, int(length)).detail))
                return
        received = 0

        async def counted_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)
            return message

        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracking_send)
        except BodyTooLargeError as exc:  # FastAPI answers it while parsing; this covers any other reader
            if started:
                raise
            await _send_json(send, 413, str(exc.detail))


class HideInternalErrors:
    """ASGI middleware, outermost: an unexpected exception becomes a 500 with a fixed message.

    The log gets the exception type and the code's stack, not the exception's message, which
    can quote request data (a file name, a value); the exception is not re-raised, so the
    server underneath does not log it either.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # everything: nothing escapes to be logged with its message
            stack = "".join(traceback.format_tb(exc.__traceback__))
            log.error("internal error (%s) on %s %s\n%s", type(exc).__name__, scope.get("method"), scope["path"], stack)
            if not started:
                await _send_json(send, 500, "internal error: the request was not processed")


async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    # Echoing the offending input back (FastAPI's default) fails on NaN/inf and could leak
    # waveforms into logs: name the location and the problem only.
    errors = [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg")), "type": str(e.get("type"))} for e in exc.errors()
    ]
    return JSONResponse({"detail": errors}, status_code=422)


async def _bad_request(_: Request, exc: BadRequestError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=422)


def create_app(max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """A FastAPI app with the endpoint's guards (body limit, error handling); routes are added by
    the server that uses it (``lvm_ray.serve`` declares them on its Serve deployment)."""
    app = FastAPI(title=TITLE, version="1", description=DESCRIPTION)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(BadRequestError, _bad_request)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    app.add_middleware(HideInternalErrors)  # added last = outermost
    return app
