"""Benchmark `serve`: Ray Serve against a plain FastAPI app and the in-process call.

Run through jobs/benchmark.py (`python jobs/benchmark.py serve --help`).

The baseline is fair: ``lvm_ray.api.baseline_app`` (the same parser, guards, predictor and
response as the Serve app, one ECG a call, no Ray) in its own uvicorn process with as many
workers as cores, each loading the predictor. Both servers stay up for the whole run and are
loaded in turn, at each concurrency, for ``--rounds`` rounds (the spread of the rounds says how
noisy the machine is); the headline numbers are the medians over rounds. Keys:
``ray_serve`` / ``plain_fastapi`` / ``in_process`` by concurrency (``p50_ms``, ``p99_ms``,
``rps``), ``ratio_rps_serve_to_fastapi`` by concurrency, ``body`` ("npy" or "json"); with
``--body both`` the .npy body's results are at the top and the JSON body's under ``"json"``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import numpy as np

#: Serve settings (lvm_ray.serve.ServeSettings) the benchmark can set; None keeps the default.
SERVE_SETTINGS = (
    ("max_batch_size", int),
    ("batch_wait_timeout_s", float),
    ("max_ongoing_requests", int),
    ("num_replicas", int),
    ("num_cpus", float),
    ("torch_threads", int),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run folder or checkpoint")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument(
        "--record", default="tests/fixtures/ptbxl/records500/00000/00001_hr", help="WFDB record to post"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=192, help="requests per concurrency level and round")
    parser.add_argument(
        "--body",
        choices=["npy", "json", "both"],
        default="both",
        help="request body: application/x-npy (float32 uV), JSON, or both (npy at the top, JSON under 'json')",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of loading both servers back to back")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="uvicorn workers of the baseline")
    parser.add_argument(
        "--proxy",
        choices=["haproxy", "serve"],
        default="haproxy",
        help="Serve's HTTP front end (lvm_ray.serve.PROXY_ENVIRONMENT), for the Ray this benchmark starts",
    )
    for name, kind in SERVE_SETTINGS:
        # One replica per core by default: each is one process, so parsing and canonicalisation
        # (GIL-bound Python) run on every core, as in the baseline's workers.
        default = os.cpu_count() if name == "num_replicas" else None
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=kind, default=default, help=f"Serve setting {name} (default {default})"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerCPU:
    """CPU seconds used by a server's processes: the uvicorn process tree, or every process this
    one started besides it (Ray's: proxy, replicas, controller, raylet, GCS). On a shared machine
    wall-clock rates swing with the neighbours' load; CPU per request much less so."""

    def __init__(self, root_pid: int | None = None, exclude_pid: int | None = None) -> None:
        self.root_pid, self.exclude_pid = root_pid, exclude_pid

    def _processes(self) -> list[Any]:
        import psutil

        if self.root_pid is not None:
            root = psutil.Process(self.root_pid)
            return [root, *root.children(recursive=True)]
        excluded: set[int] = set()
        if self.exclude_pid is not None:
            other = psutil.Process(self.exclude_pid)
            excluded = {other.pid, *(p.pid for p in other.children(recursive=True))}
        return [p for p in psutil.Process().children(recursive=True) if p.pid not in excluded]

    def seconds(self) -> float:
        import psutil

        total = 0.0
        for process in self._processes():
            try:
                times = process.cpu_times()
            except psutil.Error:  # gone meanwhile
                continue
            total += times.user + times.system
        return total


def _load(
    url: str, body: bytes, content_type: str, concurrency: int, n_requests: int, cpu: ServerCPU | None = None
) -> dict[str, float]:
    """Bounded closed-loop load: ``concurrency`` clients send ``n_requests`` in all; latency percentiles, rate
    and (with ``cpu``) the server's CPU milliseconds per request."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    def worker(count: int) -> list[float]:
        latencies = []
        with httpx.Client(timeout=120) as client:
            for _ in range(count):
                started = time.perf_counter()
                response = client.post(url, content=body, headers={"content-type": content_type})
                response.raise_for_status()
                latencies.append(time.perf_counter() - started)
        return latencies

    shares = [n_requests // concurrency + (i < n_requests % concurrency) for i in range(concurrency)]
    cpu_before = cpu.seconds() if cpu else 0.0
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = [x for part in pool.map(worker, shares) for x in part]
    wall = time.perf_counter() - started
    result = {
        "p50_ms": float(np.percentile(latencies, 50) * 1000),
        "p99_ms": float(np.percentile(latencies, 99) * 1000),
        "rps": len(latencies) / wall,
    }
    if cpu:
        result["server_cpu_ms_per_request"] = (cpu.seconds() - cpu_before) * 1000 / len(latencies)
    return result


def _start_baseline(checkpoint: str, port: int, workers: int, timeout_s: float = 600.0) -> subprocess.Popen:
    """The plain-FastAPI baseline in its own uvicorn process with ``workers`` workers; returns once
    every worker answers /readyz (each loads the predictor itself)."""
    import httpx

    from lvm_ray.api import BASELINE_CHECKPOINT_ENV, BASELINE_TORCH_THREADS_ENV

    threads = str(max(1, (os.cpu_count() or 1) // workers))
    env = {
        **os.environ,
        BASELINE_CHECKPOINT_ENV: checkpoint,
        # Workers = cores: one torch thread each, or they fight over the cores.
        BASELINE_TORCH_THREADS_ENV: threads,
        # And one BLAS/OpenMP thread, as Ray gives a 1-CPU replica (OMP_NUM_THREADS=1): the
        # rules' matrix products otherwise run on spinning BLAS threads, 3-4x the CPU per request.
        **{name: threads for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
    }
    command = [sys.executable, "-m", "uvicorn", "lvm_ray.api:baseline_app", "--factory"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    command += ["--log-level", "warning", "--no-access-log"]
    proc = subprocess.Popen(command, env=env, start_new_session=True)
    pids: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(pids) < workers:
        if proc.poll() is not None:
            raise RuntimeError(f"the baseline server exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            _stop(proc)
            raise TimeoutError(f"only {len(pids)} of {workers} baseline workers answered within {timeout_s:g} s")
        try:  # a fresh connection each time: the kernel hands it to any worker that is accepting
            pids.add(httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).json()["pid"])
        except (httpx.HTTPError, KeyError, ValueError):
            time.sleep(0.25)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    """Stop the uvicorn supervisor and its workers (their own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _server_cpu(baseline_pid: int) -> dict[str, ServerCPU]:
    """CPU meters of both servers, or none without psutil (a test dependency, not a runtime one)."""
    try:
        import psutil  # noqa: F401
    except ImportError:
        return {}
    return {"plain_fastapi": ServerCPU(root_pid=baseline_pid), "ray_serve": ServerCPU(exclude_pid=baseline_pid)}


def _bodies(record_path: str) -> dict[str, tuple[bytes, str, str]]:
    """The same ECG as each body kind: (bytes, content type, query string)."""
    import wfdb

    from lvm_ray.schema import LEADS
    from lvm_ray.signals import normalise_lead_name

    record = wfdb.rdrecord(record_path)
    microvolts = (record.p_signal.T * 1000).round(1)
    covariates = {"sex": "M", "height_cm": 175, "weight_kg": 80}
    payload = {"ecg": microvolts.tolist(), "leads": record.sig_name, "sample_rate": record.fs, **covariates}
    names = [normalise_lead_name(n) for n in record.sig_name]
    buffer = io.BytesIO()
    np.save(buffer, microvolts[[names.index(lead) for lead in LEADS]].astype(np.float32))
    query = "&".join(f"{k}={v}" for k, v in {"sample_rate": f"{record.fs:g}", **covariates}.items())
    return {
        "json": (json.dumps(payload).encode(), "application/json", ""),
        "npy": (buffer.getvalue(), "application/x-npy", query),
    }


def _in_process(predictor: Any, body: bytes, content_type: str, query: str, n_requests: int) -> dict[str, float]:
    """The same parse + predict + response in this process, one request at a time (no HTTP)."""
    from urllib.parse import parse_qsl

    from lvm_ray.api import parse_ecg_body, predict_one

    pairs = parse_qsl(query)

    def call() -> None:
        predict_one(predictor, parse_ecg_body(content_type, body, pairs))

    call()
    latencies = []
    started = time.perf_counter()
    for _ in range(n_requests):
        t0 = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t0)
    return {
        "p50_ms": float(np.percentile(latencies, 50) * 1000),
        "p99_ms": float(np.percentile(latencies, 99) * 1000),
        "rps": n_requests / (time.perf_counter() - started),
    }


def _median(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {c: {k: float(np.median([r[c][k] for r in rounds])) for k in rounds[0][c]} for c in rounds[0]}


def _spread(rounds: list[dict[str, dict[str, float]]], key: str) -> dict[str, list[float]]:
    return {c: [round(r[c][key], 2) for r in rounds] for c in rounds[0]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Ray Serve app vs the plain FastAPI baseline vs the in-process call, at each concurrency, same run."""
    import httpx
    from ray import serve

    from lvm_ray.predict import Predictor
    from lvm_ray.ray_utils import ensure_connected
    from lvm_ray.serve import ServeSettings, build_app, use_proxy, wait_until_ready

    kinds = ["npy", "json"] if args.body == "both" else [args.body]
    bodies = {k: v for k, v in _bodies(args.record).items() if k in kinds}
    predictor = Predictor.from_checkpoint(args.checkpoint, use_gpu=False)
    in_process = {k: _in_process(predictor, *bodies[k], args.requests) for k in kinds}
    del predictor

    serve_args = {name: getattr(args, name) for name, _ in SERVE_SETTINGS if getattr(args, name) is not None}
    settings = ServeSettings.from_args(dict(serve_args))
    fastapi_port, serve_port = _free_port(), _free_port()
    started = time.perf_counter()
    baseline = _start_baseline(args.checkpoint, fastapi_port, args.workers)
    baseline_start_s = time.perf_counter() - started
    try:
        proxy = args.proxy if use_proxy(args.proxy) else "the cluster's"
        # Ray starts its workers (the replicas) at nice 15; the baseline runs at 0. On a shared
        # machine that alone starves the replicas: the Ray started here runs them at 0 too.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ensure_connected()
        started = time.perf_counter()
        serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
        serve.run(build_app({"checkpoint": args.checkpoint, **serve_args}), name="bench", route_prefix="/")
        wait_until_ready(f"http://127.0.0.1:{serve_port}/readyz")
        serve_start_s = time.perf_counter() - started
        urls = {
            "plain_fastapi": f"http://127.0.0.1:{fastapi_port}/v1/predict",
            "ray_serve": f"http://127.0.0.1:{serve_port}/v1/predict",
        }
        answers = {}
        for side, url in urls.items():  # warm-up, and both sides must give the same answer
            for kind, (body, content_type, query) in bodies.items():
                target = f"{url}?{query}" if query else url
                _load(target, body, content_type, 2, 8)
                answers[side, kind] = httpx.post(
                    target, content=body, headers={"content-type": content_type}, timeout=120
                ).json()["lv_mass_g"]
        cpu = _server_cpu(baseline.pid)
        rounds: dict[str, dict[str, list]] = {k: {side: [] for side in urls} for k in kinds}
        for _ in range(args.rounds):
            for kind, (body, content_type, query) in bodies.items():
                for side, url in urls.items():
                    target = f"{url}?{query}" if query else url
                    rounds[kind][side].append(
                        {
                            str(c): _load(target, body, content_type, c, args.requests, cpu.get(side))
                            for c in args.concurrency
                        }
                    )
    finally:
        _stop(baseline)
        serve.shutdown()

    results: dict[str, Any] = {}
    for kind in kinds:
        serve_rounds, fastapi_rounds = rounds[kind]["ray_serve"], rounds[kind]["plain_fastapi"]
        part: dict[str, Any] = {
            "body": kind,
            "in_process": in_process[kind],
            "plain_fastapi": _median(fastapi_rounds),
            "ray_serve": _median(serve_rounds),
        }
        part["ratio_rps_serve_to_fastapi"] = {
            c: part["ray_serve"][c]["rps"] / part["plain_fastapi"][c]["rps"] for c in part["ray_serve"]
        }
        part["rounds"] = {
            "ratio_rps_serve_to_fastapi": {
                c: [round(s[c]["rps"] / f[c]["rps"], 3) for s, f in zip(serve_rounds, fastapi_rounds, strict=True)]
                for c in part["ray_serve"]
            },
            **{
                f"{side}_{key}": _spread(rounds[kind][side], key)
                for side in urls
                for key in ("rps", "p50_ms", "p99_ms")
            },
        }
        part["same_answer"] = bool(np.isclose(answers["ray_serve", kind], answers["plain_fastapi", kind], rtol=1e-5))
        if results:
            results[kind] = part
        else:
            results.update(part)
    results["serve_settings"] = {
        **settings.as_dict(),
        "deployment": "LVMassPredictor",
        "proxy": proxy,
        "worker_niceness": os.environ.get("RAY_worker_niceness"),
    }
    results["plain_fastapi_workers"] = args.workers
    results["startup_s"] = {"plain_fastapi": baseline_start_s, "ray_serve": serve_start_s}
    results["requests_per_level"] = args.requests
    results["rounds_n"] = args.rounds
    results["cpus"] = os.cpu_count()
    return results
