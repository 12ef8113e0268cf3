"""Benchmark `serve`: Ray Serve against a plain FastAPI app and the in-process call.

Run through jobs/benchmark.py (`python jobs/benchmark.py serve --help`)."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np

# --- serve ------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run folder or checkpoint")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument(
        "--record", default="tests/fixtures/ptbxl/records500/00000/00001_hr", help="WFDB record to post"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=96, help="requests per concurrency level")


def _load(url: str, body: bytes, concurrency: int, n_requests: int) -> dict[str, float]:
    """Bounded closed-loop load: ``concurrency`` clients send ``n_requests`` in all; latency percentiles and rate."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    def worker(count: int) -> list[float]:
        latencies = []
        with httpx.Client(timeout=120) as client:
            for _ in range(count):
                started = time.perf_counter()
                response = client.post(url, content=body, headers={"content-type": "application/json"})
                response.raise_for_status()
                latencies.append(time.perf_counter() - started)
        return latencies

    shares = [n_requests // concurrency + (i < n_requests % concurrency) for i in range(concurrency)]
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = [x for part in pool.map(worker, shares) for x in part]
    wall = time.perf_counter() - started
    return {
        "p50_ms": float(np.percentile(latencies, 50) * 1000),
        "p99_ms": float(np.percentile(latencies, 99) * 1000),
        "rps": len(latencies) / wall,
    }


def _plain_fastapi(predictor: Any, port: int) -> Any:
    """The baseline: a bare FastAPI + uvicorn app calling the same predictor, no Ray, no batching.

    Built from ``lvm_ray.api`` (no Ray import): the same request model, conversion and guards
    (body limit, content type, error handling) as the Serve app, so only the serving differs.
    """
    import threading

    import uvicorn
    from fastapi import Depends

    from lvm_ray.api import (
        JSON_MEDIA_TYPES,
        PredictRequest,
        canonical_request,
        create_app,
        raw_from_request,
        require_media_type,
        response_from_row,
    )

    app = create_app()

    def predict(body: PredictRequest) -> dict[str, Any]:
        wave, metadata, warnings = canonical_request(raw_from_request(body))
        row = predictor.predict(wave[None], {k: np.array([v], dtype=object) for k, v in metadata.items()})
        return response_from_row(row.to_dict("records")[0], warnings)

    # This module uses postponed annotations; FastAPI needs the real request model to read the body.
    predict.__annotations__ = {"body": PredictRequest, "return": dict}
    app.post("/v1/predict", dependencies=[Depends(require_media_type(*JSON_MEDIA_TYPES))])(predict)

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Ray Serve app vs a plain FastAPI app vs the in-process call, at each concurrency, same run."""
    import socket

    import wfdb
    from ray import serve

    from lvm_ray.api import PredictRequest, canonical_request, raw_from_request
    from lvm_ray.predict import Predictor
    from lvm_ray.ray_utils import ensure_connected
    from lvm_ray.serve import build_app

    record = wfdb.rdrecord(args.record)
    payload = {
        "ecg": (record.p_signal.T * 1000).round(1).tolist(),
        "leads": record.sig_name,
        "sample_rate": record.fs,
        "sex": "M",
        "height_cm": 175,
        "weight_kg": 80,
    }
    body = json.dumps(payload).encode()
    predictor = Predictor.from_checkpoint(args.checkpoint)

    def in_process() -> None:
        wave, metadata, _ = canonical_request(raw_from_request(PredictRequest.model_validate_json(body)))
        predictor.predict(wave[None], {k: np.array([v], dtype=object) for k, v in metadata.items()})

    in_process()
    started = time.perf_counter()
    latencies = []
    for _ in range(args.requests):
        t0 = time.perf_counter()
        in_process()
        latencies.append(time.perf_counter() - t0)
    results: dict[str, Any] = {
        "in_process": {
            "p50_ms": float(np.percentile(latencies, 50) * 1000),
            "p99_ms": float(np.percentile(latencies, 99) * 1000),
            "rps": args.requests / (time.perf_counter() - started),
        }
    }

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    port = free_port()
    server = _plain_fastapi(predictor, port)
    results["plain_fastapi"] = {
        str(c): _load(f"http://127.0.0.1:{port}/v1/predict", body, c, args.requests) for c in args.concurrency
    }
    server.should_exit = True
    ensure_connected()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"checkpoint": args.checkpoint}), name="bench", route_prefix="/")
    _load(f"http://127.0.0.1:{port}/v1/predict", body, 1, 4)  # warm-up
    results["ray_serve"] = {
        str(c): _load(f"http://127.0.0.1:{port}/v1/predict", body, c, args.requests) for c in args.concurrency
    }
    serve.shutdown()
    results["ratio_rps_serve_to_fastapi"] = {
        c: results["ray_serve"][c]["rps"] / results["plain_fastapi"][c]["rps"] for c in results["ray_serve"]
    }
    results["cpus"] = os.cpu_count()
    return results
