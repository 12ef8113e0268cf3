"""Stage `serve`: the online LV mass endpoint on Ray Serve (FastAPI ingress, dynamic batching).

Requests are turned into canonical ECGs by the ingest code (``lvm_ray.signals`` and the format
readers) and predicted by ``lvm_ray.predict.Predictor``: the very path batch scoring uses.
Nothing runs at import: ``build_app`` (the Serve app builder) binds the deployment.

    serve run lvm_ray.serve:build_app checkpoint=demo_output/run
    serve deploy jobs/serve_config.yaml
    lvm-ray serve --checkpoint demo_output/run --port 8000
"""

# No `from __future__ import annotations` here: Serve re-wraps the ingress methods, and FastAPI
# must resolve their annotations at runtime.

import asyncio
import logging
import math
import os
import tempfile
from collections.abc import Callable
from functools import partial
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.middleware.base import BaseHTTPMiddleware

from lvm_ray.predict import Predictor
from lvm_ray.schema import INDEPENDENT_LEADS, LEADS
from lvm_ray.signals import ECGReadError, RawECG, canonical_waveform, normalise_lead_name

log = logging.getLogger(__name__)

ModelLoader = Callable[[], Predictor]
#: Largest request body accepted (a 12 x 10 s x 1000 Hz JSON ECG is about 1.5 MB).
MAX_BODY_BYTES = 8 * 1024 * 1024
MIN_RATE_HZ, MAX_RATE_HZ = 50.0, 10_000.0


class BadRequestError(ValueError):
    """The request is well-formed JSON but not a usable ECG; the message says why (422)."""


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
    lvh_probability: float | None = None
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


def _finite_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


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


def _bool_or_none(value: Any) -> bool | None:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return bool(value)


def response_from_row(row: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    """One row of Predictor.predict -> the response body."""
    measurements = {
        k: _finite_or_none(v) for k, v in row.items() if k.startswith(("r_uv_", "s_uv_")) or k in _RULE_MEASUREMENTS
    }
    flags = {k: _bool_or_none(v) for k, v in row.items() if k.startswith("lvh_") and k not in ("lvh_pred", "lvh_prob")}
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
        "prediction": other_targets,
        "rules": {"measurements": measurements, "flags": flags, "error": rules_error},
        "model_version": row["model_version"],
        "model_preset": row["model_preset"],
        "warnings": warnings,
    }


class BodySizeLimit(BaseHTTPMiddleware):
    """413 for bodies over the limit, before anything parses them."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        super().__init__(app)
        self.max_bytes = max_bytes

    async def dispatch(self, request: Request, call_next: Callable) -> Any:
        length = request.headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_bytes
            except ValueError:
                return JSONResponse({"detail": "invalid Content-Length header"}, status_code=400)
            if too_big:
                return JSONResponse(
                    {"detail": f"body too large: {int(length)} bytes > limit {self.max_bytes}"}, status_code=413
                )
        return await call_next(request)


api = FastAPI(
    title="lvm-ray",
    version="1",
    description="LV mass and LVH from a 12-lead ECG (LVM-AI), with the classic voltage rules.",
)
api.add_middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES)


@api.exception_handler(RequestValidationError)
async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    # Echoing the offending input back (FastAPI's default) fails on NaN/inf and could leak
    # waveforms into logs: name the location and the problem only.
    errors = [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg")), "type": str(e.get("type"))} for e in exc.errors()
    ]
    return JSONResponse({"detail": errors}, status_code=422)


@api.exception_handler(BadRequestError)
async def _bad_request(_: Request, exc: BadRequestError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=422)


def _read_upload(files: list[UploadFile], sample_rate: float | None) -> RawECG:
    from lvm_ray.formats import read_ecg

    names = [os.path.basename(f.filename or "") for f in files]
    if not files or not all(names):
        raise BadRequestError("upload at least one file, each with a file name")
    with tempfile.TemporaryDirectory(prefix="lvm-ray-upload-") as workdir:
        for upload, name in zip(files, names, strict=True):
            with open(os.path.join(workdir, name), "wb") as f:
                f.write(upload.file.read())
        headers = [n for n in names if n.lower().endswith(".hea")]
        target = headers[0] if headers else names[0]
        try:
            raw = read_ecg(os.path.join(workdir, target), sample_rate_hz=sample_rate)
        except ECGReadError as exc:
            raise BadRequestError(f"unreadable file {target}: {exc}") from None
    raw.source_uri = "upload"
    return raw


@serve.deployment(name="LVMassPredictor", max_ongoing_requests=32)
@serve.ingress(api)
class LVMassPredictor:
    """One replica: one loaded model; requests are batched into a single forward pass."""

    def __init__(self, loader: ModelLoader, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.01) -> None:
        self.predictor = loader()
        self.predict_batch.set_max_batch_size(max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        log.info("LVMassPredictor ready: %s", self.predictor.version)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def predict_batch(self, items: list[tuple[np.ndarray, dict[str, Any]]]) -> list[dict[str, Any]]:
        ecg = np.stack([wave for wave, _ in items])
        metadata = {key: np.array([meta[key] for _, meta in items], dtype=object) for key in items[0][1]}
        frame = await asyncio.get_running_loop().run_in_executor(None, self.predictor.predict, ecg, metadata)
        return frame.to_dict("records")

    async def _predict_raw(self, raw: RawECG) -> dict[str, Any]:
        wave, metadata, warnings = canonical_request(raw)
        row = await self.predict_batch((wave, metadata))
        return response_from_row(row, warnings)

    @api.post("/v1/predict", response_model=PredictResponse)
    async def predict(self, body: PredictRequest) -> dict[str, Any]:
        """Predict from a JSON ECG (leads x samples)."""
        return await self._predict_raw(raw_from_request(body))

    @api.post("/v1/predict/file", response_model=PredictResponse)
    async def predict_file(
        self,
        files: Annotated[list[UploadFile], File(description="One ECG export (a WFDB record needs .hea and .dat).")],
        age: Annotated[float | None, Form(ge=0, le=130)] = None,
        sex: Annotated[Literal["M", "F"] | None, Form()] = None,
        height_cm: Annotated[float | None, Form(gt=30, lt=260)] = None,
        weight_kg: Annotated[float | None, Form(gt=2, lt=400)] = None,
        sample_rate: Annotated[float | None, Form(gt=0, description="Only for .npy uploads.")] = None,
    ) -> dict[str, Any]:
        """Predict from an uploaded WFDB pair, GE MUSE XML, GE CardioSoft XML, HL7 aECG, DICOM or NumPy file."""
        raw = await asyncio.get_running_loop().run_in_executor(None, partial(_read_upload, files, sample_rate))
        for name, value in (("age", age), ("sex", sex), ("height_cm", height_cm), ("weight_kg", weight_kg)):
            if value is not None:
                setattr(raw, name, value)
        return await self._predict_raw(raw)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> dict[str, str]:
        return {"status": "ready", "model_version": self.predictor.version}

    @api.get("/v1/model", response_model=ModelInfo)
    async def model_info(self) -> dict[str, Any]:
        preset = self.predictor.preset
        return {
            "preset": preset.name,
            "model_version": self.predictor.version,
            "target": preset.target.column,
            "task": preset.target.task,
            "input_sample_rate_hz": preset.input.sample_rate_hz,
            "input_n_samples": preset.input.n_samples,
            "covariates": list(preset.covariate_names),
            "lvh_head": preset.lvh_head,
            "training": self.predictor.training_summary,
        }


def build_app(args: dict[str, Any], loader: ModelLoader | None = None) -> serve.Application:
    """Serve app builder: ``args`` holds ``checkpoint`` (any URL), optional ``use_gpu``,
    ``max_batch_size``, ``batch_wait_timeout_s``. Tests may inject a ``loader``."""
    options = dict(args)
    checkpoint = options.pop("checkpoint", None)
    if loader is None:
        if not checkpoint:
            raise ValueError("build_app needs args['checkpoint'] (a run folder or checkpoint URL)")
        use_gpu = str(options.pop("use_gpu", "false")).lower() in ("1", "true", "yes")
        loader = partial(Predictor.from_checkpoint, checkpoint, use_gpu)
    max_batch_size = int(options.pop("max_batch_size", 16))
    timeout = float(options.pop("batch_wait_timeout_s", 0.01))
    if options:
        raise ValueError(f"unknown serve args: {', '.join(sorted(options))}")
    deployment = LVMassPredictor
    if max_batch_size > 32:  # keep max_batch_size <= max_ongoing_requests
        deployment = deployment.options(max_ongoing_requests=max_batch_size)
    return deployment.bind(loader, max_batch_size, timeout)


def run_server(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, use_gpu: bool = False) -> None:
    """Start Serve on host:port with the model at ``checkpoint`` and block (Ctrl-C stops)."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(
        build_app({"checkpoint": checkpoint, "use_gpu": use_gpu}), name="lvm-ray", route_prefix="/", blocking=True
    )
