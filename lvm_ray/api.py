"""The HTTP interface of the LV mass endpoint, without Ray: request/response models, their
conversion to and from the prediction path, upload handling, and the guarded FastAPI app.

``lvm_ray.serve`` puts these behind Ray Serve; any other server (the plain-FastAPI baseline
:func:`baseline_app` of ``jobs/benchmark.py serve``, a test client) can use them without
importing Ray. See docs/architecture.md ("Prediction path").

/v1/predict and /v1/explain read a JSON body (:class:`PredictRequest`) or a binary one
(``application/x-npy``: the array ``np.save`` writes, with :class:`NpyQuery` in the query
string); both through :func:`parse_ecg_body`.

Rules for bad input: every mistake gets a 4xx with a JSON ``detail`` naming the problem; an
internal error gets a 500 with a fixed message. Nothing a client sent (waveforms, file names,
header values) is written to the logs.
"""

# No `from __future__ import annotations`: FastAPI resolves the models' annotations at runtime.

import io
import logging
import math
import os
import tempfile
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import pandas as pd
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import Headers

from lvm_ray.rules import MEASURE_COLUMNS, RULE_FLAG_COLUMNS
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
#: A binary ECG body: one array written by ``np.save`` (leads x samples, microvolts), its sample
#: rate and covariates in the query string (:class:`NpyQuery`). Skips parsing 60,000 JSON numbers.
NPY_MEDIA_TYPES = ("application/x-npy",)
#: What /v1/predict and /v1/explain read (:func:`read_ecg_body`).
ECG_MEDIA_TYPES = JSON_MEDIA_TYPES + NPY_MEDIA_TYPES
UPLOAD_MEDIA_TYPES = ("multipart/form-data",)
#: Environment variables of :func:`baseline_app` (uvicorn starts it by import string, without arguments).
BASELINE_CHECKPOINT_ENV = "LVM_RAY_BASELINE_CHECKPOINT"
BASELINE_TORCH_THREADS_ENV = "LVM_RAY_BASELINE_TORCH_THREADS"

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


# Field types shared by the JSON body and the query string of a binary body: one set of limits.
Units = Annotated[Literal["uV", "mV"], Field(description="Units of the samples: microvolts (default) or millivolts.")]
SampleRate = Annotated[float, Field(description="Samples per second (resampled to 500 Hz).", gt=0)]
Age = Annotated[float | None, Field(ge=0, le=130)]
Sex = Literal["M", "F"] | None
HeightCm = Annotated[float | None, Field(gt=30, lt=260)]
WeightKg = Annotated[float | None, Field(gt=2, lt=400)]
BsaM2 = Annotated[
    float | None,
    Field(gt=0.1, lt=5, description="Body surface area (m2); default: Mosteller's from height and weight."),
]
EcgId = Annotated[str | None, Field(max_length=200)]


class _Covariates(BaseModel):
    """What travels with an ECG in either body: covariates and its id (all optional)."""

    model_config = ConfigDict(extra="forbid")

    age: Age = None
    sex: Sex = None
    height_cm: HeightCm = None
    weight_kg: WeightKg = None
    bsa_m2: BsaM2 = None
    ecg_id: EcgId = None


class PredictRequest(_Covariates):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": []})

    ecg: list[list[float]] = Field(..., description="Leads x samples.", min_length=1, max_length=15)
    units: Units = "uV"
    sample_rate: SampleRate = 500.0
    leads: list[str] | None = Field(
        None, description="Lead names in the order of `ecg` (default: the 12 canonical leads, or I, II, V1-V6 for 8)."
    )


class NpyQuery(_Covariates):
    """The query string of an ``application/x-npy`` body: everything of :class:`PredictRequest`
    but the samples, which are the array (``leads`` comma-separated)."""

    units: Units = "uV"
    sample_rate: SampleRate = 500.0
    leads: str | None = Field(
        None,
        description="Comma-separated lead names of the array's rows (default: the 12 canonical leads "
        "I, II, III, aVR, aVL, aVF, V1-V6, or I, II, V1-V6 for 8 rows).",
        max_length=200,
    )


@dataclass
class ECGRequest:
    """A parsed /v1/predict or /v1/explain body: the ECG as read, plus covariates RawECG has no field for."""

    raw: RawECG
    bsa_m2: float | None = None


class RuleResult(BaseModel):
    measurements: dict[str, float | None]
    flags: dict[str, bool | None]
    error: str | None = None


class PredictResponse(BaseModel):
    ecg_id: str | None
    lv_mass_g: float | None = None
    lv_mass_sd_g: float | None = Field(
        None,
        description="An ensemble's spread: the sample SD of its members' LV mass (g); null for a single model.",
    )
    lvmi: float | None = Field(None, description="Predicted LV mass / BSA (g/m2), when height and weight are known.")
    lvh: bool | None = Field(
        None, description="Predicted LVH (LVMI over the sex threshold), when BSA and sex are known."
    )
    lvh_probability: float | None = Field(None, description="The LVH head's raw output, when the model has one.")
    lvh_probability_sd: float | None = Field(
        None, description="An ensemble's spread of the LVH head's output (SD over members); null otherwise."
    )
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
    prediction: dict[str, float | None] = Field(
        default_factory=dict,
        description="Other targets' outputs (<target>_pred or _prob), with an ensemble's spread (<...>_sd).",
    )
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


def _lead_names(n_rows: int, leads: Sequence[str] | None, what: str) -> list[str]:
    """Canonical names of ``n_rows`` rows: ``leads`` checked, or the default 12 / 8 leads."""
    if leads is None:
        if n_rows == len(LEADS):
            return list(LEADS)
        if n_rows == len(INDEPENDENT_LEADS):
            return list(INDEPENDENT_LEADS)
        raise BadRequestError(f"{what} has {n_rows} leads; give 12 (or 8: I, II, V1-V6) or name them in `leads`")
    if len(leads) != n_rows:
        raise BadRequestError(f"`leads` names {len(leads)} leads but {what} has {n_rows} rows")
    try:
        names = [normalise_lead_name(name) for name in leads]
    except ECGReadError as exc:
        raise BadRequestError(str(exc)) from None
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BadRequestError(f"duplicate lead(s) {', '.join(duplicates)}")
    return names


def _raw_from_samples(
    samples: np.ndarray, names: list[str], fields: "PredictRequest | NpyQuery", source_format: str
) -> RawECG:
    """Leads x samples (float64) and the request's fields -> RawECG; BadRequestError names the problem."""
    if not MIN_RATE_HZ <= fields.sample_rate <= MAX_RATE_HZ:
        raise BadRequestError(
            f"sample_rate {fields.sample_rate:g} Hz is out of range ({MIN_RATE_HZ:g}-{MAX_RATE_HZ:g} Hz)"
        )
    finite = np.isfinite(samples).all(axis=1)
    if not finite.all():
        bad = [names[i] for i in np.flatnonzero(~finite)]
        raise BadRequestError(f"non-finite samples (NaN/inf) in lead(s) {', '.join(bad)}")
    if fields.units == "mV":
        samples = samples * 1000.0
    return RawECG(
        signals_uv=dict(zip(names, samples, strict=True)),
        sample_rate_hz=fields.sample_rate,
        source_format=source_format,
        source_uri="request",
        ecg_id=fields.ecg_id,
        age=fields.age,
        sex=fields.sex,
        height_cm=fields.height_cm,
        weight_kg=fields.weight_kg,
    )


def raw_from_request(request: PredictRequest) -> RawECG:
    """Validate a JSON request into a RawECG; BadRequestError names the problem."""
    names = _lead_names(len(request.ecg), request.leads, "ecg")
    lengths = {len(row) for row in request.ecg}
    if len(lengths) != 1:
        raise BadRequestError(f"wrong shape: leads have different lengths {sorted(lengths)}")
    return _raw_from_samples(np.asarray(request.ecg, dtype=np.float64), names, request, "json")


def _validation_error(exc: ValidationError, where: str) -> RequestValidationError:
    """A pydantic error on the body or query string -> FastAPI's 422, located as FastAPI would."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    return RequestValidationError([{**e, "loc": (where, *e.get("loc", ()))} for e in errors])


def parse_json_body(body: bytes) -> PredictRequest:
    """A JSON body -> PredictRequest, parsed and validated in one pass by pydantic's JSON reader.

    About 3x cheaper than FastAPI's own path (``json.loads`` into Python objects, then validating
    those) on a 12 x 5000 ECG; the errors are the same 422 (RequestValidationError).
    """
    try:
        return PredictRequest.model_validate_json(body)
    except ValidationError as exc:
        raise _validation_error(exc, "body") from None


def first_line(exc: BaseException) -> str:
    """An exception's first line (at most 200 characters): what a one-line message quotes."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def read_npy(body: bytes) -> np.ndarray:
    """An ``np.save`` body -> its float64 array [leads, samples]; BadRequestError names the problem.

    The header is checked before any data is read (a header may declare any shape: nothing is
    allocated for it unless the body holds exactly that many bytes); no pickle is ever loaded.
    """
    fp = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(fp)
    except (ValueError, EOFError):
        raise BadRequestError("body is not an .npy array (np.save output): no NPY magic header") from None
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise BadRequestError(f"unsupported .npy format version {version[0]}.{version[1]} (np.save writes 1.0)")
    try:
        shape, _, dtype = readers[version](fp)
    except Exception as exc:  # noqa: BLE001 - any header numpy cannot read is the client's mistake
        raise BadRequestError(f"unreadable .npy header: {first_line(exc)}") from None
    if dtype.hasobject or dtype.fields is not None:
        raise BadRequestError("the .npy array holds Python objects or records: send a plain int or float array")
    if dtype.kind not in "iuf":
        raise BadRequestError(f"the .npy array has dtype {dtype.str}: send int or float samples in microvolts")
    if len(shape) != 2:
        raise BadRequestError(f"the .npy array has shape {tuple(shape)}: send leads x samples, e.g. (12, 5000)")
    expected = shape[0] * shape[1] * dtype.itemsize
    if len(body) - fp.tell() != expected:
        raise BadRequestError(
            f"the .npy body holds {len(body) - fp.tell()} data bytes but its header declares "
            f"{shape[0]} x {shape[1]} {dtype.str} = {expected} bytes (truncated, or trailing bytes)"
        )
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - checked above; still a 4xx if numpy disagrees
        raise BadRequestError(f"unreadable .npy array: {first_line(exc)}") from None
    return np.asarray(array, dtype=np.float64)


def parse_npy_body(body: bytes, query: Sequence[tuple[str, str]]) -> ECGRequest:
    """An ``application/x-npy`` body and its query string (NpyQuery) -> ECGRequest."""
    names_given = [name for name, _ in query]
    twice = sorted({n for n in names_given if names_given.count(n) > 1})
    if twice:
        raise BadRequestError(f"query parameter(s) {', '.join(twice)} given more than once")
    try:
        fields = NpyQuery.model_validate(dict(query))
    except ValidationError as exc:
        raise _validation_error(exc, "query") from None
    samples = read_npy(body)
    leads = None if fields.leads is None else [name.strip() for name in fields.leads.split(",")]
    names = _lead_names(samples.shape[0], leads, "the array")
    return ECGRequest(_raw_from_samples(samples, names, fields, "npy"), fields.bsa_m2)


def media_type(headers: Mapping[str, str]) -> str:
    """The request's media type, lower case, without parameters (``; charset=...``)."""
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _is_json(given: str) -> bool:
    return given == "application/json" or (given.startswith("application/") and given.endswith("+json"))


def unsupported_media_type(given: str, expected: Sequence[str]) -> HTTPException:
    return HTTPException(
        status_code=415, detail=f"unsupported Content-Type {given or '(none)'!r}: send {' or '.join(expected)}"
    )


def parse_ecg_body(content_type: str, body: bytes, query: Sequence[tuple[str, str]] = ()) -> ECGRequest:
    """The body of /v1/predict or /v1/explain (JSON or .npy by ``content_type``) -> ECGRequest.

    HTTPException 415 for another media type, RequestValidationError or BadRequestError (422) for
    a body that is not a usable ECG. Pure CPU work: a server may run it wherever it parallelises.
    """
    if _is_json(content_type):
        request = parse_json_body(body)
        return ECGRequest(raw_from_request(request), request.bsa_m2)
    if content_type in NPY_MEDIA_TYPES:
        return parse_npy_body(body, query)
    raise unsupported_media_type(content_type, ECG_MEDIA_TYPES)


async def read_ecg_body(request: Request) -> ECGRequest:
    """Read and parse the ECG body of ``request`` (:func:`parse_ecg_body`); the body limit applies."""
    given = media_type(request.headers)
    if not _is_json(given) and given not in NPY_MEDIA_TYPES:  # refuse before reading the body
        raise unsupported_media_type(given, ECG_MEDIA_TYPES)
    return parse_ecg_body(given, await request.body(), request.query_params.multi_items())


#: OpenAPI of the ECG body (routes read it from the Request, so FastAPI cannot infer it).
ECG_BODY_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}},
            "application/x-npy": {
                "schema": {"type": "string", "format": "binary"},
                "description": "np.save output: an int or float array [12, n] (or [8, n]) in microvolts, leads "
                "in the canonical order; sample_rate and covariates in the query string.",
            },
        },
    },
    "parameters": [
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": "application/x-npy bodies only." + (f" {field.description}" if field.description else ""),
            "schema": NpyQuery.model_json_schema()["properties"][name],
        }
        for name, field in NpyQuery.model_fields.items()
    ],
}


def canonical_request(raw: RawECG, bsa_m2: float | None = None) -> tuple[np.ndarray, dict[str, Any], list[str]]:
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
    if bsa_m2 is None and (raw.height_cm is None or raw.weight_kg is None):
        warnings.append("height_cm and weight_kg not given: no LVMI or LVH")
    elif raw.sex is None:
        warnings.append("sex not given: no LVH call")
    metadata = {
        "ecg_id": raw.ecg_id,
        "age": raw.age,
        "sex": raw.sex,
        "height_cm": raw.height_cm,
        "weight_kg": raw.weight_kg,
        "bsa_m2": bsa_m2,
    }
    return wave, metadata, warnings


def stack_requests(items: Sequence[tuple[np.ndarray, Mapping[str, Any]]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(canonical ECG, metadata) pairs -> the batch Predictor.predict takes: [n, 12, 5000] and columns."""
    ecg = np.stack([wave for wave, _ in items])
    return ecg, {key: np.array([meta[key] for _, meta in items], dtype=object) for key in items[0][1]}


#: The measurements of the voltage rules in a response (lvm_ray.rules: amplitudes, QRS, HR, rule values).
_RULE_MEASUREMENTS = tuple(c for c in MEASURE_COLUMNS if c not in RULE_FLAG_COLUMNS and c != "rules_error")
#: Predictor columns that have their own response fields (the rest of *_pred/_prob go to `prediction`).
_OWN_FIELDS = ("lv_mass_pred_g", "lvh_pred", "lvh_prob", "lv_mass_pred_sd_g", "lvh_prob_sd")


def response_from_row(row: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    """One row of Predictor.predict -> the response body (a PredictResponse)."""
    measurements = {k: _finite_or_none(row[k]) for k in _RULE_MEASUREMENTS if k in row}
    # Exactly the rules' flags: an ensemble's lvh_prob_sd (or lvh_pred, lvh_prob_calibrated) is no rule.
    flags = {k: _bool_or_none(row[k]) for k in RULE_FLAG_COLUMNS if k in row}
    other_targets = {
        k: _finite_or_none(v)
        for k, v in row.items()
        if k.endswith(("_pred", "_prob", "_pred_sd", "_prob_sd")) and k not in _OWN_FIELDS
    }
    rules_error = row.get("rules_error") or None
    if rules_error:
        warnings = [*warnings, f"voltage rules not measurable: {rules_error}"]
    return {
        "ecg_id": row.get("ecg_id"),
        "lv_mass_g": _finite_or_none(row.get("lv_mass_pred_g")),
        "lv_mass_sd_g": _finite_or_none(row.get("lv_mass_pred_sd_g")),
        "lvmi": _finite_or_none(row.get("lvmi_pred")),
        "lvh": _bool_or_none(row.get("lvh_pred")),
        "lvh_probability": _finite_or_none(row.get("lvh_prob")),
        "lvh_probability_sd": _finite_or_none(row.get("lvh_prob_sd")),
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
        given = media_type(request.headers)
        if given not in expected and not ("application/json" in expected and _is_json(given)):
            raise unsupported_media_type(given, expected)

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
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        # Routes read the ECG body themselves (JSON or .npy): the JSON body's model is declared here.
        if app.openapi_schema is None:
            schemas = generate().setdefault("components", {}).setdefault("schemas", {})
            schemas.setdefault("PredictRequest", PredictRequest.model_json_schema())
        return app.openapi_schema

    app.openapi = openapi
    return app


def predict_one(predictor: "Predictor", ecg: ECGRequest) -> dict[str, Any]:
    """One parsed request -> its response body, unbatched (the plain-FastAPI baseline's path)."""
    wave, metadata, warnings = canonical_request(ecg.raw, ecg.bsa_m2)
    frame = predictor.predict(*stack_requests([(wave, metadata)]))
    return response_from_row(frame.to_dict("records")[0], warnings)


def baseline_app(checkpoint: str | None = None) -> FastAPI:
    """The plain-FastAPI baseline of ``jobs/benchmark.py serve``: /v1/predict (JSON or .npy) with
    the Serve app's parser, guards and response, one ECG a call, no Ray and no batching.

    A factory for ``uvicorn --factory --workers N lvm_ray.api:baseline_app``: each worker process
    loads the checkpoint in ``$LVM_RAY_BASELINE_CHECKPOINT`` (or ``checkpoint``) on CPU, with
    ``$LVM_RAY_BASELINE_TORCH_THREADS`` torch threads when set (one per worker when workers = cores).
    """
    import torch
    from starlette.concurrency import run_in_threadpool

    from lvm_ray.predict import Predictor

    checkpoint = checkpoint or os.environ.get(BASELINE_CHECKPOINT_ENV)
    if not checkpoint:
        raise ValueError(f"baseline_app needs a checkpoint (set {BASELINE_CHECKPOINT_ENV})")
    threads = os.environ.get(BASELINE_TORCH_THREADS_ENV)
    if threads:
        torch.set_num_threads(int(threads))
    predictor = Predictor.from_checkpoint(checkpoint, use_gpu=False)
    app = create_app()

    @app.post("/v1/predict", response_model=PredictResponse, openapi_extra=ECG_BODY_OPENAPI)
    async def predict(request: Request) -> dict[str, Any]:
        ecg = await read_ecg_body(request)
        return await run_in_threadpool(predict_one, predictor, ecg)

    @app.get("/readyz")
    async def readyz() -> dict[str, Any]:
        # The worker's pid: a benchmark waits until every uvicorn worker has answered.
        return {"status": "ready", "model_version": predictor.version, "pid": os.getpid()}

    return app
